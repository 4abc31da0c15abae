"""`curate preview`: contact sheets, like a photographer's proof sheet, for a quick look without the App.

One set of sheets per class (`--by label`), per issue flag (`--by flag`) or per visual cluster within
a class (`--by cluster`): PNG grids of numbered thumbnails under `<run>/sheets/<by>/`, and beside each
group a CSV mapping every number to its file (`number, sheet, filepath, label, flags`, plus
`label_quality` and `suggested_label` when flagged), so "roses #37" leads straight to the file.
Flagged photos come worst first (lowest `label_quality`); duplicate groups sit next to each other.
"""

from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from curate.io import (
    CurateError,
    atomic_path,
    atomic_write_csv,
    data_root_of,
    flags_of,
    open_upright,
    read_manifest,
    resolve_run_dir,
    safe_relpath,
)

log = logging.getLogger("curate.preview")

BY_CHOICES = ("label", "flag", "cluster")


@dataclass(frozen=True)
class SheetConfig:
    """Layout of one contact sheet."""

    columns: int = 10
    rows: int = 10  # 100 photos per sheet: big enough to scan a class in a few pages
    thumb: int = 128  # thumbnail side in pixels (photos are fitted, not cropped)
    gap: int = 4
    workers: int = min(4, os.cpu_count() or 1)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "unnamed"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def thumbnail(path: Path, side: int) -> Image.Image | None:
    """The photo fitted into a `side` x `side` box (RGB), or None when it cannot be decoded."""
    try:
        im = open_upright(path, draft=side)
        im.thumbnail((side, side))
        return im
    except Exception as exc:  # noqa: BLE001 -- any undecodable file becomes a grey cell, never a crash
        log.debug("%s: no thumbnail (%s)", path, exc)
        return None


def draw_sheet(cells: list[tuple[int, Image.Image | None]], config: SheetConfig) -> Image.Image:
    """A grid of numbered thumbnails; `cells` are (number, image or None for unreadable)."""
    c = config
    n_rows = max(1, math.ceil(len(cells) / c.columns))
    cols = min(c.columns, max(1, len(cells)))
    sheet = Image.new("RGB", (cols * (c.thumb + c.gap) + c.gap, n_rows * (c.thumb + c.gap) + c.gap), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = _font(max(10, c.thumb // 8))
    for k, (number, im) in enumerate(cells):
        x = c.gap + (k % c.columns) * (c.thumb + c.gap)
        y = c.gap + (k // c.columns) * (c.thumb + c.gap)
        if im is None:
            draw.rectangle([x, y, x + c.thumb - 1, y + c.thumb - 1], fill=(90, 90, 90))
            draw.text((x + 6, y + c.thumb // 2), "unreadable", fill=(255, 255, 255), font=font)
        else:
            sheet.paste(im, (x + (c.thumb - im.width) // 2, y + (c.thumb - im.height) // 2))
        box = draw.textbbox((x + 3, y + 2), str(number), font=font)
        draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=(0, 0, 0))
        draw.text((x + 3, y + 2), str(number), fill=(255, 235, 120), font=font)
    return sheet


def _groups(manifest: pd.DataFrame, by: str) -> dict[str, pd.DataFrame]:
    """The photos of each sheet set, in display order."""
    m = manifest
    if "label_quality" in m.columns:
        m = m.assign(_q=pd.to_numeric(m["label_quality"], errors="coerce").fillna(1.0))
    else:
        m = m.assign(_q=1.0)
    if by == "label":
        return {str(k): g.sort_values("filepath") for k, g in m.groupby("label", sort=True)}
    if by == "flag":
        out: dict[str, pd.DataFrame] = {}
        names = sorted({f for cell in m["flags"] for f in flags_of(cell)})
        for name in names:
            g = m[m["flags"].map(lambda cell, n=name: n in flags_of(cell))]
            # duplicates: members of a group side by side; everything else: most suspicious first
            keys = ["dup_group", "filepath"] if name.endswith("duplicate") and "dup_group" in g else ["_q", "filepath"]
            out[name] = g.sort_values(keys)
        return out
    if by == "cluster":
        if "cluster" not in m.columns:
            raise CurateError("the manifest has no `cluster` column; run `curate flag` first")
        m = m[m["cluster"].notna() & (m["cluster"].astype(str) != "")]
        return {f"{lab}_cluster{_cluster_id(cl)}": g.sort_values(["_q", "filepath"])
                for (lab, cl), g in m.groupby(["label", "cluster"], sort=True)}
    raise CurateError(f"--by must be one of {', '.join(BY_CHOICES)} (got {by!r})")


def _cluster_id(value: object) -> str:
    try:
        return str(int(float(value)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return safe_name(str(value))


def write_sheets(manifest: pd.DataFrame, data_root: Path, out_dir: Path, by: str = "label",
                 config: SheetConfig = SheetConfig(), progress: bool = False) -> list[Path]:
    """Write the contact sheets (PNG) and number->file CSVs of every group; return the PNG paths."""
    groups = _groups(manifest, by)
    per_sheet = config.columns * config.rows
    paths: list[Path] = []
    pool = ThreadPoolExecutor(max_workers=config.workers)  # PIL decodes without holding the GIL
    try:
        for name, rows in groups.items():
            stem = safe_name(name)
            for old in out_dir.glob(f"{stem}_p*.png"):  # a group that shrank leaves no stale pages
                old.unlink()
            files = [safe_relpath(data_root, fp) for fp in rows["filepath"]]
            thumbs = list(pool.map(lambda p: thumbnail(p, config.thumb), files))
            n_pages = max(1, math.ceil(len(rows) / per_sheet))
            table = rows.assign(number=range(1, len(rows) + 1))
            table["sheet"] = [f"{stem}_p{(k // per_sheet) + 1:02d}.png" for k in range(len(rows))]
            for page in range(n_pages):
                lo, hi = page * per_sheet, min(len(rows), (page + 1) * per_sheet)
                sheet = draw_sheet(list(zip(range(lo + 1, hi + 1), thumbs[lo:hi], strict=True)), config)
                path = out_dir / f"{stem}_p{page + 1:02d}.png"
                with atomic_path(path) as tmp:
                    sheet.save(tmp, format="PNG", optimize=True)
                paths.append(path)
            cols = ["number", "sheet", "filepath", "label", "flags"] + [
                c for c in ("label_quality", "suggested_label", "dup_group", "cluster") if c in table.columns]
            atomic_write_csv(out_dir / f"{stem}.csv", table[cols])
            if progress:
                log.info("preview: %s: %d photos on %d sheet(s)", name, len(rows), n_pages)
    finally:
        pool.shutdown()
    return paths


def preview(run: str | os.PathLike | None = None, by: str = "label", only: str | None = None,
            config: SheetConfig = SheetConfig(), progress: bool = True) -> list[Path]:
    """Contact sheets of a run under `<run>/sheets/<by>/`; `only` keeps the photos carrying that flag.

    Returns the PNG paths written.
    """
    if by not in BY_CHOICES:
        raise CurateError(f"--by must be one of {', '.join(BY_CHOICES)} (got {by!r})")
    run_dir = resolve_run_dir(run)
    manifest = read_manifest(run_dir / "manifest.csv")
    if "flags" not in manifest.columns:
        manifest["flags"] = ""
    if only:
        has = manifest["flags"].map(lambda cell: only in flags_of(cell))
        if not has.any():
            known = sorted({f for cell in manifest["flags"] for f in flags_of(cell)})
            raise CurateError(f"no photo carries the flag {only!r}; flags in this run: {', '.join(known) or 'none'}")
        manifest = manifest[has]
        if by == "flag":  # only that flag's sheets, not those of the other flags its photos carry
            manifest = manifest.assign(flags=only)
    out_dir = run_dir / "sheets" / (by if not only else f"{by}-{safe_name(only)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_sheets(manifest, data_root_of(run_dir), out_dir, by=by, config=config, progress=progress)
    log.info("preview: %d sheet(s) in %s", len(paths), out_dir)
    return paths
