"""Cost per row of the scan's dataset-level steps (the part no engine parallelises), on synthetic manifests.

Usage: .venv/bin/python bench/merge_bench.py [--sizes 100000 300000] [--manifest reports/flower_photos/manifest.csv]

After the per-file rows exist (local pool or Dask partitions), `curate.scan.scan` does, in one process:
rows (dicts) -> DataFrame, sort, the monochrome check, data-relative thresholds and flags (curate.quality), exact and
near-duplicate grouping (curate.duplicates) with its share check, flag merge, manifest.csv. This benchmark does the same
steps, with the same functions, on N rows tiled from a real manifest (metrics and sizes of real photos),
with synthetic pHashes (bench/dup_bench.py: 32 of 64 bits set, a tenth planted near copies) and unique
sha256s. Each size runs in a fresh process; prints seconds per step, microseconds and peak bytes per row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(n: int, manifest_csv: str) -> dict:
    import numpy as np
    import pandas as pd

    from bench.dup_bench import synthetic_phashes
    from curate.quality import data_relative_flags, data_thresholds
    from curate.scan import (
        MANIFEST_COLUMNS,
        ScanConfig,
        _merge_flags,
        _unflag_grayscale_if_monochrome,
        group_duplicates,
    )

    config = ScanConfig()
    real = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    real = real[real["error"] == ""]
    rss_start = _rss_mb()  # interpreter, imports, the real manifest: not per row
    rng = np.random.default_rng(0)
    take = rng.integers(0, len(real), size=n)
    base = real.iloc[take].reset_index(drop=True)
    phash = synthetic_phashes(n, config.near_distance)
    records = []
    for i, rec in enumerate(base.to_dict("records")):
        rec.update(filepath=f"{rec['label']}/{i:09d}.jpg", sha256=f"{rng.integers(1 << 62):064x}",
                   phash=f"{int(phash[i]):016x}", bytes=int(rec["bytes"]), width=int(rec["width"]),
                   height=int(rec["height"]), flags="", dup_group="")
        for col in ("blur", "brightness", "contrast", "entropy"):
            rec[col] = float(rec[col])
        records.append(rec)
    del base, real
    rss0 = _rss_mb()
    t: dict[str, float] = {}
    cpu0 = time.process_time()

    t0 = time.perf_counter()
    manifest = pd.DataFrame(records, columns=MANIFEST_COLUMNS)
    manifest = manifest.sort_values("filepath", kind="stable").reset_index(drop=True)
    t["rows -> DataFrame, sort"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _unflag_grayscale_if_monochrome(manifest, config.grayscale_majority)
    t["monochrome check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    thresholds = data_thresholds(manifest[manifest["error"] == ""], config.quality)
    flag_arrays = data_relative_flags(manifest, thresholds)
    t["thresholds + quality flags"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dup_group, dups, dup_flags, _, _ = group_duplicates(manifest, config)
    t["duplicates (exact + near index)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    flag_arrays.update(dup_flags)
    manifest["dup_group"] = dup_group
    manifest["flags"] = _merge_flags(manifest["flags"].tolist(), flag_arrays)
    t["merge flags"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest.to_csv(os.devnull, index=False)
    t["write manifest.csv"] = time.perf_counter() - t0
    total = sum(t.values())
    cpu = time.process_time() - cpu0
    return {"rows": n, "seconds": {k: round(v, 2) for k, v in t.items()}, "total_s": round(total, 2),
            "cpu_s": round(cpu, 2), "cpu_us_per_row": round(1e6 * cpu / n, 1),
            "us_per_row": round(1e6 * total / n, 1), "duplicate_groups": int(dups["dup_group"].nunique()),
            "peak_rss_mb": round(_rss_mb(), 1), "start_rss_mb": round(rss_start, 1),
            "bytes_per_row_before_merge": round((rss0 - rss_start) * 2**20 / n),
            "peak_bytes_per_row": round((_rss_mb() - rss_start) * 2**20 / n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--manifest", default=str(ROOT / "reports" / "flower_photos" / "manifest.csv"))
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_size(args.child, args.manifest)))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f}")
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--manifest", args.manifest, "--child", str(n)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        steps = ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items())
        print(f"{n:>10,} rows: {r['total_s']:.2f} s = {r['us_per_row']:.1f} us/row, CPU {r['cpu_us_per_row']:.1f} "
              f"us/row ({steps}); "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, above start {r['peak_bytes_per_row']} B/row "
              f"({r['bytes_per_row_before_merge']} B/row holding the rows before the merge); "
              f"{r['duplicate_groups']:,} duplicate groups", flush=True)
        print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
