"""`curate scan --engine dask` against `--engine local` on the same data, side by side, plus per-item costs.

Usage: .venv/bin/python bench/dask_bench.py [DATA] [--repeats 1] [--workers N] [--json OUT]

Contenders, each a whole `curate scan DATA --out <fresh folder> -q` process with a cold cache, in rotation:
  local        the local engine (a fork pool of --workers processes)
  dask         --engine dask with its default: a LocalCluster of --workers processes, started and closed
  dask-warm    --engine dask --scheduler ADDRESS of a LocalCluster this script started before (no start-up cost)
Also measured, for docs/scale.md: CPU seconds per file of the local engine (process + workers), and the memory
a manifest row takes while the merge holds it (as the Python dict the engines yield, and as a DataFrame row).
Prints medians, ratios and the machine; --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CURATE = str(Path(PYTHON).with_name("curate"))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its waited-for children) of one run of `cmd`."""
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return elapsed, _children_cpu() - cpu0


def row_memory(manifest_csv: Path) -> dict[str, float]:
    """Bytes per manifest row: as the dicts the engines yield (held by scan() before the merge) and as a DataFrame."""
    import pandas as pd

    frame = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    for col in ("bytes", "width", "height"):
        frame[col] = frame[col].astype(int)
    for col in ("blur", "brightness", "contrast", "entropy"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    # fresh objects (not shared with `frame`), keyed like scan()'s rows_by_key
    rows = {(f"{r['filepath']}#", int(r["bytes"]) + 1, i): {k: (v + "#" if isinstance(v, str) else v)
                                                          for k, v in r.items()}
            for i, r in enumerate(frame.to_dict("records"))}
    per_dict = (tracemalloc.get_traced_memory()[0] - before) / len(rows)
    tracemalloc.stop()
    del rows
    return {"bytes_per_row_as_dicts": round(per_dict),
            "bytes_per_row_as_dataframe": round(frame.memory_usage(deep=True).sum() / len(frame))}


def _import_scan() -> None:
    import curate.scan  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "flower_photos"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = ap.parse_args()
    from distributed import Client, LocalCluster

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")
    for path in Path(args.data).rglob("*"):  # warm the page cache so no contender pays for the disk
        if path.is_file():
            path.read_bytes()

    tmp = Path(tempfile.mkdtemp(prefix="dask_bench_"))
    names = ["local", "dask", "dask-warm"]
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    inside: dict[str, list[float]] = {k: [] for k in names}
    same = True
    try:
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=40) as cluster:
            with Client(cluster) as client:  # warm: the workers import the scan before the clock starts
                client.run(_import_scan)
            for rep in range(args.repeats):
                for name in names:
                    out = tmp / f"{name}{rep}"
                    cmd = [CURATE, "scan", args.data, "--out", str(out), "--workers", str(args.workers), "-q"]
                    if name != "local":
                        cmd += ["--engine", "dask"]
                    if name == "dask-warm":
                        cmd += ["--scheduler", cluster.scheduler_address]
                    w, c = _timed(cmd)
                    wall[name].append(w)
                    cpu[name].append(c)
                    inside[name].append(json.loads((out / "scan.json").read_text())["seconds"])
                    if name != "local":
                        local_manifest = tmp / f"local{rep}" / "manifest.csv"
                        same &= (out / "manifest.csv").read_bytes() == local_manifest.read_bytes()
                print(f"run {rep + 1}: " + ", ".join(f"{k} {wall[k][-1]:.2f} s" for k in names), flush=True)
            # the warm cluster's workers are not children of `curate scan`: their CPU time is not in `cpu`
        files = json.loads((tmp / "local0" / "scan.json").read_text())["files"]
        memory = row_memory(tmp / "local0" / "manifest.csv")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mw = {k: statistics.median(v) for k, v in wall.items()}
    mi = {k: statistics.median(v) for k, v in inside.items()}
    local_cpu = statistics.median(cpu["local"])
    res = {
        "files": files, "workers": args.workers, "repeats": args.repeats,
        "wall_s": {k: round(v, 2) for k, v in mw.items()},
        "scan_seconds": {k: round(v, 2) for k, v in mi.items()},
        "ratio_dask_over_local": round(mw["dask"] / mw["local"], 2),
        "ratio_dask_warm_over_local": round(mw["dask-warm"] / mw["local"], 2),
        "local_cpu_s": round(local_cpu, 2),
        "local_cpu_ms_per_file": round(1000 * local_cpu / files, 2),
        "local_wall_ms_per_file": round(1000 * mi["local"] / files, 2),
        "dask_warm_wall_ms_per_file": round(1000 * mi["dask-warm"] / files, 2),
        "manifests_identical": same,
        **memory,
    }
    print(f"{files} files, {args.workers} workers, medians of {args.repeats}")
    print("              wall s   scan() s")
    for k in names:
        print(f"  {k:<10} {mw[k]:8.2f} {mi[k]:9.2f}")
    print(f"dask / local = {res['ratio_dask_over_local']:.2f} (with cluster start), "
          f"dask-warm / local = {res['ratio_dask_warm_over_local']:.2f}; manifests identical: {same}")
    print(f"local engine: {res['local_cpu_ms_per_file']:.2f} CPU ms per file; manifest row in memory: "
          f"{memory['bytes_per_row_as_dicts']} B as dicts, {memory['bytes_per_row_as_dataframe']} B as a DataFrame")
    print("RESULT " + json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
