"""A corpus of bad inputs, generated from real photos into a temporary folder (nothing binary is committed).

`make_bad_dataset(root)` writes DATA/<class>/... mixing a few good real photos with every kind of bad
file the reliability tests feed to each command, and returns what each bad entry is (`BadEntry`): the
path relative to DATA, what it is, and what `curate scan` should make of it (a flag and an error, a
readable row, or a skip with a reason). `bad_manifests(run_dir, data)` writes manifest CSVs that are
wrong in the ways a hand-edited manifest goes wrong.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import real_photos
from PIL import Image

CLASSES = ["daisy", "roses", "tulips"]


@dataclass(frozen=True)
class BadEntry:
    path: str  # relative to DATA (POSIX)
    what: str  # a few words for the reliability table
    outcome: str  # "row" (readable), "error" (a row with an error), "skipped" (left out, with a reason on stderr),
    # "ignored" (left out silently: hidden files, other extensions)
    flag: str = ""  # for "error": the scan flag it must carry; for "row": a flag it must carry (or "")


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height pixels (a decompression bomb as far as the header goes)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _jpeg_claiming(photo: Path, width: int, height: int) -> bytes:
    """A real JPEG whose SOF marker claims width x height pixels."""
    data = bytearray(photo.read_bytes())
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        i = data.find(marker)
        if i >= 0:
            data[i + 5: i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise AssertionError(f"{photo}: no SOF marker")


def _with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def make_bad_dataset(root: Path, outside: Path, good_per_class: int = 4, self_link: bool = True) -> list[BadEntry]:
    """Write the bad-input dataset at `root` (classes daisy, roses, tulips + `lonely` with one photo).

    `outside` is a folder beside DATA that symlinks point into (it gets one photo). Returns the bad
    entries; the good photos are `good_per_class` real photos per class.
    """
    photos = real_photos(good_per_class + 4, CLASSES)
    by_class = {c: [p for p in photos if p.parent.name == c] for c in CLASSES}
    for c in CLASSES:
        for src in by_class[c][:good_per_class]:
            (root / c).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / c / src.name)
    spare = [p for c in CLASSES for p in by_class[c][good_per_class:]]
    d, r, t = root / "daisy", root / "roses", root / "tulips"
    raw = spare[0].read_bytes()
    im = Image.open(spare[1]).convert("RGB")
    entries: list[BadEntry] = []

    def add(path: Path, what: str, outcome: str, flag: str = "") -> None:
        entries.append(BadEntry(path.relative_to(root).as_posix(), what, outcome, flag))

    (d / "zero.jpg").write_bytes(b"")
    add(d / "zero.jpg", "zero-byte .jpg", "error", "corrupt")
    for cut in (2, 300, len(raw) // 2, len(raw) - 2):
        p = d / f"truncated_{cut}.jpg"
        p.write_bytes(raw[:cut])
        add(p, f"JPEG cut at byte {cut} of {len(raw)}", "error", "corrupt|truncated")
    rng = np.random.default_rng(7)
    (d / "garbage.jpg").write_bytes(b"GARBAGE!" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    add(d / "garbage.jpg", "random bytes named .jpg", "error", "not_image")
    im.save(r / "png_named.jpg", "PNG")
    add(r / "png_named.jpg", "PNG with a .jpg extension", "row")
    im.convert("CMYK").save(r / "cmyk.jpg", "JPEG")
    add(r / "cmyk.jpg", "CMYK JPEG", "row")
    Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257).save(r / "deep16.png")
    add(r / "deep16.png", "16-bit greyscale PNG", "row", "grayscale")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(t / "one_pixel.png")
    add(t / "one_pixel.png", "1x1 PNG", "row", "tiny")
    (t / "bomb.png").write_bytes(png_claiming(20_000, 20_000))
    add(t / "bomb.png", "PNG header claiming 20000x20000", "error", "corrupt")
    (t / "bomb.jpg").write_bytes(_jpeg_claiming(spare[2], 20_000, 20_000))
    add(t / "bomb.jpg", "JPEG header claiming 20000x20000", "error", "corrupt")
    for orientation in (3, 6, 8):
        p = t / f"exif_orientation_{orientation}.jpg"
        p.write_bytes(_with_orientation(im, orientation))
        add(p, f"EXIF orientation {orientation}", "row")
    for i, name in enumerate(("café ünïcode.jpg", "with space.jpg", "new\nline.jpg", 'comma,"quote".jpg')):
        shutil.copyfile(spare[8 + i], d / name)
        add(d / name, f"name {name!r}", "row")
    nested = d / "sub" / "deeper"
    nested.mkdir(parents=True)
    shutil.copyfile(spare[4], nested / "nested.jpg")
    add(nested / "nested.jpg", "photo in a nested sub-folder", "row")
    (root / "lonely").mkdir()
    shutil.copyfile(spare[5], root / "lonely" / "only.jpg")
    add(root / "lonely" / "only.jpg", "class folder with one photo", "row")

    outside.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spare[6], outside / "outside.jpg")
    (r / "link_outside.jpg").symlink_to(outside / "outside.jpg")
    add(r / "link_outside.jpg", "symlink to a photo outside DATA", "skipped")
    if self_link:
        (r / "link_self.jpg").symlink_to("link_self.jpg")
        add(r / "link_self.jpg", "symlink to itself", "skipped")
    (root / "linked_class").symlink_to(outside, target_is_directory=True)
    add(root / "linked_class", "class folder that is a symlink out of DATA", "skipped")
    shutil.copyfile(spare[7], d / ".hidden.jpg")
    add(d / ".hidden.jpg", "hidden file (.name)", "ignored")
    (d / "notes.txt").write_text("not an image extension")
    add(d / "notes.txt", "non-image extension (.txt)", "ignored")
    shutil.copyfile(spare[7], root / "loose.jpg")
    add(root / "loose.jpg", "photo outside any class folder", "skipped")
    return entries


def make_exif_pair(root: Path) -> tuple[str, str]:
    """Two files showing the same picture: pixels rotated, and unrotated pixels + EXIF orientation 6."""
    src = real_photos(1, ["daisy"])[0]
    im = Image.open(src).convert("RGB")
    (root / "daisy").mkdir(parents=True, exist_ok=True)
    im.transpose(Image.Transpose.ROTATE_270).save(root / "daisy" / "rotated_pixels.jpg", quality=90)
    (root / "daisy" / "exif_rotated.jpg").write_bytes(_with_orientation(im, 6))
    return "daisy/rotated_pixels.jpg", "daisy/exif_rotated.jpg"


def bad_manifests(manifest: pd.DataFrame, data: Path, out: Path) -> dict[str, Path]:
    """Manifest CSVs that are wrong in one way each, written under `out`; name -> path."""
    out.mkdir(parents=True, exist_ok=True)
    good = manifest[manifest["error"].fillna("") == ""].reset_index(drop=True)
    cases: dict[str, pd.DataFrame | bytes] = {
        "missing_label": good.drop(columns=["label"]),
        "missing_filepath": good.drop(columns=["filepath"]),
        "duplicate_rows": pd.concat([good, good.iloc[:3]], ignore_index=True),
        "dotdot_path": _with_path(good, "../" + data.name + "_outside/outside.jpg"),
        "absolute_path": _with_path(good, str((data.parent / "elsewhere.jpg").resolve())),
        "unknown_label": _with_label(good, "weeds"),
        "empty_label": _with_label(good, ""),
        "garbage": b"\x89\x00\xff\xfe not a csv \x00\x01" * 50,
        "empty_file": b"",
    }
    paths = {}
    for name, value in cases.items():
        p = out / f"{name}.csv"
        if isinstance(value, bytes):
            p.write_bytes(value)
        else:
            value.to_csv(p, index=False)
        paths[name] = p
    return paths


def _with_path(df: pd.DataFrame, path: str) -> pd.DataFrame:
    df = df.copy()
    df.loc[0, "filepath"] = path
    return df


def _with_label(df: pd.DataFrame, label: str) -> pd.DataFrame:
    df = df.copy()
    df.loc[0, "label"] = label
    return df


def outside_of(root: Path) -> Path:
    """The folder beside DATA that the corpus's symlinks point into."""
    return root.parent / (root.name + "_outside")


def curate(*args: str) -> subprocess.CompletedProcess:
    """`curate ARGS` as a separate process (exit codes as a shell sees them; environment as the caller's)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "curate.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`curate ARGS` in this process: (exit code, stdout, stderr), with logging and progress captured."""
    import contextlib

    from curate import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(args)
        except SystemExit as exc:  # argparse usage errors
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()
