"""Keras's predict vs the TFLite interpreter for the bundled MobileNetV2, side by side (benchmark only).

Usage:
    .venv/bin/python bench/pretrained_speed.py [--photos 64] [--repeats 5]

Embeds the same real photos from ../shared/flower_photos both ways, in batches of 32, and prints the median
milliseconds per photo over the repeats, their ratio, the largest difference between the two embeddings,
and how long the one-time conversion took. curate.pretrained runs the interpreter when TensorFlow can convert
the model, because this measured it faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate import pretrained  # noqa: E402
from train.data import decode_image  # noqa: E402

FLOWERS = ROOT.parent / "shared" / "flower_photos"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    paths = sorted(FLOWERS.glob("*/*.jpg"))
    paths = paths[:: max(1, len(paths) // args.photos)][: args.photos]  # spread over every class
    images = np.stack([decode_image(p, pretrained.INPUT_SIZE) for p in paths])
    model = pretrained.load_mobilenet_v2()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        interpreter = pretrained.tflite_predictor(model, Path(tmp) / "mobilenet_v2.tflite")
        convert_s = time.perf_counter() - t0
        if interpreter is None:
            sys.exit("no TFLite conversion here (TensorFlow missing, or another Keras backend)")
        runs = {"keras predict_on_batch": model.predict_on_batch, "TFLite interpreter": interpreter}
        timings: dict[str, list[float]] = {name: [] for name in runs}
        out = {}
        for predict in runs.values():
            pretrained.embed_images(predict, images[:32])  # warm-up
        for _ in range(args.repeats):
            for name, predict in runs.items():  # interleaved, so drift in the machine hits both
                t = time.perf_counter()
                out[name] = pretrained.embed_images(predict, images)
                timings[name].append((time.perf_counter() - t) / len(images) * 1000)
    print(f"machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores), {len(images)} photos, "
          f"{args.repeats} repeats, batches of {pretrained.BATCH}")
    for name, ts in timings.items():
        print(f"  {name:<24} median {np.median(ts):6.1f} ms/photo  (runs: {', '.join(f'{t:.1f}' for t in ts)})")
    ratio = np.median(timings["keras predict_on_batch"]) / np.median(timings["TFLite interpreter"])
    diff = np.abs(out["keras predict_on_batch"] - out["TFLite interpreter"]).max()
    print(f"  TFLite is {ratio:.1f}x as fast; largest difference between the embeddings {diff:.1e}; "
          f"conversion took {convert_s:.1f} s once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
