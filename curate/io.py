"""Run-folder I/O shared by every stage: atomic writes, the run lock, manifest reading.

Every output is written to a temporary file in the same folder and renamed into place,
so an interrupted run never leaves a half-written file where a finished one should be.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy/pandas are imported where used: every `curate` process imports this module
    import numpy as np
    import pandas as pd
    from PIL import Image

REPORTS_DIR = Path("reports")
# the files scan, fetch and predict take for images (by extension, any case)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (what C/C++ code writes there is dropped).

    For native libraries that announce themselves on stderr while they load (TensorFlow, TFLite's
    XNNPACK delegate): only around such a load, in the only thread writing, since the whole process's
    stderr is dropped meanwhile."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class CurateError(Exception):
    """An error the user can act on. `exit_code` 2 = bad usage or input, 1 = the run failed."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _file_mode() -> int:
    """The mode open() gives a new file under the current umask (mkstemp's files are always 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The result gets the mode a plainly written file would have (0644 under the usual umask), so a
    report or manifest can be shared like any other file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            tmp_path.chmod(_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_csv(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Part of every decoded-pixel cache key (trainer and flag): bump when to_rgb8 or open_upright change what a
# file decodes to, so no stage keeps using pixels decoded the old way. 2: 16-bit by sensor range.
DECODE_VERSION = 2


def photo_cache_keys(manifest: pd.DataFrame, version: str) -> pd.Series:
    """Each row's key in a per-photo cache (scene measures, pretrained embeddings): its path, its content hash
    (scan's sha256 column, when the manifest has one) and `version`, which names what was computed and how the
    pixels were decoded; so an edited photo or a changed measure is computed again, never reused."""
    content = manifest["sha256"].astype(str) if "sha256" in manifest.columns else ""
    return manifest["filepath"].astype(str) + "|" + content + version


# A per-photo cache (scene measures, pretrained embeddings) is one file plus a journal of parts beside it
# (`scene.csv.part-00000`, ...): each chunk of newly computed photos is written once, as a new part, and the
# parts are merged into the file when the stage finishes. Rewriting the whole file after every chunk, as
# before, wrote O(N^2) bytes: bench/cache_bench.py measures both.
_PART = ".part-"


def _part_number(part: Path) -> str:
    return part.name.rsplit(_PART, 1)[1]


def journal_parts(path: str | os.PathLike) -> list[Path]:
    """The journal parts of the per-photo cache at `path`, oldest first."""
    path = Path(path)
    parts = [p for p in path.parent.glob(f"{glob.escape(path.name)}{_PART}[0-9]*") if _part_number(p).isdigit()]
    return sorted(parts, key=lambda p: int(_part_number(p)))  # by number: 100000 after 99999


def read_journaled(path: str | os.PathLike, read: Callable[[Path], dict[str, Any]],
                   warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Everything cached at `path` and in its journal parts (a later part wins), each file read by `read`
    (file -> {key: value}). A file `read` cannot read is skipped, and `warn` is told its name and why:
    what it held is computed again."""
    known: dict[str, Any] = {}
    path = Path(path)
    for file in ([path] if path.exists() else []) + journal_parts(path):
        try:
            known.update(read(file))
        except (OSError, ValueError, KeyError) as exc:
            if warn:
                warn(f"{file}: unreadable ({exc}); what it held is computed again")
    return known


def append_journal(path: str | os.PathLike, rows: dict[str, Any],
                   write: Callable[[Path, dict[str, Any]], None]) -> Path:
    """Write `rows` as the next journal part of the cache at `path` (atomically), by `write`."""
    parts = journal_parts(path)
    number = int(_part_number(parts[-1])) + 1 if parts else 0
    part = Path(path).with_name(f"{Path(path).name}{_PART}{number:05d}")
    with atomic_path(part) as tmp:
        write(tmp, rows)
    return part


def compact_journal(path: str | os.PathLike, known: dict[str, Any],
                    write: Callable[[Path, dict[str, Any]], None]) -> None:
    """Merge the journal into the cache file: write `known` (all that `read_journaled` read, plus what was
    computed since) to `path`, then delete the parts. Nothing to do without parts. Interrupted between the
    two, the parts are read again next time and hold the same values."""
    parts = journal_parts(path)
    if not parts:
        return
    with atomic_path(path) as tmp:
        write(tmp, known)
    for part in parts:
        part.unlink(missing_ok=True)


def sensor_range(pixels: np.ndarray, mode: str) -> float:
    """The value that stands for white in a 16-bit, 32-bit or float image.

    Machine-vision cameras store 10, 12 or 14 bits in a 16-bit file, so white is 2**bits - 1 for the
    smallest even bit depth (8, 10, 12, 14, 16, ...) that holds the brightest pixel; scaling by 65535
    would turn a 12-bit image nearly black, and Pillow's own conversion clips everything above 255 to
    white. The depth is read per image, so a frame whose brightest pixel is below a quarter of its
    camera's range shows brighter than it is (a 12-bit frame that never exceeds 1023 is scaled as
    10-bit). Floats in 0..1 are white at 1.
    """
    top = float(pixels.max()) if pixels.size else 0.0
    if mode == "F":
        return 1.0 if top <= 1.0 else max(top, 255.0)
    bits = max(8, math.ceil(math.log2(top + 1.0)))
    return float(2 ** (bits + bits % 2) - 1)


def _scaled_to_8_bits(pixels: np.ndarray, mode: str) -> np.ndarray:
    """uint8 pixels: `pixels` (any numeric array; NaN and inf as black) scaled by their `sensor_range`."""
    import numpy as np

    pixels = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.rint(np.clip(pixels * (255.0 / sensor_range(pixels, mode)), 0, 255)).astype(np.uint8)


def is_high_depth_mode(mode: str) -> bool:
    """A manifest `mode` with more than 8 bits per sample (scan writes `RGB;16` for 16-bit colour)."""
    return mode in HIGH_DEPTH_MODES or mode.endswith(";16")


def is_deep_colour(im: Image.Image) -> bool:
    """A colour image with 16 bits per sample (48-bit PNG or TIFF). Pillow opens it as 8-bit RGB by keeping
    each sample's high byte, which turns a 12-bit camera's frame nearly black, so `decode_deep_colour` reads
    it instead. Ask before the image is loaded: the undecoded tiles' raw mode is what tells."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    for tile in im.tile:
        args = tile[3]
        rawmode = args if isinstance(args, str) else (args[0] if args else "")
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def decode_deep_colour(data: bytes) -> Image.Image:
    """A 16-bit colour image's bytes as 8-bit RGB, scaled by its `sensor_range` (OpenCV keeps all 16 bits)."""
    import cv2
    import numpy as np
    from PIL import Image

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise OSError("cannot decode this 16-bit colour image (OpenCV)")
    if arr.ndim == 3:
        arr = arr[..., :3][..., ::-1]  # OpenCV's BGR(A) -> RGB; alpha dropped as to_rgb8 drops it
    return Image.fromarray(np.ascontiguousarray(_scaled_to_8_bits(arr, "I;16"))).convert("RGB")


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB, the way every stage sees it (scan, flag, trainer, previews).

    16-bit, 32-bit and float images are scaled by `sensor_range`; palette images with transparency go
    through RGBA first (Pillow warns otherwise). 16-bit colour needs `decode_deep_colour` (Pillow has
    already dropped the low byte by the time an image reaches here).
    """
    from PIL import Image

    if im.mode in HIGH_DEPTH_MODES:
        import numpy as np

        im = Image.fromarray(_scaled_to_8_bits(np.asarray(im), im.mode), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_rgb8(im: Image.Image, file_bytes: Callable[[], bytes]) -> Image.Image:
    """An opened, not yet loaded image decoded to 8-bit RGB as every stage sees it: 16-bit colour through
    `decode_deep_colour` (on `file_bytes()`, read only then), anything else loaded and passed to `to_rgb8`.
    Stored orientation: callers turn it upright (`upright`, `exif_orientation`)."""
    if is_deep_colour(im):
        return decode_deep_colour(file_bytes())
    im.load()
    return to_rgb8(im)


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright; also for no, unknown or unreadable EXIF)."""
    try:
        value = int(im.getexif().get(0x0112, 1))
        return value if 1 <= value <= 8 else 1
    except Exception:  # noqa: BLE001 -- malformed EXIF: the stored pixels are all there is
        return 1


def upright(im: Image.Image, orientation: int) -> Image.Image:
    """`im` turned as EXIF `orientation` says a viewer shows it (as ImageOps.exif_transpose does)."""
    from PIL import Image

    t = Image.Transpose
    method = {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE, 6: t.ROTATE_270,
              7: t.TRANSVERSE, 8: t.ROTATE_90}.get(orientation)
    return im.transpose(method) if method is not None else im


def open_upright(path: str | os.PathLike, draft: int) -> Image.Image:
    """The photo as displayed, in 8-bit RGB (`to_rgb8`): EXIF orientation applied (as scan hashes it and
    the trainer sees it), and a JPEG decoded at the smallest 1/2..1/8 scale still at least `draft` x
    `draft` (DCT scaling: several times faster than a full decode followed by a resize). Callers resize
    to their own size."""
    import warnings

    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (draft, draft))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Palette images with Transparency": to_rgb8 goes through RGBA
            return upright(decode_rgb8(im, Path(path).read_bytes), exif_orientation(im))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, stage: str) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` so two runs never write the same outputs.

    The lock is an OS-level `flock`, so a killed process releases it automatically. A writer killed
    mid-write (SIGKILL, power loss) leaves its atomic_path temporary file behind; whoever takes the lock
    next removes them, since no other writer can be at work in the folder. A holder leaving by an exception
    (Ctrl-C) removes its own on the way out.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / ".lock"
    f = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CurateError(
                f"{run_dir}: another curate run is using this folder ({holder}); "
                "wait for it to finish or choose another --out/--run folder"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"curate {stage}, pid {os.getpid()}")
        f.flush()
        _remove_temporaries(run_dir)
        try:
            yield
        except BaseException:
            # Interrupted: Ctrl-C can land anywhere, even between atomic_path's mkstemp and its cleanup. Nothing
            # is being written any more, so no temporary file of ours may stay behind.
            _remove_temporaries(run_dir)
            raise
    finally:
        f.close()


def _remove_temporaries(run_dir: Path) -> None:
    for stale in run_dir.rglob(".*.tmp"):  # atomic_path's naming: .<name>.<random>.tmp
        stale.unlink(missing_ok=True)


def default_run_dir(data: str | os.PathLike) -> Path:
    """`reports/<dataset folder name>/`, the run folder every stage defaults to."""
    return REPORTS_DIR / Path(os.path.abspath(data)).name


def resolve_run_dir(run: str | os.PathLike | None) -> Path:
    """The run folder a stage should use: `run` if given, else the only one under reports/."""
    if run is not None:
        run_dir = Path(run)
        if not (run_dir / "manifest.csv").exists():
            raise CurateError(f"{run_dir}: no manifest.csv here; run `curate scan DATA --out {run_dir}` first")
        return run_dir
    candidates = sorted(p.parent for p in REPORTS_DIR.glob("*/manifest.csv"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CurateError("no run folder found under reports/; run `curate scan DATA` first or pass --run DIR")
    names = ", ".join(str(c) for c in candidates)
    raise CurateError(f"several run folders under reports/ ({names}); choose one with --run DIR")


def data_root_of(run_dir: str | os.PathLike) -> Path:
    """The dataset folder a run was scanned from (recorded by `curate scan` in scan.json)."""
    scan_json = Path(run_dir) / "scan.json"
    if not scan_json.exists():
        raise CurateError(f"{scan_json}: missing; run `curate scan DATA --out {run_dir}` first")
    return Path(read_json(scan_json)["data"])


def read_manifest(path: str | os.PathLike, required: Sequence[str] = ("filepath", "label")) -> pd.DataFrame:
    """Read a manifest CSV with string columns kept as strings; check the `required` columns."""
    import numpy as np
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise CurateError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path, dtype={"filepath": str, "label": str, "sha256": str, "phash": str,
                                      "dhash": str, "flags": str, "error": str, "dup_group": str,
                                      "split": str},
                         keep_default_na=False, na_values=[""], float_precision="round_trip")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CurateError(f"{path}: not a readable CSV manifest ({exc})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CurateError(f"{path}: manifest lacks required column(s) {', '.join(missing)}")
    if "filepath" in df.columns:
        _check_filepaths(path, df["filepath"])
    if "label" in required:
        empty = df["label"].isna() | (df["label"].astype(str).str.strip() == "")
        if empty.any():
            i = int(np.flatnonzero(empty.to_numpy())[0])
            raise CurateError(f"{path}: line {i + 2} ({df['filepath'].iloc[i]!r}): empty label "
                              f"({int(empty.sum())} row(s) without a label)")
    for col in ("flags", "error", "dup_group"):
        if col in df.columns:
            df[col] = df[col].fillna("")
    return df


def _check_filepaths(path: Path, filepaths: pd.Series) -> None:
    """A manifest's paths are relative to DATA, one row per file: refuse empty, escaping and repeated ones."""
    for i, fp in enumerate(filepaths.tolist()):
        line = f"{path}: line {i + 2}"
        if not isinstance(fp, str) or not fp.strip():
            raise CurateError(f"{line}: empty filepath")
        if os.path.isabs(fp) or fp.startswith(("/", "\\")):
            raise CurateError(f"{line}: filepath {fp!r} is absolute: it escapes the data root "
                              "(manifest paths are relative to DATA)")
        if ".." in fp.replace("\\", "/").split("/"):
            raise CurateError(f"{line}: filepath {fp!r} contains '..': it escapes the data root "
                              "(manifest paths are relative to DATA)")
    repeated = filepaths[filepaths.duplicated(keep=False)]
    if len(repeated):
        fp = repeated.iloc[0]
        raise CurateError(f"{path}: filepath {fp!r} appears in {int((filepaths == fp).sum())} rows "
                          f"({repeated.nunique()} path(s) repeated); a manifest has one row per file")


def safe_relpath(root: Path, relpath: str) -> Path:
    """Join a manifest's relative `filepath` to `root`, refusing anything that escapes it."""
    if not isinstance(relpath, str) or not relpath:
        raise CurateError(f"empty filepath in manifest (root {root})")
    if os.path.isabs(relpath):
        raise CurateError(f"{relpath}: absolute path in manifest; paths must be relative to {root}")
    root_abs = Path(os.path.abspath(root))
    full = Path(os.path.abspath(root_abs / relpath))
    if full != root_abs and root_abs not in full.parents:
        raise CurateError(f"{relpath}: path escapes the data root {root}")
    return full


# Groups of manifest flags, one definition for export's policies, the report and the App's views.
UNREADABLE_FLAGS = ("corrupt", "truncated", "not_image")
LOW_QUALITY_FLAGS = ("blurry", "dark", "bright", "low_information", "tiny", "odd_aspect_ratio", "grayscale")
OFF_CLASS_FLAGS = ("off_class", "outlier")


def flags_of(cell: str) -> list[str]:
    """Split a manifest `flags` cell ('a;b') into issue names."""
    return [f for f in str(cell or "").split(";") if f]


def add_flag(cell: str, flag: str) -> str:
    """Add `flag` to a `flags` cell, keeping order and no duplicates."""
    names = flags_of(cell)
    if flag not in names:
        names.append(flag)
    return ";".join(names)


CLUSTER_ORDER = ("mean_label_quality", "score")  # clusters.csv columns, both low = suspicious


def suspicious_clusters_first(clusters: pd.DataFrame) -> pd.DataFrame:
    """clusters.csv rows, most suspicious first: by the members' mean label_quality, then the cluster's own
    structure score (whichever of the two the table has; a cell that is not a number sorts last). Stable,
    so rows that tie keep their order."""
    import pandas as pd

    keys = [k for k in CLUSTER_ORDER if k in clusters.columns]
    if not keys:
        return clusters
    numeric = pd.DataFrame({k: pd.to_numeric(clusters[k], errors="coerce") for k in keys}, index=clusters.index)
    return clusters.loc[numeric.sort_values(keys, kind="stable", na_position="last").index]
