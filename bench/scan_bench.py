"""Speed of `curate scan` against a plain imagehash loop and against the decode-only floor, side by side.

Usage: .venv/bin/python bench/scan_bench.py [DATA] [--repeats 3] [--workers N]

Each contender runs as its own process (so interpreter start and imports count for all of
them), in rotation, `--repeats` times; medians are printed with the ratios:
  scan   the whole `curate scan DATA --out <fresh folder> -q` process, cold cache
  warm   the same again on the folder the last cold run left (every file from the cache)
  (a)    a plain loop: PIL.Image.open + imagehash.phash + imagehash.dhash over every file, one core
  (b)    the floor: reduced-size decoding (JPEG draft to the scan's decode size) of every file on
         all cores, and nothing else
Targets (issue 2): scan >= 3x faster than (a), scan within 1.5x of (b), warm >= 10x faster than scan.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CURATE = str(Path(PYTHON).with_name("curate"))

PLAIN_LOOP = """
import os, sys, time
from PIL import Image
import imagehash
root = sys.argv[1]
exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if os.path.splitext(f)[1].lower() in exts]
t0 = time.perf_counter()
for path in files:
    with Image.open(path) as im:
        imagehash.phash(im), imagehash.dhash(im)
print(f"loop {time.perf_counter() - t0:.3f} s for {len(files)} files")
"""

DECODE_FLOOR = """
import multiprocessing, os, sys, time
from PIL import Image
root, size, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

def decode(path):
    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        im.load()
        return im.size

if __name__ == "__main__":
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
             if os.path.splitext(f)[1].lower() in exts]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        n = sum(1 for _ in pool.imap_unordered(decode, files, chunksize=max(1, len(files) // (workers * 8))))
    print(f"decode {time.perf_counter() - t0:.3f} s for {n} files")
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its workers, stdout) of one run of `cmd`."""
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return elapsed, _children_cpu() - cpu0, proc.stdout.strip()


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}; {os.cpu_count()} cores; python {platform.python_version()}; load average {load}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "flower_photos"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from curate.scan import ScanConfig

    decode_size = ScanConfig().decode_size
    print(f"machine: {_machine()}")
    print(f"data: {args.data}; workers: {args.workers}; decode size: {decode_size}; repeats: {args.repeats}")
    for path in Path(args.data).rglob("*"):  # warm the page cache so no contender pays for the disk
        if path.is_file():
            path.read_bytes()

    tmp = Path(tempfile.mkdtemp(prefix="scan_bench_"))
    names = ["scan", "warm", "a", "b"]
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    inside: dict[str, list[float]] = {"scan": [], "warm": []}  # scan()'s own time, from scan.json
    notes: dict[str, str] = {}
    try:
        for rep in range(args.repeats):
            out = tmp / f"run{rep}"
            scan_cmd = [CURATE, "scan", args.data, "--out", str(out), "--workers", str(args.workers), "-q"]
            commands = {
                "scan": scan_cmd,
                "warm": scan_cmd,
                "a": [PYTHON, "-c", PLAIN_LOOP, args.data],
                "b": [PYTHON, "-c", DECODE_FLOOR, args.data, str(decode_size), str(args.workers)],
            }
            for name in names:
                w, c, notes[name] = _timed(commands[name])
                wall[name].append(w)
                cpu[name].append(c)
                if name in inside:
                    inside[name].append(json.loads((out / "scan.json").read_text())["seconds"])
            print(f"run {rep + 1}: " + ", ".join(f"{k} {wall[k][-1]:.2f} s" for k in names), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mw = {k: statistics.median(v) for k, v in wall.items()}
    mc = {k: statistics.median(v) for k, v in cpu.items()}
    mi = {k: statistics.median(v) for k, v in inside.items()}
    print(f"\nmachine at the end: {_machine()}")
    print("medians over the runs        wall s    CPU s (process + workers)")
    print(f"  curate scan, cold cache    {mw['scan']:7.2f}  {mc['scan']:7.2f}   (scan() itself: {mi['scan']:.2f} s)")
    print(f"  curate scan, warm cache    {mw['warm']:7.2f}  {mc['warm']:7.2f}   (scan() itself: {mi['warm']:.2f} s)")
    print(f"  (a) plain imagehash loop   {mw['a']:7.2f}  {mc['a']:7.2f}   ({notes.get('a', '')})")
    print(f"  (b) reduced decode floor   {mw['b']:7.2f}  {mc['b']:7.2f}   ({notes.get('b', '')})")
    print("ratios (wall time of whole processes):")
    print(f"  (a) / scan  = {mw['a'] / mw['scan']:5.2f}   times faster than the plain loop (target >= 3)")
    print(f"  scan / (b)  = {mw['scan'] / mw['b']:5.2f}   times the decode-only floor (target <= 1.5)")
    print(f"  scan / warm = {mw['scan'] / mw['warm']:5.2f}   times faster when re-scanned (target >= 10)")
    print("same ratios in CPU time (insensitive to other load; (a) uses one core, the others all):")
    print(f"  (a) / scan  = {mc['a'] / mc['scan']:5.2f}   scan / (b) = {mc['scan'] / mc['b']:5.2f}   "
          f"scan / warm = {mc['scan'] / mc['warm']:5.2f}")
    print(f"scan() itself, cold / warm = {mi['scan'] / mi['warm']:.1f}x (without interpreter start and imports)")


if __name__ == "__main__":
    main()
