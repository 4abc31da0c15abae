"""Trainer benchmarks (not tests): input-pipeline speed, and preset accuracy on the verified test split.

    python bench/train_bench.py pipeline [--images 1024] [--repeats 3] [--models 1x64,2x128]
        Training images/s of one model fed by (a) the original post's pipeline -- tf.data over file paths,
        every JPEG re-read with cv2.imread and cv2.resize'd inside tf.numpy_function every epoch, batch 16,
        prefetch(8) -- and (b) ours -- uint8 arrays decoded once (reduced-size decode, sha256+size disk
        cache) fed straight to model.fit. Same model, same batch size, interleaved in one process; prints
        medians and the ratio b/a per model size (the smaller the model, the more the input pipeline
        matters), plus the post's pipeline alone and the cold/warm-cache load time of (b).

    python bench/train_bench.py accuracy [--preset cpu] [--seed 0] [--epochs N] [--out DIR] [--score-only]
        A whole `curate train` run on ../shared/flower_photos, then accuracy on the verified test split:
        the test photos minus every photo listed in ../shared/audit/dev_audit.csv (a hand audit of
        off-class photos; only benchmarks may read it). Prints accuracy on both and the wall time.

How to read the pipeline ratio: the post's pipeline decodes on tf.data's prefetch thread, in parallel with
the train step, so it only costs throughput when decoding is slower than the step. On a 2-core CPU a
200 px ViT step is the slower one for any encoder worth training, and the ratio stays near 1x; it grows
as the encoder shrinks (or on a GPU, where the step is fast and decoding is not).

Machine and backend are printed with every result; results are appended to bench/results/train_bench.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("CURATE_SHARED", ROOT.parent / "shared"))
FLOWERS = SHARED / "flower_photos"
AUDIT = SHARED / "audit" / "dev_audit.csv"
RESULTS = ROOT / "bench" / "results" / "train_bench.jsonl"


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"


def full_manifest():
    import pandas as pd

    rows = [(p.relative_to(FLOWERS).as_posix(), p.parent.name) for p in sorted(FLOWERS.glob("*/*.jpg"))]
    return pd.DataFrame(rows, columns=["filepath", "label"])


def record(result: dict) -> None:
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **result}
    print(json.dumps(result, indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")


# ---------------------------------------------------------------- pipeline


def posts_dataset(paths: list[str], labels, size: int, num_classes: int, batch: int):
    """The post's input pipeline: decode + resize every JPEG in tf.numpy_function, every epoch."""
    import cv2
    import numpy as np
    import tensorflow as tf

    def parse(path, label):
        image = cv2.imread(path.decode(), cv2.IMREAD_COLOR)
        image = cv2.resize(image, (size, size))
        image = image[:, :, ::-1].astype(np.float32)  # BGR -> RGB, 0..255 (the model rescales)
        return image, np.int32(label)

    def parse_tf(path, label):
        image, label = tf.numpy_function(parse, [path, label], [tf.float32, tf.int32])
        image.set_shape((size, size, 3))
        label.set_shape(())
        return image, tf.one_hot(label, num_classes)

    ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int32)))
    return ds.map(parse_tf).batch(batch).prefetch(8)


def bench_pipeline(args) -> None:
    import keras

    from train import data as tdata
    from train.fit import compile_model
    from train.model import build_vit
    from train.presets import PRESETS

    seed = PRESETS["seed"]
    size, batch = seed.model.image_size, seed.batch_size
    df = full_manifest().sample(n=args.images, random_state=0).reset_index(drop=True)
    classes = tdata.class_names(df)
    y = df["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    y1 = keras.utils.to_categorical(y, len(classes))
    paths = [str(FLOWERS / f) for f in df["filepath"]]

    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        x, ok = tdata.load_images(df, FLOWERS, size, cache_dir=cache)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        x, ok = tdata.load_images(df, FLOWERS, size, cache_dir=cache)
        warm = time.perf_counter() - t
    assert ok.all()
    ds = posts_dataset(paths, y, size, len(classes), batch)
    t = time.perf_counter()
    for _ in ds:  # the post's pipeline alone, no training step: the most it can deliver
        pass
    post_only = len(df) / (time.perf_counter() - t)

    for spec in args.models.split(","):
        layers, width = (int(v) for v in spec.split("x"))
        # The seed model's input (200 px, 25 px patches, linear patch embedding, batch 16) with a smaller
        # encoder: the 398M seed encoder on a CPU is so slow that any input pipeline would look free.
        cfg = dataclasses.replace(seed.model, num_layers=layers, hidden_dim=width, num_heads=4, key_dim=None,
                                  mlp_dim=2 * width)
        keras.utils.set_random_seed(0)
        model = build_vit(cfg, len(classes))
        compile_model(model, dataclasses.replace(seed, model=cfg), steps_per_epoch=len(df) // batch, epochs=1)
        model.fit(x[:64], y1[:64], batch_size=batch, epochs=1, verbose=0)  # trace both train-step signatures
        model.fit(ds.take(4), epochs=1, shuffle=False, verbose=0)
        rates: dict[str, list[float]] = {"post": [], "ours": []}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            t = time.perf_counter()
            model.fit(ds, epochs=1, shuffle=False, verbose=0)
            rates["post"].append(len(df) / (time.perf_counter() - t))
            t = time.perf_counter()
            model.fit(x, y1, batch_size=batch, epochs=1, shuffle=True, verbose=0)
            rates["ours"].append(len(df) / (time.perf_counter() - t))
        med = {k: statistics.median(v) for k, v in rates.items()}
        record({
            "bench": "pipeline", "backend": keras.backend.backend(), "images": len(df), "batch": batch,
            "model": f"{size}px patch {cfg.patch_size}, {cfg.num_layers} layers x {cfg.hidden_dim}",
            "params": model.count_params(),
            "post_images_per_s": [round(r, 1) for r in rates["post"]],
            "ours_images_per_s": [round(r, 1) for r in rates["ours"]],
            "median_post": round(med["post"], 1), "median_ours": round(med["ours"], 1),
            "ratio_ours_over_post": round(med["ours"] / med["post"], 2),
            "post_pipeline_alone_images_per_s": round(post_only, 1),
            "ours_cold_cache_load_s": round(cold, 2), "ours_warm_cache_load_s": round(warm, 2),
        })


# ---------------------------------------------------------------- accuracy


def verified_accuracy(run_dir: Path) -> dict:
    import pandas as pd

    preds = pd.read_csv(run_dir / "predictions.csv", dtype=str)
    audit = set(pd.read_csv(AUDIT, dtype=str)["filepath"])
    keep = ~preds["filepath"].isin(audit)
    correct = preds["label"] == preds["predicted"]
    return {"test_accuracy": round(float(correct.mean()), 4), "n_test": int(len(preds)),
            "verified_test_accuracy": round(float(correct[keep].mean()), 4), "n_verified_test": int(keep.sum())}


def bench_accuracy(args) -> None:
    from train.fit import train

    out = Path(args.out or ROOT / "reports" / f"bench_train_{args.preset}_s{args.seed}")
    t = time.perf_counter()
    if not args.score_only:
        manifest = out.parent / f"{out.name}_manifest.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        full_manifest().to_csv(manifest, index=False)
        train(manifest, FLOWERS, out, preset=args.preset, epochs=args.epochs, seed=args.seed, progress=args.progress)
    wall = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text())
    record({"bench": "accuracy", "preset": args.preset, "seed": args.seed, "out": str(out),
            **verified_accuracy(out), "epochs_run": metrics["epochs_run"], "best_epoch": metrics["best_epoch"],
            "params": metrics["params"], "train_images_per_s": metrics["images_per_second"],
            "wall_seconds": round(wall, 1) if not args.score_only else metrics["wall_seconds"],
            "backend": metrics["backend"], "device": metrics["device"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pipeline")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="1x64,2x128",
                   help="encoder sizes LAYERSxWIDTH to compare on, comma-separated (default: 1x64,2x128)")
    p = sub.add_parser("accuracy")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--out")
    p.add_argument("--score-only", action="store_true", help="score an existing --out run without training")
    p.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    bench_pipeline(args) if args.what == "pipeline" else bench_accuracy(args)


if __name__ == "__main__":
    main()
