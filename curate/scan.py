"""`curate scan`: walk a dataset, read and check every image once, write the manifest.

One pure function, `scan_file(root, relpath, config)`, does all the per-file work (read the
bytes, sha256, decode once at reduced size, pHash/dHash, quality metrics, integrity and
absolute-threshold flags), so a process pool here or a Dask task elsewhere can call it. `scan`
adds what needs the whole dataset: data-relative thresholds (curate.quality) and duplicate
groups (curate.duplicates), then writes `manifest.csv`, `duplicates.csv` and `scan.json`
atomically into the run folder. A per-file cache keyed by (path, size, mtime) under the run
folder makes a re-scan only re-read what changed. DATA is only ever read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from curate.io import (
    IMAGE_EXTENSIONS,
    CurateError,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    decode_rgb8,
    default_run_dir,
    exif_orientation,
    flags_of,
    is_deep_colour,
    run_lock,
    upright,
)
from curate.quality import QualityBounds, data_relative_flags, data_thresholds, image_metrics

if TYPE_CHECKING:  # pandas is imported where used: a worker process needs none of it
    import pandas as pd

log = logging.getLogger("curate.scan")

MANIFEST_COLUMNS = ["filepath", "label", "bytes", "sha256", "format", "width", "height", "mode", "phash", "dhash",
                    "blur", "brightness", "contrast", "entropy", "dup_group", "flags", "error"]

# DATA/<split>/<class>/<image>, the layout Keras, Roboflow and MVTec AD use, is read when every top-level folder
# is named as a split: labels come from the second level, and the manifest's `split` column from the first,
# which export, train and compare keep. Read as DATA/<class>/<image>, its classes would be "train" and "test".
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}

ISSUES = ["corrupt", "truncated", "not_image", "exact_duplicate", "near_duplicate", "cross_label_duplicate", "tiny",
          "odd_aspect_ratio", "blurry", "dark", "bright", "low_information", "grayscale"]

# Fewer near duplicates than this are a handful of copies, whatever their share of a small dataset: they are
# grouped even above ScanConfig.max_near_share.
MIN_NEAR_FOR_UNGROUPING = 20

CACHE_NAME = ".scan_cache.json"
_CACHE_VERSION = 5  # 4: pixels and sizes as displayed (EXIF orientation applied); 5: 16-bit by sensor range
HASH_INPUT_SIDE = 32  # imagehash.phash's working size (hash_size 8 x highfreq_factor 4)

# Magic numbers of the formats we scan: a file that starts like an image but will not open is
# `corrupt`; one that does not even start like an image is `not_image`.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


@dataclass(frozen=True)
class ScanConfig:
    """Every threshold `curate scan` uses (written to scan.json with the counts).

    decode_size: JPEGs are decoded with libjpeg's DCT scaling (1/2, 1/4, 1/8) to the smallest size
        whose sides stay >= this many pixels; other formats are reduced by the same power-of-two
        rule after decoding. Metrics are computed on that working image; pHash/dHash (imagehash's
        algorithms) on its grey version box-reduced the same way towards 32 px.
    near_distance: pHash Hamming distance (bits of 64) up to which two images are near duplicates.
    max_near_share: when more than this share of the readable images (and at least
        MIN_NEAR_FOR_UNGROUPING) would be a near duplicate, pHash cannot tell this dataset's images apart
        (one fixture and camera, as in visual inspection, where a scratched part hashes like a good one):
        only byte-identical copies are grouped, with a warning.
    tiny_side: images whose shorter side is below this (in original pixels) are `tiny`.
    odd_aspect: long side / short side above this is `odd_aspect_ratio`.
    grayscale_chroma: mean absolute channel difference (grey levels) below which an RGB image is `grayscale`.
    grayscale_majority: when more than this share of the readable images is grey, the dataset is monochrome
        (a mono inspection camera, X-rays) and no image is flagged `grayscale`: grey is then what the data is.
    max_pixels: larger images are reported, not decoded (default: Pillow's decompression-bomb error limit).
    quality: data-relative bounds for blurry / dark / bright / low_information (curate.quality).
    """

    decode_size: int = 64
    near_distance: int = 8
    max_near_share: float = 0.25
    tiny_side: int = 64
    odd_aspect: float = 3.0
    grayscale_chroma: float = 2.0
    grayscale_majority: float = 0.5
    max_pixels: int = 2 * Image.MAX_IMAGE_PIXELS
    quality: QualityBounds = field(default_factory=QualityBounds)

    def fingerprint(self) -> str:
        """A digest of the settings that shape per-file results (the cache is valid only for the same one)."""
        dataset_level = ("near_distance", "max_near_share", "quality", "grayscale_majority")
        per_file = {k: v for k, v in dataclasses.asdict(self).items() if k not in dataset_level}
        return hashlib.sha256(json.dumps(per_file, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- per-file work (pure)

def _dct_rows(n: int, k: int) -> np.ndarray:
    """First k rows of the unnormalised DCT-II matrix (scipy.fftpack.dct's default), for n samples."""
    idx = np.arange(n)
    return 2.0 * np.cos(np.pi * np.outer(np.arange(k), 2 * idx + 1) / (2 * n))


_DCT_32x8 = _dct_rows(32, 8)


def image_hashes(gray: Image.Image) -> tuple[str, str]:
    """(phash, dhash) of a grey PIL image as 16-hex-digit strings, equal to imagehash.phash / imagehash.dhash.

    Same steps as imagehash 4.3 (LANCZOS resize to 32x32 / 9x8, DCT of rows and columns, top-left
    8x8 against its median; horizontal gradient signs), with the DCT as a matrix product so the
    scan does not pay for importing scipy. tests/test_scan.py checks equality on real photos.
    """
    small = np.asarray(gray.resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = _DCT_32x8 @ small @ _DCT_32x8.T
    ordered = np.sort(low, axis=None)
    phash = low > (ordered[31] + ordered[32]) / 2  # the median of 64 values, as numpy.median computes it
    tiny = np.asarray(gray.resize((9, 8), Image.LANCZOS))
    dhash = tiny[:, 1:] > tiny[:, :-1]
    return _bits_to_hex(phash), _bits_to_hex(dhash)


def _bits_to_hex(bits: np.ndarray) -> str:
    return np.packbits(bits.ravel()).tobytes().hex()


def _empty_row(relpath: str) -> dict[str, Any]:
    nan = float("nan")
    return {"filepath": relpath, "label": relpath.split("/", 1)[0], "bytes": 0, "sha256": "", "format": "",
            "width": 0, "height": 0, "mode": "", "phash": "", "dhash": "", "blur": nan, "brightness": nan,
            "contrast": nan, "entropy": nan, "dup_group": "", "flags": "", "error": ""}


def _fail(row: dict[str, Any], flag: str, reason: str) -> dict[str, Any]:
    row["flags"] = flag
    row["error"] = reason
    return row


def _reduce_towards(im: Image.Image, side: int) -> Image.Image:
    """`im` box-reduced by the largest power of two (at most 8) that keeps its shorter side >= `side`."""
    factor = 1
    while factor < 8 and min(im.size) // (factor * 2) >= side:
        factor *= 2
    return im.reduce(factor) if factor > 1 else im


def scan_file(root: str | os.PathLike, relpath: str, config: ScanConfig) -> dict[str, Any]:
    """Read, hash, decode and measure one file; never raises for a bad file.

    In: the data root, the file's POSIX path relative to it (first component = label), the config.
    Out: one manifest row (MANIFEST_COLUMNS) with the per-file flags (corrupt, truncated,
    not_image, tiny, odd_aspect_ratio, grayscale) and `error` saying why a file could not be read.
    """
    try:
        with open(os.path.join(root, relpath), "rb") as f:
            data = f.read()
    except OSError as exc:
        return unreadable_row(relpath, f"cannot read file: {exc.strerror or exc}")
    return scan_bytes(data, relpath, config)


def unreadable_row(relpath: str, reason: str) -> dict[str, Any]:
    """The manifest row of a file that could not be read at all (flag `corrupt`, `error` = reason)."""
    return _fail(_empty_row(relpath), "corrupt", reason)


def scan_bytes(data: bytes, relpath: str, config: ScanConfig) -> dict[str, Any]:
    """`scan_file`'s work on bytes already read (a Dask worker reads them through fsspec); never raises."""
    row = _empty_row(relpath)
    row["bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        return _fail(row, "corrupt", "empty file (0 bytes)")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        return _fail(row, "corrupt", f"too large to decode safely: {exc}")
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_MAGIC):
            return _fail(row, "corrupt", "image header is unreadable (corrupt file)")
        return _fail(row, "not_image", "not an image: no known image format")
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL's "Truncated File Read": a header segment runs past the end of the file, whether the file was
        # cut short or its header is garbage, so the flag stays `corrupt` and the message says both
        hint = " (the header runs past the end of the file: cut short, or corrupt)" if "truncat" in str(
            exc).lower() else ""
        return _fail(row, "corrupt", f"cannot open image: {exc}{hint}")

    with im:
        row["format"] = im.format or ""
        row["mode"] = im.mode + (";16" if is_deep_colour(im) else "")
        width, height = im.size
        row["width"], row["height"] = width, height
        if width * height > config.max_pixels:
            return _fail(row, "corrupt", f"too large to decode safely: {width}x{height} = {width * height} pixels "
                                         f"exceeds the limit of {config.max_pixels}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency": handled below
                if im.format == "JPEG":
                    im.draft("RGB", (config.decode_size, config.decode_size))
                # reduced by a power of two towards decode_size if the decoder did not draft it
                rgb = _reduce_towards(decode_rgb8(im, lambda: data), config.decode_size)
                orientation = exif_orientation(im)
        except OSError as exc:
            flag = "truncated" if "truncat" in str(exc).lower() else "corrupt"
            return _fail(row, flag, f"cannot decode image: {exc}")
        except (SyntaxError, ValueError, MemoryError, Image.DecompressionBombError) as exc:
            return _fail(row, "corrupt", f"cannot decode image: {exc}")

    if orientation != 1:
        # hash and measure the picture as every viewer (and the trainer) shows it, at its displayed size
        rgb = upright(rgb, orientation)
        if orientation >= 5:
            width, height = height, width
            row["width"], row["height"] = width, height
    gray = rgb.convert("L")
    # pHash starts by shrinking to 32x32: a box-reduced copy at >= 32 px loses nothing it uses and halves the cost
    row["phash"], row["dhash"] = image_hashes(_reduce_towards(gray, HASH_INPUT_SIDE))
    metrics = image_metrics(np.asarray(gray), np.asarray(rgb))
    for key in ("blur", "brightness", "contrast", "entropy"):
        row[key] = metrics[key]

    flags = []
    if row["format"] == "JPEG" and not data.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):
        flags.append("truncated")
        row["error"] = "JPEG end-of-image marker missing: the file was cut short"
    if min(width, height) < config.tiny_side:
        flags.append("tiny")
    if max(width, height) > config.odd_aspect * min(width, height):
        flags.append("odd_aspect_ratio")
    if row["mode"] in _GREY_MODES or metrics["chroma"] < config.grayscale_chroma:
        flags.append("grayscale")
    row["flags"] = ";".join(flags)
    return row


# ---------------------------------------------------------------- walking DATA

@dataclass
class Walk:
    """What a walk of DATA found: (relpath, size, mtime_ns) of each candidate image, and what it left out."""

    files: list[tuple[str, int, int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    other_files: int = 0  # files in class folders without an image extension (ignored)


def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def is_split_layout(walk: Walk) -> bool:
    """Whether DATA is laid out as DATA/<split>/<class>/<image>: every top-level folder is named as a split
    (`SPLIT_FOLDERS`, any case) and some image sits in a folder below one."""
    tops = {path.split("/", 1)[0] for path, *_ in walk.files}
    return bool(tops) and all(t.lower() in SPLIT_FOLDERS for t in tops) and any(
        path.count("/") >= 2 for path, *_ in walk.files)


def read_as_split_layout(walk: Walk) -> Walk:
    """The walk with each image's class at the second level: an image directly in a split folder has no
    label and is skipped; `classes` are the second-level folders."""
    files, skipped = [], list(walk.skipped)
    for item in walk.files:
        if item[0].count("/") >= 2:
            files.append(item)
        else:
            skipped.append({"path": item[0], "reason": "image directly in a split folder, outside any class "
                                                       "folder (no label)"})
    classes = sorted({path.split("/")[1] for path, *_ in files})
    return dataclasses.replace(walk, files=files, classes=classes, skipped=skipped)


def label_by_split_layout(manifest: pd.DataFrame) -> pd.DataFrame:
    """Set `label` (second folder) and `split` (first folder, as train/val/test) of a split-layout manifest."""
    parts = manifest["filepath"].str.split("/", n=2)
    manifest["label"] = parts.str[1]
    manifest["split"] = parts.str[0].str.lower().map(SPLIT_FOLDERS)
    return manifest


def walk_data(root: Path) -> Walk:
    """List the images below `root` (class = first-level folder); never follows a link out of `root`.

    Symlinked folders are not descended into (they would repeat or escape the data); a symlinked
    file is scanned only if its target lies inside `root`. Hidden files and folders are ignored.
    """
    walk = Walk()
    root_real = os.path.realpath(root)

    def kind_of(entry: os.DirEntry, relpath: str, top: bool) -> str:
        """'dir', 'file' or 'skip' (recorded with its reason); a link loop or a vanished file never raises."""
        try:
            if entry.is_symlink():
                if entry.is_dir():
                    what = "symlinked class folder" if top else "symlinked folder"
                    walk.skipped.append({"path": relpath, "reason": f"{what}, not followed"})
                    return "skip"
                if not _inside(entry.path, root_real):
                    walk.skipped.append({"path": relpath, "reason": "symlink pointing outside DATA, not followed"})
                    return "skip"
            if entry.is_dir():
                return "dir"
            if entry.is_file():
                return "file"
            reason = "not a regular file or folder (broken link?)"
        except OSError as exc:  # e.g. ELOOP from a link that points to itself
            reason = f"cannot resolve: {exc.strerror or exc}"
        walk.skipped.append({"path": relpath, "reason": reason})
        return "skip"

    def visit(dir_path: str, rel: str) -> Iterator[tuple[str, int, int]]:
        try:
            entries = sorted(os.scandir(dir_path), key=lambda e: e.name)
        except OSError as exc:
            walk.skipped.append({"path": rel, "reason": f"cannot list folder: {exc.strerror or exc}"})
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relpath = f"{rel}/{entry.name}"
            kind = kind_of(entry, relpath, top=False)
            if kind == "dir":
                yield from visit(entry.path, relpath)
            elif kind == "file":
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                    walk.other_files += 1
                    continue
                try:
                    st = entry.stat()
                except OSError as exc:
                    walk.skipped.append({"path": relpath, "reason": f"cannot stat: {exc.strerror or exc}"})
                    continue
                yield relpath, st.st_size, st.st_mtime_ns

    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        is_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
        kind = kind_of(entry, entry.name, top=True) if (is_image or entry.is_symlink()) else (
            "dir" if entry.is_dir(follow_symlinks=False) else "other")
        if kind == "dir":
            walk.classes.append(entry.name)
            before = len(walk.files)
            walk.files.extend(visit(entry.path, entry.name))
            if len(walk.files) == before:
                walk.empty_classes.append(entry.name)
        elif kind == "file" and is_image:
            walk.skipped.append({"path": entry.name, "reason": "image outside any class folder (no label)"})
    return walk


# ---------------------------------------------------------------- the cache

def _load_cache(run_dir: Path, config: ScanConfig) -> dict[tuple[str, int, int], dict[str, Any]]:
    """{(relpath, size, mtime_ns): row} from an earlier scan with the same per-file settings, else {}."""
    path = run_dir / CACHE_NAME
    if not path.exists():
        return {}
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
        if blob.get("version") == _CACHE_VERSION and blob.get("config") == config.fingerprint():
            columns = blob["columns"]
            return {(rel, size, mtime): dict(zip(columns, values, strict=True))
                    for rel, size, mtime, values in blob["rows"]}
    except (ValueError, KeyError, TypeError, OSError) as exc:  # a damaged cache only costs a full re-scan
        log.warning("%s: ignoring unreadable scan cache (%s)", path, exc)
    return {}


def _save_cache(run_dir: Path, config: ScanConfig, rows: dict[tuple[str, int, int], dict[str, Any]]) -> None:
    # JSON, not pickle: loading a cache must never be able to run code
    table = [[rel, size, mtime, [row[c] for c in MANIFEST_COLUMNS]] for (rel, size, mtime), row in rows.items()]
    blob = {"version": _CACHE_VERSION, "config": config.fingerprint(), "columns": MANIFEST_COLUMNS, "rows": table}
    # numpy scalars (rows that came through Parquet) are written as plain numbers
    text = json.dumps(blob, separators=(",", ":"), default=lambda v: v.item() if hasattr(v, "item") else str(v))
    atomic_write_text(run_dir / CACHE_NAME, text)


# ---------------------------------------------------------------- the scan

def _scan_key(root: str, config: ScanConfig, item: tuple[str, int, int]) -> tuple[tuple[str, int, int], dict]:
    return item, scan_file(root, item[0], config)


def _ignore_sigint() -> None:
    # Ctrl-C is the parent's to handle (it saves the cache and stops the pool); workers just get terminated
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent killed outright (SIGKILL, OOM) cannot stop its pool: without this the workers would wait on
    # the task queue forever, holding the terminal's pipes open. Leave as soon as the parent is gone.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _scan_local(root: Path, todo: list[tuple[str, int, int]], config: ScanConfig, workers: int,
                progress: bool) -> Iterator[tuple[tuple[str, int, int], dict[str, Any]]]:
    """Yield (key, row) for every file in `todo`, on a process pool of `workers` (in-process for 1)."""
    from tqdm import tqdm

    work = partial(_scan_key, str(root), config)
    bar = tqdm(total=len(todo), unit="img", desc="scan", disable=not progress, smoothing=0.1)
    try:
        if workers <= 1 or len(todo) < 2 * workers:
            for item in todo:
                yield work(item)
                bar.update()
            return
        # fork: workers inherit the imported modules, so they start in milliseconds
        # ProcessPoolExecutor, not multiprocessing.Pool: if a decoder crashes a worker outright, the
        # executor raises BrokenProcessPool where a Pool would wait forever for the lost task
        ctx = multiprocessing.get_context("fork")
        chunksize = max(1, min(64, len(todo) // (workers * 8)))
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_ignore_sigint) as pool:
            try:
                for result in pool.map(work, todo, chunksize=chunksize):
                    yield result
                    bar.update()
            except BrokenProcessPool:
                raise CurateError("a scan worker died while decoding (a file crashed the image decoder?); "
                                  "rerun to resume from the cache, or use --workers 1 to see which file",
                                  exit_code=1) from None
            except BaseException:
                # Ctrl-C or an error: drop the queued chunks instead of finishing the whole scan on exit
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        bar.close()


def scan(data: str | os.PathLike, out: str | os.PathLike | None = None, workers: int | None = None,
         engine: str = "local", scheduler: str | None = None, use_cache: bool = True, progress: bool = True,
         config: ScanConfig | None = None) -> pd.DataFrame:
    """Scan the dataset `data` (one folder per class, or one per split holding one per class: `is_split_layout`)
    and write the run folder.

    Writes `<out>/manifest.csv` (one row per image file, MANIFEST_COLUMNS, and `split` for a split layout),
    `<out>/duplicates.csv`
    and `<out>/scan.json` ({"data", "thresholds", "counts", ...}); `out` defaults to
    reports/<dataset name>/. `workers` defaults to all cores. `engine="dask"` runs `scan_file`
    as Dask tasks (on `scheduler` if given). Returns the manifest as a DataFrame.
    Raises CurateError (exit 2) for a missing or empty DATA or an output folder inside DATA.
    """
    import pandas as pd

    from curate.duplicates import DUPLICATE_COLUMNS

    config = config or ScanConfig()
    url, remote = None, False
    if engine == "dask":  # DATA may also be an fsspec URL (file://, s3://, gs://), listed and read through fsspec
        from curate.dask_engine import dask_rows, fsspec_walk, is_remote, split_url

        data, url = split_url(data)
        remote = is_remote(url)  # not on this machine: checked when listed
    root = Path(os.path.abspath(data))
    if not remote and not root.exists():
        raise CurateError(f"{data}: no such folder")
    if not remote and not root.is_dir():
        raise CurateError(f"{data}: not a folder (expected one sub-folder per class)")
    run_dir = Path(out) if out is not None else default_run_dir(root)
    if _inside(str(run_dir), os.path.realpath(root)):
        raise CurateError(f"{run_dir}: the run folder may not be inside DATA ({data}); DATA is never written to")
    if engine not in ("local", "dask"):
        raise CurateError(f"unknown engine {engine!r}: choose 'local' or 'dask'")
    if workers is not None and workers < 1:
        raise CurateError(f"--workers must be at least 1, not {workers}")
    workers = workers or os.cpu_count() or 1

    started = time.perf_counter()
    with run_lock(run_dir, "scan"):
        walk = walk_data(root) if url is None else fsspec_walk(url)
        split_layout = is_split_layout(walk)
        if split_layout:
            walk = read_as_split_layout(walk)
            log.info("scan: %s is laid out as <split>/<class>/<image>: labels from the class folders, the split "
                     "(%s) from the folders above them", data,
                     ", ".join(sorted({p.split("/", 1)[0] for p, *_ in walk.files})))
        for item in walk.skipped:
            log.warning("%s: skipped: %s", item["path"], item["reason"])
        for name in walk.empty_classes:
            log.warning("%s: class folder has no images", name)
        if not walk.files:
            raise CurateError(f"{data}: no images found (expected DATA/<class>/<image> with extensions "
                              f"{', '.join(sorted(IMAGE_EXTENSIONS))})")

        cached = _load_cache(run_dir, config) if use_cache else {}
        rows_by_key = {k: cached[k] for k in walk.files if k in cached}
        todo = [k for k in walk.files if k not in rows_by_key]
        log.info("scan: %d files in %d classes, %d from the cache, %d to read", len(walk.files),
                 len(walk.classes), len(rows_by_key), len(todo))
        try:
            per_file = (_scan_local(root, todo, config, workers, progress) if engine == "local" else
                        dask_rows(url or str(root), todo, config, run_dir, scheduler, workers, progress, use_cache))
            # a checkpoint every tenth of the work (at least 64 files), so even a killed scan resumes
            every, done = max(64, len(todo) // 10), 0
            for key, row in per_file:
                rows_by_key[key] = row
                done += 1
                if done % every == 0 and done < len(todo):
                    _save_cache(run_dir, config, rows_by_key)
        finally:
            if todo:  # keep what was done, so an interrupted scan resumes where it stopped
                _save_cache(run_dir, config, rows_by_key)

        manifest = pd.DataFrame([rows_by_key[k] for k in walk.files], columns=MANIFEST_COLUMNS)
        manifest = manifest.sort_values("filepath", kind="stable").reset_index(drop=True)
        if split_layout:
            manifest = label_by_split_layout(manifest)
            from train.data import classes_never_trained

            never = classes_never_trained(manifest)
            if never:
                log.warning("%s: no photo of %s in a train folder: a model trained on this split cannot learn "
                            "%s (curate compare trains on it)", data, ", ".join(never),
                            "it" if len(never) == 1 else "them")
        for row in manifest.loc[manifest["error"] != "", ["filepath", "error"]].itertuples(index=False):
            log.warning("%s: %s", row.filepath, row.error)

        monochrome = _unflag_grayscale_if_monochrome(manifest, config.grayscale_majority)
        thresholds = data_thresholds(manifest[manifest["error"] == ""], config.quality)
        flag_arrays = data_relative_flags(manifest, thresholds)
        dup_group, dups, dup_flags, near_share, near_grouped = group_duplicates(manifest, config)
        flag_arrays.update(dup_flags)
        manifest["dup_group"] = dup_group
        manifest["flags"] = _merge_flags(manifest["flags"].tolist(), flag_arrays)

        counts = Counter(name for cell in manifest["flags"] if cell for name in cell.split(";"))
        counts = {issue: counts.get(issue, 0) for issue in ISSUES}
        groups = dups.groupby("dup_group")
        summary = {
            "data": url if remote else str(root),
            "files": len(manifest),
            "classes": {c: int(n) for c, n in manifest["label"].value_counts().sort_index().items()},
            "splits": ({c: int(n) for c, n in manifest["split"].value_counts().sort_index().items()}
                       if split_layout else None),
            "readable": int((manifest["error"] == "").sum()),
            "flagged": int((manifest["flags"] != "").sum()),
            "counts": counts,
            "duplicate_groups": {
                "groups": int(dups["dup_group"].nunique()),
                "exact": int(groups["kind"].apply(lambda k: (k == "exact").all()).sum()) if len(dups) else 0,
                "with_near_members": int(groups["kind"].apply(lambda k: (k == "near").any()).sum()) if len(dups) else 0,
                "cross_label": int(groups["label"].nunique().gt(1).sum()) if len(dups) else 0,
                "removable_copies": int((~dups["keep"].astype(bool)).sum()) if len(dups) else 0,
            },
            "thresholds": {
                "near_distance": config.near_distance,
                "near_share": round(near_share, 4),
                "max_near_share": config.max_near_share,
                "near_duplicates_grouped": near_grouped,
                "tiny_side": config.tiny_side,
                "odd_aspect": config.odd_aspect,
                "grayscale_chroma": config.grayscale_chroma,
                "grayscale_majority": config.grayscale_majority,
                "monochrome": monochrome,
                "max_pixels": config.max_pixels,
                "decode_size": config.decode_size,
                "robust_k": config.quality.robust_k,
                **thresholds,
            },
            "empty_classes": walk.empty_classes,
            "skipped": walk.skipped,
            "ignored_non_image_files": walk.other_files,
            "from_cache": len(walk.files) - len(todo),
            "seconds": round(time.perf_counter() - started, 3),
        }
        atomic_write_csv(run_dir / "manifest.csv", manifest)
        atomic_write_csv(run_dir / "duplicates.csv", dups if len(dups) else pd.DataFrame(columns=DUPLICATE_COLUMNS))
        atomic_write_json(run_dir / "scan.json", summary)
    log.info("scan: %d files, %d flagged, %d duplicate groups -> %s (%.1f s)", len(manifest), summary["flagged"],
             summary["duplicate_groups"]["groups"], run_dir, summary["seconds"])
    return manifest


def group_duplicates(manifest: pd.DataFrame, config: ScanConfig
                     ) -> tuple[pd.Series, pd.DataFrame, dict[str, np.ndarray], float, bool]:
    """`duplicates.find_duplicates` at `config.near_distance`, or of byte-identical copies only when more than
    `config.max_near_share` of the readable images (and at least MIN_NEAR_FOR_UNGROUPING) would be near
    duplicates. Returns (dup_group, duplicates table, flags, near-duplicate share, whether near ones were grouped)."""
    from curate.duplicates import find_duplicates

    dup_group, dups, dup_flags = find_duplicates(manifest, config.near_distance)
    near = dup_flags["near_duplicate"][(manifest["error"] == "").to_numpy()]
    near_share = float(near.mean()) if near.size else 0.0
    near_grouped = near_share <= config.max_near_share or int(near.sum()) < MIN_NEAR_FOR_UNGROUPING
    if not near_grouped:
        log.warning("scan: %.0f%% of the readable images have a near duplicate (pHash within %d bits): pHash "
                    "cannot tell this dataset's images apart, so only byte-identical copies are grouped; "
                    "removing the rest as duplicates would lose real, different photos "
                    "(ScanConfig.max_near_share = %g)", 100 * near_share, config.near_distance,
                    config.max_near_share)
        dup_group, dups, dup_flags = find_duplicates(manifest, -1)  # a negative distance: exact copies only
    return dup_group, dups, dup_flags, near_share, near_grouped


def _unflag_grayscale_if_monochrome(manifest, majority: float) -> bool:
    """Drop `grayscale` from every row's flags (in place) when more than `majority` of the readable images
    carry it; return whether it did."""
    readable = manifest["error"] == ""
    grey = readable & manifest["flags"].map(lambda cell: "grayscale" in flags_of(cell))
    if not readable.any() or grey.sum() <= majority * readable.sum():
        return False
    manifest["flags"] = manifest["flags"].map(lambda cell: ";".join(f for f in flags_of(cell) if f != "grayscale"))
    log.info("scan: %d of %d readable images are grey, so this is a monochrome dataset: `grayscale` is not "
             "flagged (ScanConfig.grayscale_majority = %g)", grey.sum(), readable.sum(), majority)
    return True


def _merge_flags(per_file: list[str], flag_arrays: dict[str, np.ndarray]) -> list[str]:
    """Per-file flags plus the dataset-level ones, in the canonical ISSUES order."""
    out = []
    for i, cell in enumerate(per_file):
        names = set(cell.split(";")) if cell else set()
        names.update(name for name, arr in flag_arrays.items() if arr[i])
        out.append(";".join(n for n in ISSUES if n in names))
    return out
