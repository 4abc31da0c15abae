"""Manifest -> checked rows -> splits -> cached uint8 image arrays.

Each JPEG is decoded once per (content, size): `load_images` keeps the resized uint8 pixels in an
on-disk cache keyed by the file's sha256 and the target size, and uses the JPEG decoder's reduced-size
(DCT-scaled) decode, so a 2,900-photo dataset loads in about a second after the first run. Training then
feeds plain numpy arrays to `model.fit` -- no per-image Python work in the hot loop.

Public API (also used by curate's K-fold scoring):
    check_manifest(df, data_root) -> df            raise CurateError on unusable input
    assign_splits(df, seed=0) -> df                stratified 80/10/10 `split` column, existing kept,
                                                   duplicate groups together
    stratified_sample(df, n, seed=0) -> df
    load_images(df, data_root, size, progress) -> (uint8 array (N, size, size, 3), ok mask (N,))
    decode_image(path, size) -> uint8 array (size, size, 3)
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from curate.io import DECODE_VERSION, CurateError, atomic_save_npy, open_upright, safe_relpath, sha256_of

log = logging.getLogger("curate.train")

SPLITS = ("train", "val", "test")


def cache_root() -> Path:
    """Where resized images (and curate.pretrained's converted network) are cached: $CURATE_CACHE, else
    ~/.cache/curate."""
    return Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate")


def check_manifest(df: pd.DataFrame, data_root: str | os.PathLike, name: str = "manifest") -> pd.DataFrame:
    """Refuse a manifest training cannot use, before any work: missing filepath/label columns, an empty or
    escaping path, or a class with fewer than 2 images (rows whose split is not train/val/test are ignored).

    Returns the rows to use (index reset), with `label` as str.
    """
    missing = [c for c in ("filepath", "label") if c not in df.columns]
    if missing:
        raise CurateError(f"{name}: lacks required column(s) {', '.join(missing)} (needs filepath, label)")
    df = usable_rows(df)
    if df.empty:
        raise CurateError(f"{name}: no rows to train on")
    if df["label"].isna().any() or (df["label"].astype(str).str.strip() == "").any():
        bad = df.loc[df["label"].isna() | (df["label"].astype(str).str.strip() == ""), "filepath"].iloc[0]
        raise CurateError(f"{name}: {bad}: empty label")
    root = Path(data_root)
    for rel in df["filepath"]:
        safe_relpath(root, rel if isinstance(rel, str) else "")
    df = df.assign(label=df["label"].astype(str))
    counts = df["label"].value_counts()
    small = counts[counts < 2]
    if len(small):
        detail = ", ".join(f"{c} ({n})" for c, n in small.items())
        raise CurateError(f"{name}: every class needs at least 2 images; too few in: {detail}")
    return df


def usable_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows training may use: all rows, or, when a `split` column exists, rows whose split is empty
    (to be assigned) or one of train/val/test -- anything else (e.g. `excluded`) is neither trained
    nor evaluated."""
    if "split" not in df.columns:
        return df.reset_index(drop=True)
    split = df["split"].fillna("").astype(str).str.strip()
    return df[split.isin(("",) + SPLITS)].assign(split=split).reset_index(drop=True)


def _rank_key(seed: int, key: str) -> str:
    # Per-key hash order: the same photo tends to land in the same split in every manifest that holds
    # it (raw vs cleaned), unlike a global shuffle whose order depends on every other row.
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def assign_splits(df: pd.DataFrame, seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> pd.DataFrame:
    """A copy of `df` with a deterministic, per-class stratified `split` column (train/val/test).

    Rows that already have a split keep it; only empty ones are assigned. Duplicate groups (`dup_group`,
    when the manifest has it) go to one split together, so a photo's copy is never trained on while the
    photo is tested. Within each class, keys (a group, or a file) are ordered by a seeded hash of the key,
    so the split depends only on the rows' content and the seed, not on row order, and a photo tends to
    keep its split when other rows are removed (raw vs cleaned). Each class with at least 3 new keys gets
    at least one val and one test key; with 2, one train and one test.
    """
    out = df.copy()
    if "split" not in out.columns:
        out["split"] = ""
    out["split"] = out["split"].fillna("").astype(str).str.strip()
    todo = out[out["split"] == ""]
    groups = todo["dup_group"].fillna("").astype(str) if "dup_group" in todo.columns else pd.Series("", todo.index)
    key = np.where(groups != "", "group:" + groups, "file:" + todo["filepath"].astype(str))
    # A group is stratified under its alphabetically first label, whatever the row order.
    first = pd.DataFrame({"key": key, "label": todo["label"].astype(str)}).sort_values(["key", "label"])
    split_of_key: dict[str, str] = {}
    _, f_val, f_test = fractions
    for _, keys in first.drop_duplicates("key").groupby("label", sort=True)["key"]:
        ranked = sorted(keys, key=lambda k: _rank_key(seed, k))
        n = len(ranked)
        n_test = max(1, round(f_test * n)) if n >= 2 else 0
        n_val = max(1, round(f_val * n)) if n >= 3 else 0
        for k, name in enumerate(ranked):
            split_of_key[name] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    out.loc[todo.index, "split"] = [split_of_key[k] for k in key]
    return out


def classes_never_trained(df: pd.DataFrame) -> list[str]:
    """Classes with photos but none that training may use: every photo sits in a val or test split the
    dataset set (MVTec AD's defects are in test/ only). A model trained on that split cannot learn them.
    Rows without a split count as trainable (assign_splits gives each class training photos)."""
    split = df["split"].fillna("").astype(str).str.strip() if "split" in df.columns else pd.Series("", df.index)
    labels = df["label"].astype(str)
    return sorted(set(labels) - set(labels[split.isin(("", "train"))]))


def stratified_sample(df: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """About `n` rows keeping class proportions (at least 2 per class); deterministic for a seed."""
    if n >= len(df):
        return df
    frac = n / len(df)
    parts = [g.sample(n=min(len(g), max(2, round(frac * len(g)))), random_state=seed)
             for _, g in df.groupby("label", sort=True)]
    return pd.concat(parts).sort_index()


def decode_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode an image to RGB uint8 (size, size, 3), squashed like the blog post's cv2.resize.

    `draft` asks the JPEG decoder for a 1/2, 1/4 or 1/8 scale decode no smaller than the target, which
    is several times faster than a full decode followed by a resize.
    """
    im = open_upright(path, draft=size).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _load_one(path: Path, sha: str | None, size: int, cache: Path) -> np.ndarray:
    sha = sha or sha256_of(path)
    cached = cache / f"{size}-v{DECODE_VERSION}" / sha[:2] / f"{sha}.npy"
    if cached.exists():
        try:
            arr = np.load(cached)
            if arr.shape == (size, size, 3) and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass  # a damaged cache entry: decode again and overwrite it
    arr = decode_image(path, size)
    atomic_save_npy(cached, arr)
    return arr


def load_images(
    df: pd.DataFrame, data_root: str | os.PathLike, size: int, progress: bool = False,
    cache_dir: str | os.PathLike | None = None, workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images of `df` (rows: `filepath` relative to `data_root`, optional `sha256`) as one uint8 array.

    Returns (images (N, size, size, 3) uint8 in row order, ok (N,) bool). Unreadable files get a warning
    naming them, zeros in `images` and False in `ok`; callers drop them. Decoded, resized pixels are cached
    under `cache_dir` (default `cache_root()`) as <size>-v<DECODE_VERSION>/<sha256[:2]>/<sha256>.npy.
    """
    root = Path(data_root)
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "images"
    paths = [safe_relpath(root, rel) for rel in df["filepath"]]
    shas: list[str | None] = [None] * len(df)
    if "sha256" in df.columns:
        shas = [s if isinstance(s, str) and len(s) == 64 else None for s in df["sha256"]]
    images = np.zeros((len(df), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(df), dtype=bool)

    def work(i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, _load_one(paths[i], shas[i], size, cache), ""
        except Exception as exc:  # noqa: BLE001 -- any decoder failure means "unreadable", reported below
            return i, None, f"{type(exc).__name__}: {exc}"

    n_workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(n_workers) as pool:
        results = pool.map(work, range(len(df)))
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(df), desc=f"images {size}px", unit="img", leave=False)
        for i, arr, err in results:
            if arr is None:
                log.warning("skipping unreadable image %s (%s)", df["filepath"].iloc[i], err)
            else:
                images[i] = arr
                ok[i] = True
    return images, ok


def class_names(df: pd.DataFrame) -> list[str]:
    """Sorted class names: the column order of every probability array."""
    return sorted(df["label"].astype(str).unique())
