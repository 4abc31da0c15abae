"""Source safety: `curate run` (scan, flag --fast, export, compare with the tiny preset, report) on a copy of real
photos leaves every file's bytes (sha256) and mtime, and every folder's listing and mtime, exactly as they were."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from badinputs import run_cli
from conftest import make_dataset


def audit(root: Path) -> dict[str, tuple]:
    """Every entry below root: files -> (sha256, size, mtime_ns, mode), folders -> ('dir', mtime_ns, listing)."""
    out: dict[str, tuple] = {".": ("dir", root.stat().st_mtime_ns, tuple(sorted(os.listdir(root))))}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath, name)
            out[p.relative_to(root).as_posix()] = ("dir", p.stat().st_mtime_ns, tuple(sorted(os.listdir(p))))
        for name in filenames:
            p = Path(dirpath, name)
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size,
                                                   st.st_mtime_ns, st.st_mode)
    return out


def test_curate_run_never_writes_to_the_photos(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "flowers", per_class=8)
    before = audit(data)
    assert sum(1 for v in before.values() if v[0] != "dir") == 40
    rc, out, err = run_cli(["run", str(data), "--out", str(tmp_path / "run"), "--fast", "--preset", "tiny",
                            "--seeds", "1", "-q"])
    assert rc == 0, err
    run = tmp_path / "run"
    for name in ("manifest.csv", "cleaned.csv", "compare.json", "index.html"):
        assert (run / name).exists(), name  # every stage ran, including the two trainings
    assert audit(data) == before
    # the run folder and the image cache are the only places written
    assert not any(p.is_relative_to(data) for p in (run, tmp_path / "cache"))
