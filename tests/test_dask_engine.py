"""`curate scan --engine dask`: same manifest as the local engine, fsspec URLs, Parquet partitions, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from conftest import make_dataset

from curate import cli, dask_engine
from curate.dask_engine import PARTITIONS_DIR, fsspec_walk, split_url
from curate.io import CurateError, read_manifest
from curate.scan import CACHE_NAME, scan, walk_data

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of 2 single-threaded worker processes for the tests that pass a scheduler address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


@pytest.fixture
def mixed_dataset(tmp_path: Path) -> Path:
    """Real photos (4 per class) plus what the per-file and dataset-level steps must handle alike."""
    root = make_dataset(tmp_path / "mixed", per_class=4)
    daisy = sorted((root / "daisy").glob("*.jpg"))
    shutil.copyfile(daisy[0], root / "roses" / "copy_of_daisy.jpg")  # cross-label exact duplicate
    (root / "tulips" / "cut.jpg").write_bytes(daisy[1].read_bytes()[:4000])  # truncated JPEG
    (root / "tulips" / "notes.jpg").write_text("not an image\n")  # not_image
    (root / "sunflowers" / ".hidden.jpg").write_bytes(daisy[2].read_bytes())  # ignored by both walks
    (root / "sunflowers" / "readme.txt").write_text("ignored\n")
    (root / "loose.jpg").write_bytes(daisy[2].read_bytes())  # image outside any class folder: skipped
    (root / "empty_class").mkdir()
    return root


def _outputs(run: Path) -> tuple[bytes, bytes, dict]:
    info = json.loads((run / "scan.json").read_text())
    for volatile in ("seconds", "from_cache"):
        info.pop(volatile)
    return (run / "manifest.csv").read_bytes(), (run / "duplicates.csv").read_bytes(), info


def _cluster_processes() -> set[int]:
    """Child processes of this test process, but multiprocessing's resource tracker (it lives as long as we do)."""
    return {p.pid for p in psutil.Process().children(recursive=True)
            if not any("resource_tracker" in part for part in p.cmdline())}


def _partition_rows(run: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in (run / PARTITIONS_DIR).glob("part-*.parquet"))


def test_dask_engine_on_a_local_cluster_writes_what_the_local_engine_writes(mixed_dataset: Path,
                                                                             tmp_path: Path) -> None:
    scan(mixed_dataset, out=tmp_path / "local", workers=1, progress=False)
    children_before = _cluster_processes()

    # the CLI path, with its default: a LocalCluster of --workers processes
    rc = cli.main(["scan", str(mixed_dataset), "--out", str(tmp_path / "dask"), "--engine", "dask",
                   "--workers", "2", "-q"])
    assert rc == 0
    assert _cluster_processes() <= children_before  # the LocalCluster's scheduler and workers are gone

    local, dask = _outputs(tmp_path / "local"), _outputs(tmp_path / "dask")
    assert dask[0] == local[0]  # manifest.csv, byte for byte
    assert dask[1] == local[1]  # duplicates.csv
    assert dask[2] == local[2]  # scan.json: data, counts, thresholds, skipped, ...
    manifest = read_manifest(tmp_path / "dask" / "manifest.csv")
    bad = manifest.set_index("filepath").loc[["tulips/cut.jpg", "tulips/notes.jpg"]]
    assert (bad["error"] != "").all() and bad["flags"].str.contains("truncated|not_image").all()
    assert "cross_label_duplicate" in manifest.set_index("filepath").loc["roses/copy_of_daisy.jpg", "flags"]
    assert _partition_rows(tmp_path / "dask") == len(manifest)


def test_file_url_is_read_through_fsspec_and_a_rerun_resumes_from_partitions(mixed_dataset: Path, tmp_path: Path,
                                                                             cluster) -> None:
    scan(mixed_dataset, out=tmp_path / "local", workers=1, progress=False)
    run = tmp_path / "url"
    url = mixed_dataset.resolve().as_uri()
    assert url.startswith("file://")
    scan(url, out=run, engine="dask", scheduler=cluster.scheduler_address, progress=False)
    assert _outputs(run) == _outputs(tmp_path / "local")  # data recorded as the local folder, rows identical
    assert len(cluster.scheduler_info["workers"]) == 2  # a given scheduler is left running

    # An interrupted run: no per-file cache, one partition lost, and a finished one that must not be re-read
    # (its rows are marked, so a re-read would show).
    parts = sorted((run / PARTITIONS_DIR).glob("part-*.parquet"))
    assert len(parts) >= 2
    (run / CACHE_NAME).unlink()
    (run / "manifest.csv").unlink()
    lost = set(pq.read_table(parts[-1]).column("key_path").to_pylist())
    parts[-1].unlink()
    table = pq.read_table(parts[0])
    marked = table.column("key_path").to_pylist()
    frame = table.to_pandas()
    frame["blur"] = 12345.0
    pq.write_table(table.from_pandas(frame, preserve_index=False).replace_schema_metadata(table.schema.metadata),
                   parts[0])

    scan(url, out=run, engine="dask", scheduler=cluster.scheduler_address, progress=False)
    before = read_manifest(tmp_path / "local" / "manifest.csv").set_index("filepath")
    after = read_manifest(run / "manifest.csv").set_index("filepath")
    assert (after.loc[marked, "blur"] == 12345.0).all()  # taken from the finished partition
    assert (after.drop(index=marked)["blur"].fillna(-1) == before.drop(index=marked)["blur"].fillna(-1)).all()
    assert after.loc[sorted(lost), "sha256"].tolist() == before.loc[sorted(lost), "sha256"].tolist()
    assert _partition_rows(run) == len(after)  # the lost files are in a new partition, nothing twice


def test_fsspec_walk_lists_what_walk_data_lists(mixed_dataset: Path) -> None:
    by_path = walk_data(mixed_dataset)
    by_url = fsspec_walk(mixed_dataset.resolve().as_uri())
    assert [f[:2] for f in by_url.files] == [f[:2] for f in by_path.files]  # (relpath, size)
    assert by_url.classes == by_path.classes
    assert by_url.empty_classes == by_path.empty_classes == ["empty_class"]
    assert by_url.skipped == by_path.skipped
    assert by_url.other_files == by_path.other_files == 1


def test_fsspec_walk_does_not_read_through_a_link_out_of_data(small_dataset: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jpg"
    outside.write_bytes((next((small_dataset / "daisy").glob("*.jpg"))).read_bytes())
    (small_dataset / "daisy" / "link.jpg").symlink_to(outside)
    walk = fsspec_walk(small_dataset.as_uri())
    assert "daisy/link.jpg" not in [f[0] for f in walk.files]
    assert {"path": "daisy/link.jpg", "reason": "symlink pointing outside DATA, not followed"} in walk.skipped
    assert len(walk.files) == 30


def test_split_url() -> None:
    assert split_url("/data/flowers") == ("/data/flowers", None)
    assert split_url("file:///data/flowers/") == ("/data/flowers", "file:///data/flowers")
    assert split_url("s3://bucket/flowers") == ("s3://bucket/flowers", "s3://bucket/flowers")


def test_missing_url_and_unknown_protocol_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CurateError, match="no such folder"):
        scan((tmp_path / "nowhere").as_uri(), out=tmp_path / "run", engine="dask", progress=False)
    with pytest.raises(CurateError, match="nosuchproto://x"):
        scan("nosuchproto://x/flowers", out=tmp_path / "run2", engine="dask", progress=False)
    assert not list(tmp_path.glob("run*/partitions"))


def test_unreachable_scheduler_is_a_clear_error(small_dataset: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dask_engine, "CONNECT_TIMEOUT", "2s")
    with pytest.raises(CurateError, match="cannot connect"):
        scan(small_dataset, out=tmp_path / "run", engine="dask", scheduler="tcp://127.0.0.1:9", progress=False)
    assert not (tmp_path / "run" / PARTITIONS_DIR).exists()
