"""Time `curate app --no-launch` work (the FiftyOne dataset build) on a run folder, side by side in one run.

    .venv/bin/python bench/fiftyone_bench.py reports/flower_photos [--keep-db DIR]

Prints: fiftyone import time, first build (empty database: samples, fields, Brain, saved views),
a second call (inputs unchanged: skipped), a forced rebuild (compares every field, writes only
changes, reruns Brain and views), and FiftyOne's own `Dataset.from_dir`-style baseline
(`add_samples` of bare samples with ground truth) as the floor, plus the machine.
By default it uses a temporary database directory (FIFTYONE_DATABASE_DIR), removed at the end, so the user's
FiftyOne database is untouched; the run folder only gets its `fiftyone.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder with manifest.csv and scan.json")
    ap.add_argument("--keep-db", metavar="DIR", help="database directory to use and keep (default: a temporary one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.child:
        # measure in a child process, so its mongod has stopped before a temporary database is removed
        db_dir = Path(args.keep_db or tempfile.mkdtemp(prefix="curate-fo-bench-"))
        env = {**os.environ, "FIFTYONE_DATABASE_DIR": str(db_dir)}
        keep = ["--keep-db", args.keep_db] if args.keep_db else []
        rc = subprocess.call([sys.executable, __file__, args.run, "--child", *keep], env=env)
        if not args.keep_db:
            shutil.rmtree(db_dir, ignore_errors=True)
        sys.exit(rc)
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    for k in ("FIFTYONE_DATABASE_URI", "FIFTYONE_PRIVATE_DATABASE_PORT"):
        os.environ.pop(k, None)

    import pandas as pd

    from curate.io import data_root_of, read_manifest

    t = time.perf_counter()
    import fiftyone as fo

    t_import = time.perf_counter() - t
    t = time.perf_counter()
    fo.list_datasets()
    t_db = time.perf_counter() - t

    from curate.fiftyone_bridge import build_dataset

    run_dir = Path(args.run)
    m = read_manifest(run_dir / "manifest.csv")
    root = data_root_of(run_dir)

    t = time.perf_counter()
    floor = fo.Dataset()
    floor.add_samples([fo.Sample(filepath=str(root / fp), ground_truth=fo.Classification(label=lab))
                       for fp, lab in zip(m["filepath"], m["label"], strict=True)], progress=False)
    t_floor = time.perf_counter() - t
    floor.delete()

    t = time.perf_counter()
    ds = build_dataset(run_dir, progress=False)
    t_first = time.perf_counter() - t
    steps_first = json.loads((run_dir / "fiftyone.json").read_text())["seconds_by_step"]
    t = time.perf_counter()
    ds = build_dataset(run_dir, progress=False)
    t_again = time.perf_counter() - t
    t = time.perf_counter()
    ds = build_dataset(run_dir, progress=False, force=True)
    t_force = time.perf_counter() - t
    views = {v: len(ds.load_saved_view(v)) for v in ds.list_saved_views()}

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"fiftyone {fo.__version__}")
    print(f"run: {run_dir} ({len(m)} rows, columns: {len(m.columns)}; flag columns: "
          f"{'label_quality' in m.columns}; oof: {len(list(run_dir.glob('oof_*.npy')))}; "
          f"embeddings: {(run_dir / 'embeddings.npy').exists()})")
    print(pd.Series({"import fiftyone": t_import, "database start": t_db,
                     "floor: add_samples(filepath, ground_truth)": t_floor,
                     "build_dataset, first (empty db)": t_first, "build_dataset, again (inputs unchanged)": t_again,
                     "build_dataset, forced rebuild (writes only changed values)": t_force},
                    name="seconds").round(2).to_string())
    print(f"first build by step: {steps_first}; forced rebuild by step: "
          f"{json.loads((run_dir / 'fiftyone.json').read_text())['seconds_by_step']}")
    print(f"first build / floor: {t_first / t_floor:.1f}x; samples: {len(ds)}; views: {views}")
    if not args.keep_db:
        ds.delete()


if __name__ == "__main__":
    main()
