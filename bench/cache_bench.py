"""Saving a per-photo cache while it fills: the whole file after every chunk (before) vs a journal part per chunk.

Usage: .venv/bin/python bench/cache_bench.py [--sizes 3000 20000] [--repeats 3] [--dir DIR]

`curate flag` caches the pretrained network's embeddings (`<run>/cache/mobilenet_v2.npz`, 1,600 float32 per
photo) and the scene measures (`scene.csv`) and saves them after every chunk of photos, so an interrupted run
keeps what it computed. Before, each save rewrote the whole file: O(N^2) bytes for N photos. Now each chunk is
written once as a journal part (`curate.io.append_journal`) and the parts are merged into the file once at the
end (`compact_journal`). This fills an embeddings cache of N synthetic photos, CHUNK at a time, both ways, with
the embeddings module's own writer, and prints seconds and bytes written (medians of --repeats), their ratios,
and the machine. Embedding the photos themselves (about 60 ms a photo on 2 cores) is not part of it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate import pretrained  # noqa: E402
from curate.io import append_journal, atomic_path, compact_journal, journal_parts, read_journaled  # noqa: E402


def fill_rewriting(path: Path, keys: list[str], rows: np.ndarray, chunk: int) -> int:
    """Before: the whole cache written again after every chunk. Returns bytes written."""
    known: dict[str, np.ndarray] = {}
    written = 0
    for start in range(0, len(keys), chunk):
        known.update(zip(keys[start:start + chunk], rows[start:start + chunk], strict=True))
        with atomic_path(path) as tmp:
            pretrained._write(tmp, known)
            written += tmp.stat().st_size
    return written


def fill_journal(path: Path, keys: list[str], rows: np.ndarray, chunk: int) -> int:
    """Now: each chunk written once as a journal part, merged into the cache file at the end."""
    known: dict[str, np.ndarray] = {}
    written = 0
    for start in range(0, len(keys), chunk):
        new = dict(zip(keys[start:start + chunk], rows[start:start + chunk], strict=True))
        known.update(new)
        written += append_journal(path, new, pretrained._write).stat().st_size
    compact_journal(path, known, pretrained._write)
    return written + path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3000, 20000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the caches are written (default: a temporary folder)")
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} ({platform.processor() or 'cpu'}), "
          f"python {platform.python_version()}, numpy {np.__version__}; chunk {pretrained.CHUNK} photos, "
          f"{pretrained.WIDTH} float32 each; medians of {args.repeats}")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        keys = [f"class/{i:09d}.jpg|{i:064x}|v2.d2" for i in range(n)]
        rows = rng.random((n, pretrained.WIDTH), dtype=np.float32)
        results = {}
        for name, fill in (("rewrite", fill_rewriting), ("journal", fill_journal)):
            seconds, written = [], 0
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                    path = Path(tmp) / "mobilenet_v2.npz"
                    t0 = time.perf_counter()
                    written = fill(path, keys, rows, pretrained.CHUNK)
                    seconds.append(time.perf_counter() - t0)
                    back = read_journaled(path, pretrained._read)
                    assert len(back) == n and not journal_parts(path)  # everything is in the one file
                    assert np.array_equal(back[keys[-1]], rows[-1])
            results[name] = (statistics.median(seconds), written)
            print(f"n={n} {name}: {results[name][0]:.2f} s, {written / 2**20:.0f} MiB written", flush=True)
        (t_old, b_old), (t_new, b_new) = results["rewrite"], results["journal"]
        print(f"n={n} ratio rewrite/journal: time {t_old / t_new:.1f}x, bytes {b_old / b_new:.1f}x")


if __name__ == "__main__":
    main()
