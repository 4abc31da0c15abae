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
import os
import platform
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


def _timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return elapsed, proc.stdout.strip()


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
    times: dict[str, list[float]] = {"scan": [], "warm": [], "a": [], "b": []}
    notes: dict[str, str] = {}
    try:
        for rep in range(args.repeats):
            out = tmp / f"run{rep}"
            scan_cmd = [CURATE, "scan", args.data, "--out", str(out), "--workers", str(args.workers), "-q"]
            t, _ = _timed(scan_cmd)
            times["scan"].append(t)
            t, _ = _timed(scan_cmd)
            times["warm"].append(t)
            t, notes["a"] = _timed([PYTHON, "-c", PLAIN_LOOP, args.data])
            times["a"].append(t)
            t, notes["b"] = _timed([PYTHON, "-c", DECODE_FLOOR, args.data, str(decode_size), str(args.workers)])
            times["b"].append(t)
            print(f"run {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print("\nmedian wall time of the whole process (s):")
    print(f"  curate scan, cold cache          {med['scan']:7.2f}")
    print(f"  curate scan, warm cache          {med['warm']:7.2f}")
    print(f"  (a) plain imagehash loop         {med['a']:7.2f}   ({notes.get('a', '')})")
    print(f"  (b) reduced decode, all cores    {med['b']:7.2f}   ({notes.get('b', '')})")
    print("ratios:")
    print(f"  (a) / scan  = {med['a'] / med['scan']:5.2f}x faster than the plain loop   (target >= 3)")
    print(f"  scan / (b)  = {med['scan'] / med['b']:5.2f}x the decode-only floor         (target <= 1.5)")
    print(f"  scan / warm = {med['scan'] / med['warm']:5.2f}x faster when re-scanned       (target >= 10)")


if __name__ == "__main__":
    main()
