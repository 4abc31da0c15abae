"""The FiftyOne review loop on a small real run: dataset, saved views, Brain, review tags read back.

Every test here talks to a private MongoDB started for this module (FiftyOne's own mongod binary,
a temporary --dbpath, a free port) through FIFTYONE_DATABASE_URI, so the user's FiftyOne database
is never touched; the fixture stops that mongod at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from badinputs import curate
from conftest import make_dataset
from PIL import Image

from curate.io import CurateError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mongod_binary() -> Path:
    # found without importing fiftyone (whose import reads the database settings once)
    import importlib.util

    spec = importlib.util.find_spec("fiftyone")
    return Path(spec.submodule_search_locations[0]) / "db" / "bin" / "mongod"


def _wait_for_port(port: int, proc: subprocess.Popen, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on port {port} within {deadline_s:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a process we started (and wait); kill it if it ignores SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def private_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB of our own for this module; FIFTYONE_DATABASE_URI points at it. Yields the URI."""
    db_dir = tmp_path_factory.mktemp("fiftyone_db")
    port = free_port()
    proc = subprocess.Popen([str(_mongod_binary()), "--dbpath", str(db_dir), "--port", str(port),
                             "--bind_ip", "127.0.0.1", "--nounixsocket", "--logpath", str(db_dir / "mongod.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("FIFTYONE_DATABASE_URI", "FIFTYONE_DATABASE_DIR",
                                            "FIFTYONE_PRIVATE_DATABASE_PORT", "FIFTYONE_DO_NOT_TRACK")}
    saved_uri = sys.modules["fiftyone"].config.database_uri if "fiftyone" in sys.modules else None
    try:
        _wait_for_port(port, proc, 60, "mongod")
        uri = f"mongodb://127.0.0.1:{port}"
        os.environ["FIFTYONE_DATABASE_URI"] = uri
        os.environ["FIFTYONE_DATABASE_DIR"] = str(db_dir)  # unused with a URI; set so nothing falls back to ~
        os.environ.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
        os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
        if "fiftyone" in sys.modules:  # imported earlier in this session: point its config here too
            import fiftyone as fo
            import fiftyone.core.odm.database as fodb

            fodb._disconnect()
            fodb._connection_kwargs.clear()
            fo.config.database_uri = uri
        yield uri
    finally:
        if "fiftyone" in sys.modules:  # leave FiftyOne pointing where it pointed before, not at a dead mongod
            import fiftyone as fo
            import fiftyone.core.odm.database as fodb

            fodb._disconnect()
            fodb._connection_kwargs.clear()
            fo.config.database_uri = saved_uri
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_process(proc)


def write_small_run(run_dir: Path, data: Path, embeddings: bool = True) -> pd.DataFrame:
    """A run folder over `data` (6 real photos per class) with the scan and flag contract's columns.

    Situations set by hand, so each test knows what to expect: an exact-duplicate pair, a
    cross-label near-duplicate pair, three low-quality photos (one with two issues), one
    unreadable file, five off_class/outlier photos with distinct label_quality, a flagged cluster,
    fake oof probabilities and embeddings.
    """
    (data / "tulips" / "broken.jpg").write_bytes(b"not a jpeg at all")
    rows = []
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        row = dict(filepath=path.relative_to(data).as_posix(), label=path.parent.name, bytes=len(raw),
                   sha256=hashlib.sha256(raw).hexdigest(), format="", width=np.nan, height=np.nan, mode="",
                   phash="", dhash="", blur=np.nan, brightness=np.nan, contrast=np.nan, entropy=np.nan,
                   dup_group="", flags="", error="")
        try:
            with Image.open(path) as im:
                gray = np.asarray(im.convert("L"), dtype=np.float32)
                row.update(format=im.format, width=im.width, height=im.height, mode=im.mode, phash="0" * 16,
                           dhash="0" * 16, blur=float(gray.var()), brightness=float(gray.mean()),
                           contrast=float(gray.std()), entropy=float(im.convert("L").entropy()))
        except OSError as exc:
            row.update(error=f"cannot identify image: {exc}", flags="not_image")
        rows.append(row)
    m = pd.DataFrame(rows)
    by_class = {c: m.index[m["label"] == c].tolist() for c in CLASSES}

    def flag(i: int, name: str) -> None:
        m.loc[i, "flags"] = ";".join(filter(None, [m.loc[i, "flags"], name]))

    d0, d1 = by_class["daisy"][:2]
    m.loc[[d0, d1], "dup_group"] = "g1"
    flag(d1, "exact_duplicate")  # scan may flag only the copies; the view must still show the whole group
    r0, t0 = by_class["roses"][0], by_class["tulips"][0]
    m.loc[[r0, t0], "dup_group"] = "g2"
    for i in (r0, t0):
        flag(i, "near_duplicate")
        flag(i, "cross_label_duplicate")
    s0, s1, s2 = by_class["sunflowers"][:3]
    flag(s0, "blurry")
    flag(s1, "dark")
    flag(s1, "low_information")
    flag(s2, "grayscale")  # low quality like the others: the strict export policy drops it as low_quality
    m.loc[[s0, s1, s2], "blur"] = [5.0, 40.0, 900.0]

    readable = m["error"] == ""
    quality = np.linspace(0.95, 0.6, len(m))
    off = [by_class["roses"][3], by_class["roses"][4], by_class["roses"][5], by_class["tulips"][4],
           by_class["dandelion"][2]]
    for i, q in zip(off, [0.30, 0.05, 0.20, 0.10, 0.40], strict=True):
        quality[i] = q
        flag(i, "off_class" if i != by_class["dandelion"][2] else "outlier")
    m["label_quality"] = np.where(readable, quality.round(4), np.nan)
    m["q_cleanlab"] = m["label_quality"]
    m["suggested_label"] = np.where(readable, m["label"], "")
    m.loc[by_class["roses"][4], "suggested_label"] = "tulips"
    # cluster 1 of roses = the three off_class roses (a flagged cluster); everything else cluster 0
    m["cluster"] = pd.array(np.where(readable, 0, np.nan), dtype="Int64")
    m.loc[by_class["roses"][3:6], "cluster"] = 1
    m["models_disagreeing"] = pd.array(np.where(readable, 0, np.nan), dtype="Int64")
    m.loc[by_class["roses"][4], "models_disagreeing"] = 1

    run_dir.mkdir(parents=True, exist_ok=True)
    m.to_csv(run_dir / "manifest.csv", index=False)
    (run_dir / "scan.json").write_text(json.dumps({"data": str(data.resolve()), "thresholds": {}, "counts": {}}))
    dups = pd.DataFrame([("g1", "exact", m.loc[d0, "filepath"], "daisy", 0, True),
                         ("g1", "exact", m.loc[d1, "filepath"], "daisy", 0, False),
                         ("g2", "near", m.loc[r0, "filepath"], "roses", 0, True),
                         ("g2", "near", m.loc[t0, "filepath"], "tulips", 3, False)],
                        columns=["dup_group", "kind", "filepath", "label", "distance", "keep"])
    dups.to_csv(run_dir / "duplicates.csv", index=False)
    pd.DataFrame([("roses", 1, 3, -2.0, 0.18, ""), ("roses", 0, 3, 0.5, 0.9, ""), ("daisy", 0, 6, 0.9, 0.9, "")],
                 columns=["label", "cluster", "size", "score", "mean_label_quality", "examples"]
                 ).to_csv(run_dir / "clusters.csv", index=False)

    rng = np.random.default_rng(0)
    labels = m["label"].map({c: k for k, c in enumerate(CLASSES)}).to_numpy()
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(m)) * 0.4
    probs[np.arange(len(m)), labels] += 0.6
    probs[by_class["roses"][4]] = [0.02, 0.02, 0.06, 0.05, 0.85]  # confidently tulips
    probs[~readable.to_numpy()] = np.nan
    np.save(run_dir / "oof_vit.npy", probs.astype(np.float32))
    if embeddings:
        emb = rng.normal(size=(len(m), 8)).astype(np.float32) + labels[:, None]
        emb[~readable.to_numpy()] = 0.0
        np.save(run_dir / "embeddings.npy", emb)
    return m


def as_twelve_bit(photo: Path, suffix: str) -> Path:
    """Replace a real JPEG by its grey picture as a 12-bit machine-vision camera saves it (16-bit TIFF or PNG)."""
    grey = np.asarray(Image.open(photo).convert("L"))
    out = photo.with_suffix(suffix)
    Image.fromarray(grey.astype(np.uint16) * 16).save(out)
    photo.unlink()
    return out


@pytest.fixture(scope="module")
def built(private_mongo: str, tmp_path_factory: pytest.TempPathFactory):
    """(run_dir, manifest, dataset): the small run built once for this module's tests."""
    from conftest import make_dataset

    from curate.fiftyone_bridge import build_dataset

    base = tmp_path_factory.mktemp("fo_run")
    data = make_dataset(base / "flowers", per_class=6)
    run_dir = base / "run"
    manifest = write_small_run(run_dir, data)
    dataset = build_dataset(run_dir, progress=False)
    return run_dir, manifest, dataset


def _relpaths(view) -> list[str]:
    return view.values("relpath")


def test_dataset_has_one_sample_per_row_with_labels_tags_fields(built):
    run_dir, m, ds = built
    assert ds.name == "curate-run" and ds.persistent
    assert len(ds) == len(m) == 31
    assert sorted(_relpaths(ds)) == sorted(m["filepath"])
    s = ds.match({"relpath": m.loc[m["flags"].str.contains("low_information"), "filepath"].iloc[0]}).first()
    assert s.ground_truth.label == "sunflowers"
    assert set(s.tags) == {"dark", "low_information"}
    for col in ("bytes", "width", "height", "blur", "brightness", "contrast", "entropy", "label_quality",
                "q_cleanlab", "cluster", "models_disagreeing"):
        assert s[col] is not None, col
    assert isinstance(s["width"], int) and isinstance(s["cluster"], int)
    assert s.metadata.width == s["width"] and s.metadata.size_bytes == s["bytes"]
    broken = ds.match({"relpath": "tulips/broken.jpg"}).first()
    assert broken["error"].startswith("cannot identify") and broken["width"] is None and broken.predictions is None
    state = json.loads((run_dir / "fiftyone.json").read_text())
    assert state["dataset"] == ds.name and state["samples"] == 31
    # every photo is one a browser draws: the App shows the files themselves, no copies
    assert ds.app_config.grid_media_field == "filepath" and "preview_filepath" not in ds.get_field_schema()
    assert not (run_dir / "app_media").exists()


def test_photos_a_browser_cannot_draw_are_shown_from_8_bit_copies(private_mongo, tmp_path, caplog):
    from conftest import make_dataset, tree_fingerprint

    from curate.fiftyone_bridge import build_dataset

    data = make_dataset(tmp_path / "flowers", per_class=6)
    tif = as_twelve_bit(sorted((data / "roses").glob("*.jpg"))[4], ".tif")
    png16 = as_twelve_bit(sorted((data / "daisy").glob("*.jpg"))[2], ".png")
    import cv2  # a 12-bit colour camera's 48-bit PNG: OpenCV writes it, Pillow would read only its high bytes

    jpeg48 = sorted((data / "tulips").glob("*.jpg"))[1]
    png48 = jpeg48.with_suffix(".png")
    colour = np.asarray(Image.open(jpeg48).convert("RGB"))
    assert cv2.imwrite(str(png48), colour[..., ::-1].astype(np.uint16) * 16)
    jpeg48.unlink()
    run_dir = tmp_path / "run"
    m = write_small_run(run_dir, data)
    m.loc[m["filepath"] == png48.relative_to(data).as_posix(), "mode"] = "RGB;16"  # as scan records it
    m.to_csv(run_dir / "manifest.csv", index=False)
    before = tree_fingerprint(data)
    ds = build_dataset(run_dir, progress=False)
    assert tree_fingerprint(data) == before  # the copies go to the run folder, never beside the photos
    assert ds.app_config.grid_media_field == ds.app_config.modal_media_field == "preview_filepath"
    by_rel = {s["relpath"]: s for s in ds}
    for src in (tif, png16):
        sample = by_rel[src.relative_to(data).as_posix()]
        copy = Path(sample["preview_filepath"])
        assert copy.parent == (run_dir / "app_media").resolve() and copy.suffix == ".png"
        with Image.open(copy) as im:
            assert im.mode == "RGB" and im.size == Image.open(src).size
            shown = np.asarray(im.convert("L"), dtype=float)
        grey = np.asarray(Image.open(src), dtype=float) / 16  # the 8-bit picture it was made from
        assert np.abs(shown - grey).mean() < 1.5  # not white (Pillow's clip) and not black (the browser's 16->8)
    copy = Path(by_rel[png48.relative_to(data).as_posix()]["preview_filepath"])
    assert copy.parent == (run_dir / "app_media").resolve()
    assert np.abs(np.asarray(Image.open(copy), dtype=float) - colour).mean() < 1.5
    jpeg = m.loc[m["filepath"].str.endswith(".jpg") & (m["error"] == ""), "filepath"].iloc[0]
    assert by_rel[jpeg]["preview_filepath"] == by_rel[jpeg]["filepath"]  # drawable: shown as it is
    assert by_rel["tulips/broken.jpg"]["preview_filepath"] == by_rel["tulips/broken.jpg"]["filepath"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="curate"):
        build_dataset(run_dir, progress=False, force=True)
    assert "(0 written now)" in caplog.text  # the copies are named by content: a rebuild reuses them
    # copies are shrunk to BridgeConfig.preview_max_side, never enlarged
    from curate.fiftyone_bridge import BridgeConfig

    small = build_dataset(run_dir, progress=False, config=BridgeConfig(preview_max_side=100))
    copy = Path(next(s for s in small if s["relpath"] == tif.relative_to(data).as_posix())["preview_filepath"])
    assert copy.name.endswith("_100.png") and max(Image.open(copy).size) == 100


def test_unchanged_inputs_skip_the_build_and_a_changed_file_does_not(built, caplog):
    from curate.fiftyone_bridge import build_dataset

    run_dir, _, ds = built
    with caplog.at_level(logging.INFO, logger="curate"):
        assert build_dataset(run_dir, progress=False).name == ds.name
    assert "is up to date" in caplog.text
    caplog.clear()
    clusters = run_dir / "clusters.csv"
    os.utime(clusters, ns=(clusters.stat().st_atime_ns, clusters.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="curate"):
        build_dataset(run_dir, progress=False)
    assert "is up to date" not in caplog.text and "built in" in caplog.text


def test_predictions_are_the_oof_probabilities(built):
    run_dir, m, ds = built
    probs = np.load(run_dir / "oof_vit.npy")
    fp = m.loc[m["suggested_label"] == "tulips"].query("label == 'roses'")["filepath"].iloc[0]
    s = ds.match({"relpath": fp}).first()
    i = m.index[m["filepath"] == fp][0]
    assert s.predictions.label == "tulips"
    assert s.predictions.confidence == pytest.approx(float(probs[i].max()), rel=1e-5)
    np.testing.assert_allclose(np.exp(s.predictions.logits), probs[i], rtol=1e-4)
    # Brain mistakenness from those predictions: the confidently mislabelled rose ranks first
    assert ds.sort_by("mistakenness", reverse=True).first().relpath == fp
    assert ds.info["prediction_models"] == ["vit"]


def test_brain_uniqueness_and_pca_from_our_embeddings(built):
    _, m, ds = built
    assert "uniqueness" in ds.list_brain_runs() and "embeddings_pca" in ds.list_brain_runs()
    u = [v for v in ds.values("uniqueness") if v is not None]
    assert len(u) == len(m) - 1 and 0 <= min(u) <= max(u) <= 1  # all but the unreadable file
    results = ds.load_brain_results("embeddings_pca")
    assert results.points.shape == (len(m) - 1, 2)


def test_sort_by_similarity_finds_the_nearest_photos_by_our_embeddings(built):
    """The App's "sort by similarity" (select photos, find more like them) works offline, from the same
    embeddings as the map: the order FiftyOne gives is the cosine order of the run's embeddings."""
    from curate.fiftyone_bridge import SIMILARITY_KEY

    run_dir, m, ds = built
    assert SIMILARITY_KEY in ds.list_brain_runs()
    emb = np.load(run_dir / "embeddings.npy")
    readable = (m["error"].fillna("") == "").to_numpy()  # the unreadable photo is not in the index
    z = emb - emb[readable].mean(axis=0)  # FiftyOne's sklearn index centres the embeddings first
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    query = int(np.flatnonzero(readable)[3])
    cosine = np.where(readable, z @ z[query], -np.inf)
    expected = m["filepath"].to_numpy()[np.argsort(-cosine, kind="stable")[:5]].tolist()
    sample = ds.match({"relpath": m["filepath"].iloc[query]}).first()
    got = _relpaths(ds.sort_by_similarity(sample.id, k=5, brain_key=SIMILARITY_KEY))
    assert got[0] == m["filepath"].iloc[query] and got == expected


def test_the_map_comes_from_the_pretrained_embeddings_when_flag_wrote_them(private_mongo, tmp_path):
    from conftest import make_dataset

    from curate.fiftyone_bridge import build_dataset

    data = make_dataset(tmp_path / "flowers", per_class=6)
    run_dir = tmp_path / "map_run"
    m = write_small_run(run_dir, data)  # its embeddings.npy: 8 random numbers per photo
    # pretrained embeddings that vary along one axis only: a PCA map of them is a line
    general = np.zeros((len(m), 32), np.float32)
    general[:, 3] = np.arange(len(m))
    np.save(run_dir / "embeddings_pretrained.npy", general)
    points = build_dataset(run_dir, progress=False).load_brain_results("embeddings_pca").points
    assert np.ptp(points[:, 0]) > 1 and np.allclose(points[:, 1], 0, atol=1e-3)
    # without them (flag --no-pretrained removes the file) the map is the representation's again
    (run_dir / "embeddings_pretrained.npy").unlink()
    points = build_dataset(run_dir, progress=False).load_brain_results("embeddings_pca").points
    assert np.ptp(points[:, 1]) > 0.1


def test_connecting_prints_no_notice_about_the_mongodb_version(private_mongo, caplog):
    import fiftyone.core.odm.database as fodb

    from curate.fiftyone_bridge import _fiftyone

    fo = _fiftyone()
    fodb._disconnect()
    with caplog.at_level(logging.INFO):
        fo.list_datasets()  # connects again, and FiftyOne checks the server's version
    assert fodb.get_db_version().major == 6  # the version FiftyOne warns about as its oldest supported
    assert not [r for r in caplog.records if "MongoDB" in r.getMessage()]


def test_saved_views_counts_and_worst_first(built):
    _, m, ds = built
    assert set(ds.list_saved_views()) >= {"off_class_candidates", "exact_duplicates", "near_duplicates",
                                          "cross_label_duplicates", "low_quality", "unreadable"}
    off = ds.load_saved_view("off_class_candidates")
    expected = m[m["flags"].str.contains("off_class|outlier")].sort_values("label_quality")["filepath"].tolist()
    assert _relpaths(off) == expected and len(expected) == 5
    q = off.values("label_quality")
    assert q == sorted(q)

    exact = ds.load_saved_view("exact_duplicates")
    assert _relpaths(exact) == m.loc[m["dup_group"] == "g1", "filepath"].tolist()  # whole group, keep first
    assert exact.values("dup_keep") == [True, False]
    for name in ("near_duplicates", "cross_label_duplicates"):
        assert set(_relpaths(ds.load_saved_view(name))) == set(m.loc[m["dup_group"] == "g2", "filepath"])

    low = _relpaths(ds.load_saved_view("low_quality"))
    sun = m[m["label"] == "sunflowers"]["filepath"].tolist()
    assert low == [sun[1], sun[0], sun[2]]  # two issues first, then by blur (5 before 900)
    assert _relpaths(ds.load_saved_view("unreadable")) == ["tulips/broken.jpg"]

    cluster = ds.load_saved_view("cluster_roses_1")
    assert len(cluster) == 3 and set(cluster.values("ground_truth.label")) == {"roses"}
    assert not ds.has_saved_view("cluster_roses_0") and not ds.has_saved_view("cluster_daisy_0")


def test_cluster_views_go_to_the_most_suspicious_clusters_first(built, tmp_path):
    import fiftyone as fo

    from curate.fiftyone_bridge import BridgeConfig, _cluster_views

    # every cluster eligible, one view allowed: it goes to the lowest mean label_quality, not the lowest score
    run_dir, m, ds = built
    # (a hand-edited row with no number sorts last instead of breaking the build)
    pd.DataFrame([("tulips", 0, 3, -3.0, "unknown", ""), ("roses", 1, 3, -2.0, 0.60, ""),
                  ("daisy", 0, 6, 0.9, 0.20, ""), ("roses", 0, 3, 0.5, 0.40, "")],
                 columns=["label", "cluster", "size", "score", "mean_label_quality", "examples"]
                 ).to_csv(tmp_path / "clusters.csv", index=False)
    cfg = BridgeConfig(cluster_view_min_flagged_share=0.0, max_cluster_views=1)
    views = _cluster_views(fo.ViewField, ds, tmp_path, m, cfg)
    assert list(views) == ["cluster_daisy_0"]
    assert set(views["cluster_daisy_0"].values("ground_truth.label")) == {"daisy"}
    cfg = BridgeConfig(cluster_view_min_flagged_share=0.0, max_cluster_views=4)
    views = _cluster_views(fo.ViewField, ds, tmp_path, m, cfg)
    assert list(views) == ["cluster_daisy_0", "cluster_roses_0", "cluster_roses_1", "cluster_tulips_0"]


def test_rebuild_is_idempotent_updates_fields_and_keeps_review_tags(built):
    from curate.fiftyone_bridge import build_dataset

    run_dir, m, ds = built
    first_ids = sorted(ds.values("id"))
    target = m.loc[m["label"] == "daisy", "filepath"].iloc[5]
    sample = ds.match({"relpath": target}).first()
    sample.tags.append("reject")
    sample.save()

    m2 = m.copy()
    m2.loc[m2["filepath"] == target, "flags"] = "blurry"
    m2.loc[m2["filepath"] == target, "blur"] = 1.0
    m2.to_csv(run_dir / "manifest.csv", index=False)
    try:
        ds2 = build_dataset(run_dir, progress=False)
        assert ds2.name == ds.name and sorted(ds2.values("id")) == first_ids  # no sample added or replaced
        s = ds2.match({"relpath": target}).first()
        assert set(s.tags) == {"blurry", "reject"} and s["blur"] == 1.0
        sun = m[m["label"] == "sunflowers"]["filepath"].tolist()
        assert _relpaths(ds2.load_saved_view("low_quality")) == [sun[1], target, sun[0], sun[2]]
    finally:
        m.to_csv(run_dir / "manifest.csv", index=False)
        build_dataset(run_dir, progress=False)
        s = ds.match({"relpath": target}).first()
        s.tags.remove("reject")
        s.save()
        assert ds.match({"relpath": target}).first().tags == []  # the stale 'blurry' issue tag went


def test_review_tags_read_back_and_status(built, capsys):
    from curate.cli import main
    from curate.fiftyone_bridge import read_review_tags, review_status

    run_dir, m, ds = built
    off = ds.load_saved_view("off_class_candidates")
    worst, second, third = _relpaths(off)[:3]
    daisy = m.loc[m["label"] == "daisy", "filepath"].iloc[4]
    ds.match({"relpath": worst}).tag_samples("relabel:tulips")
    ds.match({"relpath": second}).tag_samples("reject")
    ds.match({"relpath": third}).tag_samples(["keep", "reject"])  # conflicting: the cautious one wins
    ds.match({"relpath": daisy}).tag_samples("relabel:orchids")  # no such class: ignored
    try:
        tags = read_review_tags(run_dir).set_index("filepath")
        assert list(tags.columns) == ["decision", "relabel_to"]
        assert tags.loc[worst].tolist() == ["relabel", "tulips"]
        assert tags.loc[second].tolist() == ["reject", ""]
        assert tags.loc[third, "decision"] == "reject"
        assert daisy not in tags.index and len(tags) == 3
        status = review_status(run_dir)
        assert main(["review-status", "--run", str(run_dir)]) == 0
        assert capsys.readouterr().out.strip() == status
        n_flagged = int((m["flags"] != "").sum())
        assert f"3 of {n_flagged} flagged photos reviewed" in status
        assert "reject 2, keep 0, relabel 1" in status
        assert status.splitlines()[1].split()[:4] == ["off_class", "3", "/", "4"]
    finally:
        ds.untag_samples(["relabel:tulips", "reject", "keep", "relabel:orchids"])
    assert read_review_tags(run_dir).empty


def test_read_review_tags_without_a_dataset_is_empty_and_does_not_import_fiftyone(tmp_path: Path):
    code = ("import sys, curate.fiftyone_bridge as b; t = b.read_review_tags(sys.argv[1]); "
            "print(len(t), list(t.columns), 'fiftyone' in sys.modules)")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.csv").write_text("filepath,label\na/1.jpg,a\n")
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.split() == ["0", "['filepath',", "'decision',", "'relabel_to']", "False"]


def test_missing_dataset_named_in_state_file_reads_as_no_tags(private_mongo, tmp_path, caplog):
    from curate.fiftyone_bridge import read_review_tags, review_status

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.csv").write_text("filepath,label,flags\ndaisy/1.jpg,daisy,blurry\n")
    (run_dir / "fiftyone.json").write_text(json.dumps({"dataset": "curate-deleted-meanwhile", "database": "x"}))
    with caplog.at_level(logging.WARNING, logger="curate"):
        assert read_review_tags(run_dir).empty
    assert "curate-deleted-meanwhile" in caplog.text and "not found" in caplog.text
    assert "1 of 1 photos flagged, none reviewed yet" in review_status(run_dir)


def test_review_decisions_rules():
    from curate.fiftyone_bridge import parse_review_tag, review_decisions

    assert parse_review_tag("Reject") == ("reject", "")
    assert parse_review_tag("relabel: roses") == ("relabel", "roses")
    assert parse_review_tag("blurry") is None and parse_review_tag("rejected") is None
    frame, problems = review_decisions(["a", "b", "c", "d"], [["keep"], ["relabel"], ["relabel:x", "relabel:y"], []],
                                       classes=["x", "y"])
    assert frame.to_dict("records") == [{"filepath": "a", "decision": "keep", "relabel_to": ""},
                                        {"filepath": "c", "decision": "relabel", "relabel_to": "x"}]
    assert len(problems) == 2 and problems[0].startswith("b:") and problems[1].startswith("c:")


def test_build_rejects_a_manifest_with_a_repeated_filepath(private_mongo, tmp_path):
    from curate.fiftyone_bridge import build_dataset

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.csv").write_text("filepath,label\ndaisy/1.jpg,daisy\ndaisy/1.jpg,daisy\n")
    (run_dir / "scan.json").write_text(json.dumps({"data": str(tmp_path)}))
    with pytest.raises(CurateError, match="daisy/1.jpg.* appears in 2 rows"):
        build_dataset(run_dir, progress=False)


def test_analytics_off_and_database_dir_from_the_environment(tmp_path: Path):
    """Importing through the bridge turns analytics off unless the user chose; FIFTYONE_DATABASE_DIR is honoured."""
    code = ("import curate.fiftyone_bridge as b; fo = b._fiftyone(); "
            "print(fo.config.do_not_track, fo.config.database_dir)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_")}
    env.update(FIFTYONE_DATABASE_DIR=str(tmp_path / "db"), HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    assert out.stdout.split() == ["True", str(tmp_path / "db")]
    env["FIFTYONE_DO_NOT_TRACK"] = "false"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    assert out.stdout.split()[0] == "False"


def test_app_command_keeps_stdout_for_its_results(private_mongo, tmp_path):
    """FiftyOne writes its progress bars and "Computing uniqueness..." notices to stdout; `curate app` sends
    them to stderr, so stdout holds the dataset line and the view counts only."""
    data = make_dataset(tmp_path / "flowers", per_class=4, classes=["daisy", "roses"])
    run = tmp_path / "run"
    for argv in (["scan", str(data), "--out", str(run)], ["flag", "--fast", "--run", str(run)]):
        assert curate(*argv).returncode == 0
    done = curate("app", "--no-launch", "--run", str(run))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("FiftyOne dataset ") and ": 8 samples" in lines[0], done.stdout
    assert lines[1:] and all(line.startswith("  view ") for line in lines[1:]), done.stdout
    assert "Computing uniqueness" in done.stderr and "samples/s" in done.stderr  # said, on stderr


def test_fiftyone_log_handlers_are_given_back_after_the_app_command_borrowed_them(capsys):
    from curate.fiftyone_bridge import _fiftyone, _library_output_on_stderr

    _fiftyone()
    handlers = [h for name in ("fiftyone", "eta") for h in logging.getLogger(name).handlers]
    before = [h.stream for h in handlers]
    with _library_output_on_stderr():
        print("a progress bar")
    assert [h.stream for h in handlers] == before  # one handler serves both loggers: restored once, not to None
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "a progress bar\n")
