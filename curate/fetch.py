"""`curate fetch`: put the flower_photos dataset in place, from a folder, a .tgz, or the official download.

The source is only ever read. Everything is first staged in a hidden folder beside the
destination and moved into place at the end, so an interrupted fetch leaves no half dataset.
Archives are unpacked with tarfile's "data" filter: no member may escape the destination,
no device files, no links pointing outside.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from curate.io import IMAGE_EXTENSIONS, CurateError

log = logging.getLogger("curate.fetch")

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
# From TensorFlow Datasets' checksum file for tf_flowers (tensorflow_datasets/url_checksums/tf_flowers.txt).
FLOWERS_BYTES = 228_813_984
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"

_OFFICIAL_URL = FLOWERS_URL  # the archive the size/sha256 belong to (FLOWERS_URL may be patched in tests)


def has_dataset(folder: Path) -> bool:
    """True if `folder` has at least one class sub-folder holding an image file."""
    if not folder.is_dir():
        return False
    for sub in folder.iterdir():
        if sub.is_dir() and not sub.name.startswith("."):
            if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in sub.iterdir() if p.is_file()):
                return True
    return False


def fetch(source: str | os.PathLike | None, dest: str | os.PathLike, progress: bool = True,
          url: str | None = None) -> Path:
    """Put a dataset into `dest` and return `dest`.

    `source`: a folder of class folders (copied; the source is never written), a `.tgz` /
    `.tar.gz` archive (unpacked safely), or None to download `url` (checked against the known
    size and sha256 when it is the official flower_photos archive). Does nothing if `dest`
    already has class folders with images. Raises CurateError (exit 2) for a missing or unusable
    source and, offline without `source`, for the failed download.
    """
    url = url or FLOWERS_URL
    dest = Path(dest)
    if has_dataset(dest):
        log.info("%s already holds a dataset; nothing to fetch", dest)
        return dest
    if dest.exists() and not dest.is_dir():
        raise CurateError(f"{dest}: exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.fetch-", dir=dest.parent))
    try:
        if source is None:
            archive = stage / "download.tgz"
            _download(url, archive, progress)
            _unpack(archive, stage / "unpacked")
            archive.unlink()
            root = _dataset_root(stage / "unpacked")
        else:
            src = Path(source)
            if not src.exists():
                raise CurateError(f"--from {source}: no such file or folder")
            if src.is_dir():
                _check_not_nested(src, dest)
                root = stage / "copy"
                _copy_dataset(src, root, progress)
            elif src.name.endswith((".tgz", ".tar.gz")):
                _unpack(src, stage / "unpacked")
                root = _dataset_root(stage / "unpacked")
            else:
                raise CurateError(f"--from {source}: expected a folder of class folders or a .tgz archive")
        if not has_dataset(root):
            raise CurateError(f"{source or url}: holds no class folders with images")
        _move_into(root, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("dataset in place: %s", dest)
    return dest


def _check_not_nested(src: Path, dest: Path) -> None:
    s, d = os.path.realpath(src), os.path.realpath(dest)
    if s == d or d.startswith(s + os.sep) or s.startswith(d + os.sep):
        raise CurateError(f"--from {src} and --dest {dest} overlap; choose a destination outside the source")


def _copy_dataset(src: Path, out: Path, progress: bool) -> None:
    """Copy the regular files of `src` (class folders and top-level files such as LICENSE.txt) into `out`.

    Symlinks are not followed: a link could point anywhere on the machine.
    """
    from tqdm import tqdm

    files = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                files.append(path)
    for path in tqdm(files, unit="file", desc="copy", disable=not progress):
        target = out / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def _download(url: str, out: Path, progress: bool) -> None:
    from tqdm import tqdm

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(out, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CurateError(f"cannot download {url} ({reason}); offline? use --from PATH with a local copy") from None
    size = out.stat().st_size
    if url == _OFFICIAL_URL and (size != FLOWERS_BYTES or digest.hexdigest() != FLOWERS_SHA256):
        raise CurateError(f"{url}: downloaded {size} bytes with sha256 {digest.hexdigest()}, expected "
                          f"{FLOWERS_BYTES} bytes with sha256 {FLOWERS_SHA256}; the download is damaged, retry")


def _unpack(archive: Path, out: Path) -> None:
    """Extract `archive` into `out`; refuse members that would land outside `out` or are not plain data."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                # the data filter would only strip a leading "/"; an archive with such names is refused outright
                if member.name.startswith(("/", "\\")) or ".." in Path(member.name).parts:
                    raise CurateError(f"{archive}: unsafe member {member.name!r} refused (absolute or '..' path); "
                                      "nothing was extracted into place")
            tar.extractall(out, filter="data")
    except tarfile.FilterError as exc:
        member = getattr(exc, "tarinfo", None)
        name = member.name if member is not None else "?"
        raise CurateError(f"{archive}: unsafe member {name!r} refused ({exc}); nothing was extracted into place") \
            from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CurateError(f"{archive}: not a readable .tgz archive ({exc})") from None


def _dataset_root(unpacked: Path) -> Path:
    """The folder holding the class folders: the archive's single top folder (flower_photos/), or its root."""
    entries = [p for p in unpacked.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not has_dataset(unpacked):
        return entries[0]
    return unpacked


def _move_into(root: Path, dest: Path) -> None:
    """Move every entry of `root` into `dest`, keeping what `dest` already has (e.g. its README.md)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(root.iterdir()):
        target = dest / entry.name
        if target.exists():
            if entry.is_dir() and target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            else:
                log.info("%s: already there, kept", target)
                continue
        os.replace(entry, target)
