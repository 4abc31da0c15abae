"""Shared fixtures: real photos from ../shared/flower_photos, copied into temporary datasets."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CURATE_SHARED", ROOT.parent / "shared"))
FLOWERS = SHARED / "flower_photos"
CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def real_photos(per_class: int, classes: list[str] | None = None) -> list[Path]:
    """The first `per_class` photos (sorted by name) of each class in the shared dataset."""
    if not FLOWERS.is_dir():
        pytest.fail(f"{FLOWERS} is missing: the tests need the shared real photos beside the checkout")
    out: list[Path] = []
    for c in classes or CLASSES:
        out += sorted((FLOWERS / c).glob("*.jpg"))[:per_class]
    return out


def make_dataset(root: Path, per_class: int, classes: list[str] | None = None) -> Path:
    """Copy real photos into `root/<class>/` and return `root`."""
    for src in real_photos(per_class, classes):
        dst = root / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return root


def inspection_shots(root: Path, per_class: int = 12) -> Path:
    """Visual inspection in miniature: one real photo as the part on its fixture, shot again and again
    (shifted a few pixels, exposure and sensor noise varying); the `scratch` shots have a scratch drawn on."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    base = Image.open(real_photos(1, ["daisy"])[0]).convert("RGB").resize((320, 240))
    for cls in ("good", "scratch"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            dx, dy = (int(v) for v in rng.integers(-6, 7, 2))
            shot = base.transform(base.size, Image.AFFINE, (1, 0, dx, 0, 1, dy))
            pixels = np.asarray(shot, float) * rng.uniform(0.9, 1.1) + rng.normal(0, 4, (240, 320, 3))
            shot = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            if cls == "scratch":
                x, y = (int(v) for v in rng.integers(40, 200, 2))
                ImageDraw.Draw(shot).line([(x, y), (x + 30, y + 8)], fill=(255, 255, 255), width=2)
            shot.save(root / cls / f"{i:02d}.png")
    return root


def tree_fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file below root: to prove a command never wrote there."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """A dataset of 6 real photos per class (30 JPEGs) in a temporary folder."""
    return make_dataset(tmp_path / "flowers", per_class=6)


@pytest.fixture(autouse=True)
def _isolate_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test from a temporary working directory so reports/ of the checkout stays untouched."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FIFTYONE_DO_NOT_TRACK", "true")
    monkeypatch.setenv("MPLBACKEND", "Agg")
