"""Representations of every photo for `curate flag`, behind one small interface.

- `features`: cheap hand-made features (colour histograms, gradient orientations, a tiny thumbnail);
  seconds, used by `--fast`.
- `keras:<Name>`: a pretrained `keras.applications` backbone with ImageNet weights (needs the weights
  cached in ~/.keras/models or a download); fails with a clear CurateError offline.
- `vit`: the project's own ViT (train/), trained K-fold: out-of-fold class probabilities and class-token
  embeddings, each photo scored by a model that never trained on it. Resumable per fold.

Decoded images are cached per run and size (`<run>/cache/images_<size>.npy`) so a rerun or a second
representation does not decode 3,000 JPEGs again.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from curate.io import DECODE_VERSION, CurateError, atomic_save_npy, atomic_write_text, open_upright, safe_relpath
from train.presets import FLAG, Preset

if TYPE_CHECKING:  # curate.labels imports this module
    from curate.labels import FlagConfig

log = logging.getLogger("curate.embed")


@dataclass
class Representation:
    """What a representation gives `curate.labels`: embeddings always, out-of-fold probabilities when trained."""

    name: str
    embeddings: np.ndarray  # N x D, float32, rows in manifest order (rows with errors are zeros)
    oof_probs: np.ndarray | None = None  # N x C, columns = sorted class names
    space: np.ndarray | None = None  # rows with equal values share an embedding space (the fold's model)
    common: np.ndarray | None = None  # N x D in one space for every photo (in-sample), when there is one
    groups: np.ndarray | None = None  # the visual groups the folds kept together, when grouped


# ---------------------------------------------------------------- decoded image cache

def _decode(path: Path, size: int) -> np.ndarray:
    return np.asarray(open_upright(path, draft=size * 2).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def load_images(run_dir: Path, data_root: Path, filepaths: list[str], size: int,
                progress: bool = False) -> np.ndarray:
    """All photos as an N x size x size x 3 uint8 array (squashed to a square), cached in the run folder.

    A photo that cannot be decoded becomes a black image and is logged; callers leave rows with a scan
    `error` unscored anyway.
    """
    cache = Path(run_dir) / "cache" / f"images_{size}.npy"
    key = Path(run_dir) / "cache" / f"images_{size}.txt"
    want = [f"# decode v{DECODE_VERSION}", *filepaths]  # the files, in order, and how they were decoded
    if cache.exists() and key.exists() and key.read_text(encoding="utf-8").splitlines() == want:
        return np.load(cache)
    out = np.zeros((len(filepaths), size, size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        try:
            out[i] = _decode(safe_relpath(data_root, filepaths[i]), size)
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot decode (%s); scored as a black image", filepaths[i], exc)

    bar = _bar(len(filepaths), f"decode {size}px", progress)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for _ in pool.map(one, range(len(filepaths))):
            bar(1)
    bar(None)
    atomic_save_npy(cache, out)
    atomic_write_text(key, "\n".join(want) + "\n")
    return out


def _bar(total: int, desc: str, progress: bool) -> Callable[[int | None], None]:
    """A tqdm progress callback: bar(n) advances, bar(None) closes."""
    if not progress:
        return lambda n: None
    from tqdm import tqdm

    t = tqdm(total=total, desc=desc, leave=False)
    return lambda n: t.close() if n is None else t.update(n)


# ---------------------------------------------------------------- (c) cheap features

def cheap_features(images: np.ndarray) -> np.ndarray:
    """Hand-made features per photo: HSV histogram, gradient-orientation histogram, 8x8 Lab thumbnail.

    Each block is standardised so no block dominates the distances. Seconds for 3,000 photos.
    """
    import cv2

    blocks: list[list[np.ndarray]] = [[], [], []]
    for img in images:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
        blocks[0].append(np.sqrt(hist / max(hist.sum(), 1)))
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
        gx, gy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
        mag, ang = cv2.cartToPolar(gx, gy)
        # orientation histogram over a 2x2 grid, weighted by gradient magnitude
        h, w = gray.shape
        cells = []
        for sy in (slice(0, h // 2), slice(h // 2, h)):
            for sx in (slice(0, w // 2), slice(w // 2, w)):
                hc, _ = np.histogram(ang[sy, sx] % np.pi, bins=9, range=(0, np.pi), weights=mag[sy, sx])
                cells.append(hc / (hc.sum() + 1e-6))
        blocks[1].append(np.concatenate(cells))
        lab = cv2.cvtColor(cv2.resize(img, (8, 8), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2LAB)
        blocks[2].append(lab.astype(np.float32).ravel() / 255.0)
    feats = []
    for b in blocks:
        a = np.asarray(b, dtype=np.float32)
        a = (a - a.mean(0)) / (a.std(0) + 1e-6) / np.sqrt(a.shape[1])
        feats.append(a)
    return np.concatenate(feats, axis=1)


# ---------------------------------------------------------------- (a) pretrained keras.applications

def keras_application(name: str, images: np.ndarray, weights: str | None = "imagenet",
                      batch_size: int = 32) -> np.ndarray:
    """Global-average-pooled features of a `keras.applications` model (e.g. EfficientNetV2B0).

    `weights=None` builds the same network untrained: only for testing the plumbing.
    Raises CurateError when the name is unknown or the ImageNet weights are neither cached nor downloadable.
    """
    from train.backend import keras

    fn = getattr(keras.applications, name, None)
    if fn is None or not callable(fn):
        raise CurateError(f"--embeddings keras:{name}: keras.applications has no model named {name!r}")
    module = _application_module(name)
    size = images.shape[1]
    try:
        model = fn(include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg")
    except Exception as exc:  # keras raises URLError/OSError/ValueError/Exception when the download fails
        raise CurateError(
            f"--embeddings keras:{name}: cannot load its ImageNet weights ({type(exc).__name__}: {exc}); "
            "they are downloaded to ~/.keras/models on first use, which needs internet. Offline, copy the "
            "weights file there or use the default own-ViT representation (--embeddings vit)"
        ) from None
    preprocess = getattr(module, "preprocess_input", None) if module else None
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype("float32")
        if preprocess is not None:
            batch = preprocess(batch)
        out.append(np.asarray(model.predict_on_batch(batch), dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def _application_module(name: str):
    """The keras.applications submodule that holds `name`'s preprocess_input."""
    from train.backend import keras

    for mod_name in dir(keras.applications):
        mod = getattr(keras.applications, mod_name)
        if getattr(mod, name, None) is not None and hasattr(mod, "preprocess_input"):
            return mod
    return None


def class_names(labels: pd.Series) -> list[str]:
    return sorted(labels.astype(str).unique())


# ---------------------------------------------------------------- the one entry point

def represent(kind: str, run_dir: Path, data_root: Path, manifest: pd.DataFrame, classes: list[str],
              cfg: FlagConfig, progress: bool = False) -> Representation:
    """The representation `kind` ('features', 'vit' or 'keras:<Name>') of the manifest's rows, in order."""
    filepaths = manifest["filepath"].astype(str).tolist()
    if kind == "features":
        images = load_images(run_dir, data_root, filepaths, cfg.image_size, progress)
        return Representation("features", cheap_features(images))
    if kind.startswith("keras:"):
        name = kind.split(":", 1)[1]
        images = load_images(run_dir, data_root, filepaths, 224, progress)
        return Representation(name.lower(), keras_application(name, images))
    if kind == "vit":
        return vit_kfold(run_dir, data_root, manifest, classes, cfg, progress, recipe=getattr(cfg, "vit", None))
    raise CurateError(f"--embeddings {kind}: expected 'vit', 'features' or 'keras:<Name>'")


# ---------------------------------------------------------------- (b) own ViT, K-fold

def fold_assignment(labels: np.ndarray, folds: int, seed: int = 0, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per photo: stratified by label; with `groups`, a whole group lands in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    fold = np.full(len(labels), -1, dtype=int)
    if groups is None:
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    else:
        splits = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(
            np.zeros(len(labels)), labels, groups)
    with warnings.catch_warnings():  # a class smaller than the folds: flag names it in its own warning
        warnings.filterwarnings("ignore", message="The least populated class")
        for k, (_, test) in enumerate(splits):
            fold[test] = k
    return fold


def train_fold(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
               recipe: Preset, seed: int = 0, progress: bool = False,
               flip_tta: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Train one ViT (train.fit.fit_arrays) on (x_train, y_train); return (probabilities, class-token
    embeddings) of x_test, averaged over the photo and its mirror image when `flip_tta`."""
    from train.fit import fit_arrays, predict_arrays

    model = fit_arrays(x_train, y_train, preset=recipe, seed=seed, progress=progress, num_classes=n_classes)
    probs, emb = predict_arrays(model, x_test)
    if flip_tta:
        probs_f, emb_f = predict_arrays(model, np.ascontiguousarray(x_test[:, :, ::-1]))
        probs, emb = (probs + probs_f) / 2, (emb + emb_f) / 2
    return probs, emb


def _fingerprint(*parts) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in parts:
        h.update(np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
    return h.hexdigest()[:16]


def visual_groups(emb: np.ndarray, labels: np.ndarray, group_size: int, seed: int = 0,
                  min_groups: int = 1) -> np.ndarray:
    """Group id per photo: k-means within each class, about `group_size` photos per group, and at least
    `min_groups` groups per class (one per photo in a smaller class).

    Pass the number of folds as `min_groups`: a class in fewer groups than folds cannot be spread over every
    fold, and a class kept whole in one fold (12 photos of a rare defect, group_size 20) is scored by a model
    that never saw the class, so every one of its photos looks mislabelled.
    """
    from sklearn.cluster import KMeans

    z = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-8)
    groups = np.zeros(len(labels), dtype=int)
    next_id = 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(np.clip(max(round(len(members) / group_size), min_groups), 1, len(members)))
        assign = KMeans(k, n_init=3, random_state=seed).fit_predict(z[members]) if k > 1 else np.zeros(len(members))
        groups[members] = next_id + assign.astype(int)
        next_id += k
    return groups


def _cached_fit(path: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                recipe: Preset, seed: int, progress: bool, flip_tta: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """train_fold, or its saved result at `path`; the result is saved atomically. Third value: reused."""
    from curate.io import atomic_path

    if path.exists():
        saved = np.load(path)
        return saved["probs"], saved["emb"], True
    p, e = train_fold(x_train, y_train, x_test, n_classes, recipe, seed=seed, flip_tta=flip_tta)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, probs=p, emb=e)
    return p, e, False


def _inputs_fingerprint(filepaths: list[str], labels: np.ndarray, recipe: Preset, cfg) -> str:
    return _fingerprint(np.array(filepaths, dtype="U"), labels, recipe, cfg.flip_tta, cfg.seed)


def fold_cache_files(run_dir: Path, filepaths: list[str], labels: np.ndarray, recipe: Preset, cfg: FlagConfig,
                     fold: np.ndarray, exclude: np.ndarray | None = None, name: str = "vit") -> list[Path]:
    """Where `vit_kfold` saves each fold model's predictions: named by a fingerprint of the files, labels,
    recipe, seed, fold assignment and (when any) the excluded photos, so other inputs never reuse them."""
    base = _inputs_fingerprint(filepaths, labels, recipe, cfg)
    tag = _fingerprint(base, fold, exclude) if exclude is not None and np.any(exclude) else _fingerprint(base, fold)
    return [Path(run_dir) / "cache" / f"{name}_fold{k}of{cfg.folds}_{tag}.npz" for k in range(cfg.folds)]


def vit_kfold(run_dir: Path, data_root: Path, manifest: pd.DataFrame, classes: list[str], cfg: FlagConfig,
              progress: bool = False, recipe: Preset | None = None, name: str = "vit",
              exclude: np.ndarray | None = None) -> Representation:
    """Out-of-fold probabilities and class-token embeddings of the own ViT, trained `cfg.folds` times.

    With `cfg.group_folds`, a first ViT is trained on every photo; its embeddings (one space for all
    photos, though in-sample) are clustered within each class, and the folds keep each cluster together,
    so a coherent off-class group (parade photos in roses/) is scored by models that saw none of it.
    Each model's predictions are saved atomically to `<run>/cache/<name>_*_<fingerprint>.npz`
    (fingerprint = files, labels, folds and recipe), so an interrupted run resumes at the first
    unfinished fold. `recipe` defaults to train.presets.FLAG.
    `exclude` (boolean per photo): photos no fold model trains on, though each is still scored by the model of
    its fold; the folds (and the first ViT that groups them) stay the same as without it.
    """
    recipe = recipe or FLAG
    filepaths = manifest["filepath"].astype(str).tolist()
    labels = manifest["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    images = load_images(run_dir, data_root, filepaths, recipe.model.image_size, progress)
    cache = Path(run_dir) / "cache"
    base = _inputs_fingerprint(filepaths, labels, recipe, cfg)
    excluded = np.zeros(len(labels), bool) if exclude is None else np.asarray(exclude, bool)
    n_models = cfg.folds + int(cfg.group_folds)
    desc = f"{name} {cfg.folds}-fold" + (f" without {excluded.sum()} photos" if excluded.any() else "")
    bar = _bar(n_models, desc, progress)
    common = None
    groups = None
    if cfg.group_folds:
        _, common, reused = _cached_fit(cache / f"{name}_all_{base}.npz", images, labels, images, len(classes),
                                        recipe, cfg.seed + 100, progress, cfg.flip_tta)
        groups = visual_groups(common, labels, cfg.group_size, cfg.seed, min_groups=cfg.folds)
        bar(1)
    fold = fold_assignment(labels, cfg.folds, cfg.seed, groups)
    paths = fold_cache_files(run_dir, filepaths, labels, recipe, cfg, fold, excluded, name)
    probs = np.zeros((len(labels), len(classes)), np.float32)
    emb = np.zeros((len(labels), recipe.model.hidden_dim), np.float32)
    for k in range(cfg.folds):
        test = np.flatnonzero(fold == k)
        train_idx = np.flatnonzero((fold != k) & ~excluded)
        p, e, reused = _cached_fit(paths[k], images[train_idx],
                                   labels[train_idx], images[test], len(classes), recipe, cfg.seed + k, progress,
                                   cfg.flip_tta)
        probs[test], emb[test] = p, e
        if reused:
            log.info("%s fold %d/%d: reused its saved predictions", name, k + 1, cfg.folds)
        bar(1)
    bar(None)
    return Representation(name, emb, probs, space=fold, common=common, groups=groups)
