"""Build small run folders from real photos for the export/compare/report/preview tests.

The manifest follows the scan contract (real sha256, size and pixel statistics of each photo);
flags, duplicate groups and flag-stage columns are set by the test, so each test states the
situation it checks instead of depending on what a detector happens to find.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from devtools import Page, chromium_page, console_errors
from PIL import Image

MANIFEST_COLUMNS = ["filepath", "label", "bytes", "sha256", "format", "width", "height", "mode", "phash", "dhash",
                    "blur", "brightness", "contrast", "entropy", "dup_group", "flags", "error"]


def manifest_of(data: Path) -> pd.DataFrame:
    """A scan-like manifest of every file under data/<class>/ (unreadable files get `error`)."""
    rows = []
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        rel = path.relative_to(data).as_posix()
        raw = path.read_bytes()
        row = dict(filepath=rel, label=rel.split("/")[0], bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest(),
                   format="", width=0, height=0, mode="", phash="", dhash="", blur=np.nan, brightness=np.nan,
                   contrast=np.nan, entropy=np.nan, dup_group="", flags="", error="")
        try:
            with Image.open(path) as im:
                im.load()
                gray = np.asarray(im.convert("L"), dtype=np.float32)
                row.update(format=im.format, width=im.width, height=im.height, mode=im.mode,
                           phash="0" * 16, dhash="0" * 16, blur=float(gray.var()), brightness=float(gray.mean()),
                           contrast=float(gray.std()), entropy=float(im.convert("L").entropy()))
        except Exception as exc:  # noqa: BLE001 -- any decode failure is a row with an error, as in scan
            row.update(error=f"cannot decode: {exc}", flags="not_image")
        rows.append(row)
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def write_run(run_dir: Path, data: Path, manifest: pd.DataFrame, groups: dict[str, list[str]] | None = None,
              kinds: dict[str, str] | None = None) -> Path:
    """Write manifest.csv, scan.json and duplicates.csv (first path of each group is its `keep`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest.copy()
    dup_rows = []
    for gid, paths in (groups or {}).items():
        kind = (kinds or {}).get(gid, "near")
        labels = manifest.set_index("filepath").loc[paths, "label"]
        for i, fp in enumerate(paths):
            dup_rows.append(dict(dup_group=gid, kind=kind, filepath=fp, label=labels[fp], distance=0 if i == 0 else 2,
                                 keep=i == 0))
            row = manifest["filepath"] == fp
            manifest.loc[row, "dup_group"] = gid
            flag = f"{kind}_duplicate" + (";cross_label_duplicate" if labels.nunique() > 1 else "")
            for name in flag.split(";"):
                add_flag(manifest, fp, name)
    manifest.to_csv(run_dir / "manifest.csv", index=False)
    pd.DataFrame(dup_rows, columns=["dup_group", "kind", "filepath", "label", "distance", "keep"]).to_csv(
        run_dir / "duplicates.csv", index=False)
    (run_dir / "scan.json").write_text(json.dumps({"data": str(data.resolve()), "thresholds": {}, "counts": {}}))
    return run_dir


def add_flag(manifest: pd.DataFrame, filepath: str, flag: str) -> None:
    row = manifest["filepath"] == filepath
    assert row.any(), filepath
    manifest.loc[row, "flags"] = manifest.loc[row, "flags"].map(lambda c: ";".join(filter(None, [c, flag])))


def add_flag_columns(manifest: pd.DataFrame, suggestions: dict[str, str] | None = None) -> pd.DataFrame:
    """The columns `curate flag` adds (full mode, scene measures included); `suggestions` maps filepath ->
    suggested_label."""
    from curate.scene import SCENE_COLUMNS, SCENE_COMPONENTS

    m = manifest.copy()
    m["label_quality"] = np.linspace(0.99, 0.5, len(m))
    m["lookalike_quality"] = m["label_quality"]
    for q in ("q_cleanlab", "q_knn", "q_cluster", "q_confidence", "q_features", *SCENE_COMPONENTS):
        m[q] = m["label_quality"]
    for c in SCENE_COLUMNS:
        m[c] = 0.0
    m["suggested_label"] = m["label"]
    for fp, lab in (suggestions or {}).items():
        m.loc[m["filepath"] == fp, "suggested_label"] = lab
        m.loc[m["filepath"] == fp, "label_quality"] = 0.05
    m["cluster"] = m.groupby("label").cumcount() % 2
    m["models_disagreeing"] = 0
    return m


@contextlib.contextmanager
def _loaded_page(path: Path) -> Iterator[Page]:
    """A headless chromium tab that has loaded `path` (console and log events recorded)."""
    with chromium_page() as page:
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            page.call(method)
        page.call("Page.navigate", {"url": path.resolve().as_uri()})
        page.wait_for(lambda m: m.get("method") == "Page.loadEventFired")
        yield page


def _evaluate(page: Page, expr: str):
    return page.call("Runtime.evaluate", {"expression": expr, "returnByValue": True})["result"]["value"]


def horizontal_overflow_px(path: Path) -> int:
    """How many pixels `path` is wider than headless chromium's default window (800 px): > 0 means the
    whole page scrolls sideways instead of the one wide table."""
    with _loaded_page(path) as page:
        return int(_evaluate(page, "document.documentElement.scrollWidth - document.documentElement.clientWidth"))


def open_in_chromium(path: Path) -> tuple[list[tuple[str, bool]], list[str]]:
    """Load `path` in headless Debian chromium; return (images as (src prefix, loaded?), console errors)."""
    with _loaded_page(path) as page:
        expr = ("JSON.stringify(Array.from(document.images).map(i => "
                "[i.getAttribute('src').slice(0, 40), i.complete && i.naturalWidth > 0]))")
        images = [tuple(x) for x in json.loads(_evaluate(page, expr))]
        return images, console_errors(page.events)
