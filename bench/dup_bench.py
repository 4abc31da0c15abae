"""Scaling of near-duplicate grouping (multi-index hashing + union-find) on synthetic pHashes.

Usage: .venv/bin/python bench/dup_bench.py [--sizes 10000 100000 1000000] [--distance 8] [--repeats 1]

Synthetic hashes look like real pHashes (64 bits, exactly 32 set: the median split guarantees it),
and a tenth of them are planted near copies (a few bits flipped) so there is something to group.
For the smallest size it also times the all-pairs comparison the index replaces, and checks that
both find the same groups. Prints the machine, the chosen number of chunks and medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curate.duplicates import _plan, near_pairs, union_find_groups  # noqa: E402


def synthetic_phashes(n: int, distance: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.uint64)
    weights = (np.uint64(1) << np.arange(64, dtype=np.uint64))
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        bits = np.argsort(rng.random((m, 64)), axis=1) < 32  # 32 of 64 bits set, at random places
        out[start:start + m] = (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    planted = rng.choice(n, size=n // 10, replace=False)
    sources = rng.integers(0, n, size=planted.size)
    flips = rng.integers(0, distance + 1, size=planted.size)
    for k, (i, j, f) in enumerate(zip(planted, sources, flips, strict=True)):
        mask = 0
        for b in rng.choice(64, size=f, replace=False):
            mask |= 1 << int(b)
        out[i] = out[j] ^ np.uint64(mask)
        del k
    return out


def group(hashes: np.ndarray, distance: int) -> tuple[np.ndarray, int]:
    pairs = near_pairs(hashes, distance)
    return union_find_groups(hashes.size, pairs), len(pairs)


def all_pairs_groups(hashes: np.ndarray, distance: int) -> np.ndarray:
    rows = []
    for start in range(0, hashes.size, 1000):
        block = hashes[start:start + 1000]
        d = np.bitwise_count(block[:, None] ^ hashes[None, :])
        i, j = np.nonzero(d <= distance)
        keep = start + i < j
        rows.append(np.stack([start + i[keep], j[keep]], axis=1))
    return union_find_groups(hashes.size, np.concatenate(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--distance", type=int, default=8, help="pHash Hamming threshold (default: the scan's 8)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per size (median reported)")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"distance <= {args.distance} bits")
    print(f"{'hashes':>10} {'chunks':>6} {'pairs':>9} {'groups':>8} {'median s':>9}")
    for n in args.sizes:
        hashes = synthetic_phashes(n, args.distance)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            roots, n_pairs = group(hashes, args.distance)
            times.append(time.perf_counter() - t0)
        n_groups = int((np.bincount(roots) > 1).sum())
        print(f"{n:>10} {_plan(n, args.distance):>6} {n_pairs:>9} {n_groups:>8} {statistics.median(times):>9.2f}",
              flush=True)
        if n <= 20_000:
            t0 = time.perf_counter()
            brute = all_pairs_groups(hashes, args.distance)
            t_brute = time.perf_counter() - t0
            same = len(set(zip(roots.tolist(), brute.tolist(), strict=True))) == len(set(roots.tolist()))
            print(f"{'':>10} all-pairs comparison: {t_brute:.2f} s, same groups: {same}", flush=True)


if __name__ == "__main__":
    main()
