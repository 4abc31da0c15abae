"""`curate scan --engine dask`: the per-file work of a scan as Dask tasks, its results as Parquet partitions.

The scan's per-file work (read, sha256, decode, hashes, quality metrics: `curate.scan.scan_file` /
`scan_bytes`) is embarrassingly parallel; everything that needs the whole dataset (data-relative
thresholds, duplicate groups, the manifest) stays in `curate.scan.scan`, which takes the rows this
module yields exactly as it takes those of its local process pool -- so both engines write the same
manifest.

- Cluster: a `distributed.LocalCluster` (processes, one per core, one thread each) unless a
  scheduler address is given; the cluster and the client are closed in every case.
- Data: a local folder, or an fsspec URL (`file://`, `s3://`, `gs://`, ...) listed by `fsspec_walk`
  and read by the workers through fsspec.
- Partitions: each task scans a batch of files and sends its rows back; the client writes them
  at once, atomically, as `<run>/partitions/part-NNNNN.parquet` and drops them, and keeps only a
  bounded number of tasks in flight -- so the rows of millions of files never pile up in one
  process before the merge. A later (resumed) scan takes every row it still needs from the
  finished partitions, keyed by (path, size, mtime), and submits only the rest.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from curate.io import IMAGE_EXTENSIONS, CurateError, atomic_path
from curate.scan import MANIFEST_COLUMNS, ScanConfig, Walk, scan_bytes, scan_file, unreadable_row

log = logging.getLogger("curate.dask_engine")

PARTITIONS_DIR = "partitions"
_KEY_COLUMNS = ["key_path", "key_size", "key_mtime_ns"]  # the walk's (relpath, size, mtime_ns) of the row
_CONFIG_META = b"curate_scan_config"  # Parquet schema metadata: ScanConfig.fingerprint() of the rows
_PART_NAME = re.compile(r"^part-(\d+)\.parquet$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
CONNECT_TIMEOUT = "10s"  # how long to wait for a --scheduler before giving up

Key = tuple[str, int, int]


# ---------------------------------------------------------------- where the data is

def split_url(data: str | os.PathLike) -> tuple[str, str | None]:
    """(what to check and record as DATA, the fsspec URL to read through or None for a plain path).

    A `file://` URL is checked and recorded as its local folder (later stages open files there)
    but still listed and read through fsspec; any other URL (s3://, gs://, ...) is both.
    """
    text = os.fspath(data)
    if not _URL.match(text):
        return text, None
    url = text.rstrip("/")
    if url.startswith("file://"):
        return url[len("file://"):] or "/", url
    return url, url


def is_remote(url: str | None) -> bool:
    """True for a URL that is not on this machine's file system (no local checks possible)."""
    return url is not None and not url.startswith("file://")


def _mtime_ns(info: dict[str, Any]) -> int:
    """A modification stamp (ns) from an fsspec info dict, whatever the backend calls it; 0 if none."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return int(value * 1e9)
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        try:
            return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1e9)
        except ValueError:
            continue
    return 0


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def fsspec_walk(url: str) -> Walk:
    """List the images below an fsspec URL (class = first-level folder), as `curate.scan.walk_data` does.

    Hidden files and folders are ignored; an image directly under the root is skipped (no label);
    files without an image extension are counted, not scanned. Raises CurateError if the URL
    cannot be listed or is not a folder.
    """
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # e.g. s3:// without s3fs installed
        raise CurateError(f"{url}: cannot open this URL ({exc})") from None
    base = base.rstrip("/")
    try:
        if not fs.isdir(base):
            raise CurateError(f"{url}: no such folder" if not fs.exists(base) else
                              f"{url}: not a folder (expected one sub-folder per class)")
        top = fs.ls(base, detail=True)
        found = fs.find(base, detail=True)
    except OSError as exc:
        raise CurateError(f"{url}: cannot list ({exc})") from None

    walk = Walk()
    # on a local file system, as walk_data: never read through a link out of DATA
    local_root = os.path.realpath(base) if "file" in fs.protocol or "local" in fs.protocol else ""
    prefix = base + "/" if base else ""
    walk.classes = sorted(posixpath.basename(e["name"].rstrip("/")) for e in top if e.get("type") == "directory")
    walk.classes = [c for c in walk.classes if not c.startswith(".")]
    per_class = dict.fromkeys(walk.classes, 0)
    for name, info in sorted(found.items()):
        rel = name[len(prefix):] if name.startswith(prefix) else name
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or info.get("type") == "directory":
            continue
        is_image = posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS
        if len(parts) == 1:
            if is_image:
                walk.skipped.append({"path": rel, "reason": "image outside any class folder (no label)"})
            continue
        if not is_image:
            walk.other_files += 1
            continue
        if local_root and not _inside(os.path.realpath(name), local_root):
            walk.skipped.append({"path": rel, "reason": "symlink pointing outside DATA, not followed"})
            continue
        walk.files.append((rel, int(info.get("size") or 0), _mtime_ns(info)))
        per_class[parts[0]] = per_class.get(parts[0], 0) + 1
    walk.empty_classes = [c for c in walk.classes if per_class.get(c, 0) == 0]
    return walk


# ---------------------------------------------------------------- the task

def scan_batch(source: str, is_url: bool, keys: list[Key], config: ScanConfig) -> list[dict[str, Any]]:
    """The manifest rows of a batch of files (runs on a worker): `scan_file` for a folder, fsspec + `scan_bytes`.

    Each row also carries its walk key (key_path, key_size, key_mtime_ns) so a partition can be
    matched to a later walk. Never raises for a bad file (the row says why it failed).
    """
    rows = []
    if is_url:
        import fsspec

        fs, base = fsspec.core.url_to_fs(source)
        base = base.rstrip("/")
    for relpath, size, mtime_ns in keys:
        if not is_url:
            row = scan_file(source, relpath, config)
        else:
            try:
                with fs.open(f"{base}/{relpath}", "rb") as f:
                    data = f.read()
            except OSError as exc:
                row = unreadable_row(relpath, f"cannot read file: {exc.strerror or exc}")
            else:
                row = scan_bytes(data, relpath, config)
        row.update(key_path=relpath, key_size=size, key_mtime_ns=mtime_ns)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- partitions

def _partition_paths(part_dir: Path) -> list[Path]:
    if not part_dir.is_dir():
        return []
    return sorted((p for p in part_dir.iterdir() if _PART_NAME.match(p.name)), key=lambda p: p.name)


def _write_partition(path: Path, rows: list[dict[str, Any]], fingerprint: str) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(pd.DataFrame(rows, columns=_KEY_COLUMNS + MANIFEST_COLUMNS), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _CONFIG_META: fingerprint.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def rows_from_partitions(part_dir: Path, wanted: set[Key], fingerprint: str) -> Iterator[tuple[Key, dict]]:
    """(key, row) for every wanted key found in a finished partition written with the same config.

    Reads one partition at a time; an unreadable partition or one of another config is skipped
    (its files are scanned again).
    """
    import pyarrow.parquet as pq

    for path in _partition_paths(part_dir):
        try:
            meta = pq.read_schema(path).metadata or {}
            if meta.get(_CONFIG_META, b"").decode() != fingerprint:
                continue
            frame = pq.read_table(path).to_pandas()
        except Exception as exc:  # a damaged partition only costs re-scanning its files
            log.warning("%s: ignoring unreadable partition (%s)", path, exc)
            continue
        for rec in frame.to_dict("records"):
            key = (rec.pop("key_path"), int(rec.pop("key_size")), int(rec.pop("key_mtime_ns")))
            if key in wanted:
                wanted.discard(key)  # a key found twice (re-scanned after a damaged run) counts once
                yield key, {c: rec[c] for c in MANIFEST_COLUMNS}


# ---------------------------------------------------------------- the cluster

def _client(scheduler: str | None, workers: int):
    """(client, cluster or None): connect to `scheduler`, or start a LocalCluster of `workers` processes."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout=CONNECT_TIMEOUT), None
        except (OSError, TimeoutError) as exc:
            raise CurateError(f"--scheduler {scheduler}: cannot connect to a Dask scheduler ({exc})") from None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def _batch_size(n_files: int, workers: int) -> int:
    """Files per task (= per partition): ~8 tasks per worker for balance, 16..1000 files each."""
    return max(16, min(1000, -(-n_files // (8 * max(workers, 1)))))


def dask_rows(source: str, todo: list[Key], config: ScanConfig, run_dir: str | os.PathLike,
              scheduler: str | None = None, workers: int | None = None, progress: bool = True,
              use_partitions: bool = True) -> Iterator[tuple[Key, dict[str, Any]]]:
    """Yield (key, manifest row) for every file in `todo`, computed by Dask tasks (curate.scan.scan's loop).

    In: `source` = the data folder or an fsspec URL, the walk keys still to scan, the scan config,
    the run folder (partitions go to <run>/partitions/), a scheduler address (default: a
    LocalCluster of `workers` processes, all cores by default). Rows already in finished
    partitions of the same config are yielded first without any cluster; `use_partitions=False`
    deletes the old partitions instead. The cluster is started only if something is left to scan.
    """
    from tqdm import tqdm

    part_dir = Path(run_dir) / PARTITIONS_DIR
    fingerprint = config.fingerprint()
    if not use_partitions:
        for path in _partition_paths(part_dir):
            path.unlink()
    wanted = set(todo)
    if use_partitions:
        for key, row in rows_from_partitions(part_dir, wanted, fingerprint):
            yield key, row
    left = [k for k in todo if k in wanted]  # keeps the walk's order
    log.info("dask scan: %d files from finished partitions, %d to scan", len(todo) - len(left), len(left))
    if not left:
        return

    from distributed import as_completed

    workers = workers or os.cpu_count() or 1
    is_url = _URL.match(source) is not None
    client, cluster = _client(scheduler, workers)
    bar = tqdm(total=len(left), unit="img", desc="scan (dask)", disable=not progress, smoothing=0.1)
    try:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or workers)
        size = _batch_size(len(left), n_workers)
        batches = iter([left[i:i + size] for i in range(0, len(left), size)])
        existing = [int(_PART_NAME.match(p.name).group(1)) for p in _partition_paths(part_dir)]
        next_index = max(existing, default=-1) + 1
        part_dir.mkdir(parents=True, exist_ok=True)
        # Bounded in flight: results wait on the client only until written, never all at once.
        in_flight = as_completed()
        for batch in _take(batches, 2 * n_workers + 2):
            in_flight.add(client.submit(scan_batch, source, is_url, batch, config, pure=False))
        for future in in_flight:
            rows = future.result()
            future.release()
            _write_partition(part_dir / f"part-{next_index:05d}.parquet", rows, fingerprint)
            next_index += 1
            for nxt in _take(batches, 1):
                in_flight.add(client.submit(scan_batch, source, is_url, nxt, config, pure=False))
            for row in rows:
                key = (row.pop("key_path"), row.pop("key_size"), row.pop("key_mtime_ns"))
                yield key, row
            bar.update(len(rows))
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()


def _take(it: Iterator[list[Key]], n: int) -> list[list[Key]]:
    out = []
    for _ in range(n):
        nxt = next(it, None)
        if nxt is None:
            break
        out.append(nxt)
    return out
