"""`curate scan` on real photos and on every kind of bad input; DATA is never written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from badinputs import png_claiming
from conftest import FLOWERS, inspection_shots, make_dataset, real_photos, tree_fingerprint
from PIL import Image

from curate import cli
from curate.io import CurateError, atomic_write_csv, read_manifest
from curate.scan import ISSUES, MANIFEST_COLUMNS, ScanConfig, image_hashes, scan, scan_file


def _flags(manifest: pd.DataFrame, path: str) -> set[str]:
    cell = manifest.loc[manifest["filepath"] == path, "flags"].item()
    return set(cell.split(";")) if cell else set()


def test_scan_writes_the_run_folder(small_dataset: Path, tmp_path: Path) -> None:
    before = tree_fingerprint(small_dataset)
    out = tmp_path / "run"
    df = scan(small_dataset, out=out, workers=2, progress=False)
    assert tree_fingerprint(small_dataset) == before

    manifest = read_manifest(out / "manifest.csv")
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert len(manifest) == len(df) == 30
    expected = sorted(p.relative_to(small_dataset).as_posix() for p in small_dataset.rglob("*.jpg"))
    assert manifest["filepath"].tolist() == expected
    assert (manifest["label"] == manifest["filepath"].str.split("/").str[0]).all()
    for path, sha in zip(manifest["filepath"], manifest["sha256"], strict=True):
        assert sha == hashlib.sha256((small_dataset / path).read_bytes()).hexdigest()
    assert manifest["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert manifest["dhash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert (manifest["error"] == "").all() and (manifest["format"] == "JPEG").all()
    for p, w, h in manifest[["filepath", "width", "height"]].itertuples(index=False):
        assert Image.open(small_dataset / p).size == (w, h)

    info = json.loads((out / "scan.json").read_text())
    assert info["data"] == str(small_dataset.resolve())
    assert set(info["counts"]) == set(ISSUES)
    for issue, n in info["counts"].items():
        assert n == manifest["flags"].str.split(";").apply(lambda f, i=issue: i in f).sum()
    for issue in ("blurry", "dark", "bright", "low_information"):
        assert {"threshold", "robust", "absolute"} <= set(info["thresholds"][issue])
    dups = pd.read_csv(out / "duplicates.csv")
    assert list(dups.columns) == ["dup_group", "kind", "filepath", "label", "distance", "keep"]


def test_a_split_layout_is_read_as_split_and_class(tmp_path: Path, caplog) -> None:
    # DATA/<split>/<class>/<image>, as Keras, Roboflow and MVTec AD lay data out: read as one folder per
    # class, its classes were "Train", "test" and "validation"
    from curate.export import export

    data = tmp_path / "parts"
    photos = real_photos(4, ["daisy", "roses"])
    for i, photo in enumerate(photos):
        split = ("Train", "Train", "validation", "test")[i % 4]
        (data / split / photo.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, data / split / photo.parent.name / photo.name)
    shutil.copyfile(real_photos(5, ["tulips"])[-1], data / "Train" / "loose.jpg")
    m = scan(data, out=tmp_path / "run", progress=False, use_cache=False)
    assert sorted(set(m["label"])) == ["daisy", "roses"] and len(m) == 8
    assert (m["split"] == m["filepath"].str.split("/").str[0].map(
        {"Train": "train", "validation": "val", "test": "test"})).all()
    summary = json.loads((tmp_path / "run" / "scan.json").read_text())
    assert summary["classes"] == {"daisy": 4, "roses": 4} and summary["splits"] == {"test": 2, "train": 4, "val": 2}
    assert summary["skipped"] == [{"path": "Train/loose.jpg", "reason": "image directly in a split folder, outside "
                                                                         "any class folder (no label)"}]
    export(tmp_path / "run")  # the cleaned manifest keeps the dataset's own splits
    cleaned = pd.read_csv(tmp_path / "run" / "cleaned.csv")
    pd.testing.assert_series_equal(cleaned.set_index("filepath")["split"],
                                   m.set_index("filepath").loc[cleaned["filepath"], "split"])

    # a class that happens to be called "train", beside other classes, is a class
    shutil.copytree(data / "Train" / "daisy", tmp_path / "flat" / "train")
    shutil.copytree(data / "Train" / "roses", tmp_path / "flat" / "roses")
    flat = scan(tmp_path / "flat", out=tmp_path / "flat_run", progress=False, use_cache=False)
    assert sorted(set(flat["label"])) == ["roses", "train"] and "split" not in flat.columns

    # MVTec AD's layout: defects only in test/, which a model trained on this split cannot learn
    shutil.rmtree(data / "Train" / "roses")
    with caplog.at_level("WARNING", logger="curate.scan"):
        scan(data, out=tmp_path / "run", progress=False)
    assert any("no photo of roses in a train folder" in r.getMessage() for r in caplog.records)


def test_a_manifest_read_and_written_again_keeps_every_value(small_dataset: Path, tmp_path: Path) -> None:
    # every later stage reads the manifest and writes it back: no measure may drift on the way
    out = tmp_path / "run"
    scan(small_dataset, out=out, workers=2, progress=False)
    atomic_write_csv(out / "again.csv", read_manifest(out / "manifest.csv"))
    assert (out / "again.csv").read_text() == (out / "manifest.csv").read_text()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_get_the_mode_the_umask_gives_like_any_written_file(small_dataset: Path, tmp_path: Path,
                                                                     umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        scan(small_dataset, out=tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    for name in ("manifest.csv", "duplicates.csv", "scan.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == mode, name


def test_hashes_equal_imagehash_on_the_working_image(tmp_path: Path) -> None:
    """pHash/dHash are imagehash's, computed on the reduced image the scan decodes."""
    config = ScanConfig()

    def reduced(im: Image.Image, side: int) -> Image.Image:
        factor = 1
        while factor < 8 and min(im.size) // (factor * 2) >= side:
            factor *= 2
        return im.reduce(factor)

    photos = real_photos(8)
    for src in photos:
        row = scan_file(src.parent.parent, f"{src.parent.name}/{src.name}", config)
        im = Image.open(src)
        im.draft("RGB", (config.decode_size, config.decode_size))
        gray = reduced(im.convert("RGB").convert("L"), 32)
        assert row["phash"] == str(imagehash.phash(gray)), src
        assert row["dhash"] == str(imagehash.dhash(gray)), src
    # a PNG is not drafted but reduced by the same power-of-two rule
    png_dir = tmp_path / "png" / "c"
    png_dir.mkdir(parents=True)
    Image.open(photos[0]).save(png_dir / "p.png")
    row = scan_file(tmp_path / "png", "c/p.png", config)
    gray = reduced(reduced(Image.open(png_dir / "p.png").convert("RGB"), config.decode_size).convert("L"), 32)
    assert row["phash"] == str(imagehash.phash(gray))
    assert row["dhash"] == str(imagehash.dhash(gray))
    # and on every photo of a class, the hashes of the scan's working image are imagehash's
    for src in real_photos(10_000, ["roses"]):
        with Image.open(src) as im:
            im.draft("RGB", (config.decode_size, config.decode_size))
            gray = reduced(im.convert("RGB").convert("L"), 32)
        p, d = image_hashes(gray)
        assert (p, d) == (str(imagehash.phash(gray)), str(imagehash.dhash(gray))), src


@pytest.fixture
def bad_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset mixing good photos with every kind of bad input; returns (DATA, a photo outside DATA)."""
    data = make_dataset(tmp_path / "bad", per_class=2, classes=["daisy", "roses"])
    photo = real_photos(3, ["tulips"])
    d = data / "daisy"
    r = data / "roses"
    (d / "zero.jpg").write_bytes(b"")
    full = photo[0].read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) * 2 // 5])
    (d / "cut_in_header.jpg").write_bytes(full[:200])  # PIL cannot even open it: "Truncated File Read"
    (d / "garbage.jpg").write_text("this is a text file, not a photo\n" * 20)
    (d / "broken_header.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    im = Image.open(photo[1]).convert("RGB")
    im.convert("CMYK").save(r / "cmyk.jpg")
    Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257).save(r / "deep16.png")
    pal = im.quantize(64)
    pal.info["transparency"] = 0
    pal.save(r / "palette.png", transparency=0)
    rgba = im.copy()
    rgba.putalpha(128)
    rgba.save(r / "alpha.png")
    (r / "bomb.png").write_bytes(png_claiming(40_000, 40_000))
    shutil.copyfile(photo[2], r / "café del mar ünï.JPG")
    im.resize((40, 30)).save(d / "tiny.jpg")
    im.crop((0, 0, im.width, im.width // 4)).save(d / "wide.jpg")
    im.convert("L").save(d / "grey.jpg")
    (d / "notes.txt").write_text("ignored: not an image extension")
    (data / "empty_class").mkdir()
    outside = tmp_path / "outside.jpg"
    shutil.copyfile(photo[0], outside)
    (d / "link_out.jpg").symlink_to(outside)
    (r / "link_in.jpg").symlink_to(r / "cmyk.jpg")
    (r / "loop.jpg").symlink_to("loop.jpg")  # a link to itself: resolving it raises ELOOP
    (r / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (data / "linked_class").symlink_to(tmp_path / "outside_dir", target_is_directory=True)
    (tmp_path / "outside_dir").mkdir()
    shutil.copyfile(photo[0], tmp_path / "outside_dir" / "x.jpg")
    return data, outside


def test_bad_input_gets_rows_or_messages_and_data_is_untouched(bad_dataset, tmp_path: Path, capsys) -> None:
    data, outside = bad_dataset
    before = tree_fingerprint(data)
    before_outside = outside.read_bytes()
    out = tmp_path / "run"
    assert cli.main(["scan", str(data), "--out", str(out), "--workers", "2", "-q"]) == 0
    assert tree_fingerprint(data) == before and outside.read_bytes() == before_outside

    m = read_manifest(out / "manifest.csv")
    paths = set(m["filepath"])
    assert "daisy/link_out.jpg" not in paths and not any(p.startswith("linked_class") for p in paths)
    assert "daisy/notes.txt" not in paths
    assert "roses/link_in.jpg" in paths  # a link inside DATA is read like a file
    err = m.set_index("filepath")["error"]

    assert _flags(m, "daisy/zero.jpg") == {"corrupt"} and "empty" in err["daisy/zero.jpg"]
    assert _flags(m, "daisy/truncated.jpg") == {"truncated"} and err["daisy/truncated.jpg"]
    assert _flags(m, "daisy/garbage.jpg") == {"not_image"} and err["daisy/garbage.jpg"]
    assert _flags(m, "daisy/broken_header.jpg") == {"corrupt"}
    # cut inside the header: PIL cannot tell that from a garbage header, so `corrupt`, with both causes named
    assert _flags(m, "daisy/cut_in_header.jpg") == {"corrupt"}
    assert "cut short, or corrupt" in err["daisy/cut_in_header.jpg"]
    assert _flags(m, "roses/bomb.png") == {"corrupt"} and "too large" in err["roses/bomb.png"]
    for ok in ("roses/cmyk.jpg", "roses/deep16.png", "roses/palette.png", "roses/alpha.png",
               "roses/café del mar ünï.JPG", "daisy/tiny.jpg", "daisy/wide.jpg", "daisy/grey.jpg"):
        assert err[ok] == "", ok
    mode = m.set_index("filepath")["mode"]
    assert mode["roses/cmyk.jpg"] == "CMYK" and mode["roses/palette.png"] == "P" and mode["roses/alpha.png"] == "RGBA"
    assert mode["roses/deep16.png"].startswith("I")
    # the 16-bit image is scaled, not clipped to white: same brightness as its 8-bit source
    bright = m.set_index("filepath")["brightness"]
    assert abs(bright["roses/deep16.png"] - bright["daisy/grey.jpg"]) < 0.05
    assert "tiny" in _flags(m, "daisy/tiny.jpg")
    assert "odd_aspect_ratio" in _flags(m, "daisy/wide.jpg")
    assert "grayscale" in _flags(m, "daisy/grey.jpg") and "grayscale" in _flags(m, "roses/deep16.png")
    assert "grayscale" not in _flags(m, "roses/cmyk.jpg")
    assert {"exact_duplicate"} <= _flags(m, "roses/link_in.jpg")

    info = json.loads((out / "scan.json").read_text())
    assert info["empty_classes"] == ["empty_class"]
    skipped = {s["path"] for s in info["skipped"]}
    assert {"daisy/link_out.jpg", "linked_class", "roses/loop.jpg", "roses/dangling.jpg"} <= skipped
    assert not {"roses/loop.jpg", "roses/dangling.jpg"} & paths
    assert info["counts"]["corrupt"] == 4 and info["counts"]["not_image"] == 1 and info["counts"]["truncated"] == 1


def test_bomb_limit_comes_from_the_config(small_dataset: Path) -> None:
    path = sorted(small_dataset.rglob("*.jpg"))[0]
    rel = path.relative_to(small_dataset).as_posix()
    row = scan_file(small_dataset, rel, ScanConfig(max_pixels=1000))
    assert row["flags"] == "corrupt" and "too large" in row["error"] and row["phash"] == ""
    assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_or_empty_data_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert cli.main(["scan", str(tmp_path / "nope"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "no such folder" in err and "\n" not in err
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert cli.main(["scan", str(tmp_path / "empty"), "-q"]) == 2
    assert "no images" in capsys.readouterr().err
    with pytest.raises(CurateError):
        scan(tmp_path / "empty", progress=False)


def test_run_folder_inside_data_is_refused(small_dataset: Path) -> None:
    before = tree_fingerprint(small_dataset)
    with pytest.raises(CurateError, match="inside DATA"):
        scan(small_dataset, out=small_dataset / "reports", progress=False)
    assert tree_fingerprint(small_dataset) == before and not (small_dataset / "reports").exists()


def test_rescan_reuses_the_cache_and_rereads_changed_files(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = scan(small_dataset, out=out, workers=2, progress=False)
    second = scan(small_dataset, out=out, workers=2, progress=False)
    assert json.loads((out / "scan.json").read_text())["from_cache"] == len(first)
    pd.testing.assert_frame_equal(first, second)

    changed = sorted(small_dataset.rglob("*.jpg"))[0]
    other = real_photos(7, ["tulips"])[-1]
    shutil.copyfile(other, changed)
    third = scan(small_dataset, out=out, workers=2, progress=False)
    assert json.loads((out / "scan.json").read_text())["from_cache"] == len(first) - 1
    rel = changed.relative_to(small_dataset).as_posix()
    assert third.set_index("filepath").loc[rel, "sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()

    scan(small_dataset, out=out, workers=1, use_cache=False, progress=False)
    assert json.loads((out / "scan.json").read_text())["from_cache"] == 0

    (out / ".scan_cache.json").write_text("{not json")  # a damaged cache costs a full re-scan, nothing else
    again = scan(small_dataset, out=out, workers=2, progress=False)
    assert json.loads((out / "scan.json").read_text())["from_cache"] == 0
    pd.testing.assert_frame_equal(again, third)


def test_interrupted_scan_resumes_from_the_cache(small_dataset: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import curate.scan as scan_module

    real = scan_module.scan_file
    calls = {"n": 0}

    def interrupted(root, relpath, config):
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        return real(root, relpath, config)

    out = tmp_path / "run"
    monkeypatch.setattr(scan_module, "scan_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scan(small_dataset, out=out, workers=1, progress=False)
    assert not (out / "manifest.csv").exists()
    monkeypatch.setattr(scan_module, "scan_file", real)
    scan(small_dataset, out=out, workers=1, progress=False)
    assert json.loads((out / "scan.json").read_text())["from_cache"] == 12


def test_a_crashing_worker_stops_the_scan_with_a_message(small_dataset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import curate.scan as scan_module

    real = scan_module.scan_file
    victim = sorted(p.relative_to(small_dataset).as_posix() for p in small_dataset.rglob("*.jpg"))[20]

    def crashing(root, relpath, config):
        if relpath == victim:
            os._exit(70)  # what a segfaulting decoder looks like from the parent
        return real(root, relpath, config)

    monkeypatch.setattr(scan_module, "scan_file", crashing)  # fork: the workers inherit the patch
    out = tmp_path / "run"
    assert cli.main(["scan", str(small_dataset), "--out", str(out), "--workers", "2", "-q"]) == 1
    assert "worker died" in capsys.readouterr().err
    monkeypatch.setattr(scan_module, "scan_file", real)
    scan(small_dataset, out=out, workers=2, progress=False)
    assert (out / "manifest.csv").exists()


def test_workers_must_be_positive(small_dataset: Path) -> None:
    assert cli.main(["scan", str(small_dataset), "--workers", "0", "-q"]) == 2


def test_default_run_folder_is_reports_dataset_name(small_dataset: Path, tmp_path: Path) -> None:
    scan(small_dataset, workers=1, progress=False)
    assert (tmp_path / "reports" / small_dataset.name / "manifest.csv").exists()  # cwd is tmp_path


@pytest.mark.slow
def test_near_duplicates_are_not_grouped_where_phash_cannot_tell_the_photos_apart(tmp_path: Path, caplog) -> None:
    from curate.export import export
    from curate.report import report

    data = inspection_shots(tmp_path / "inspection")
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="curate.scan"):
        scan(data, out=run, workers=1, progress=False)
    info = json.loads((run / "scan.json").read_text())
    # nearly every shot is within 8 bits of another: grouping them would keep 1 of 24 photos and, across
    # the two classes, drop them all as cross-label duplicates
    assert info["thresholds"]["near_share"] > info["thresholds"]["max_near_share"]
    assert info["thresholds"]["near_duplicates_grouped"] is False
    assert info["duplicate_groups"]["groups"] == 0
    assert any("cannot tell this dataset's images apart" in r.getMessage() for r in caplog.records)
    export(run, policy="duplicates-only")
    assert len(pd.read_csv(run / "cleaned.csv")) == 24
    report(run)
    assert "Near duplicates were not grouped" in (run / "index.html").read_text()
    # a byte-identical copy is still found
    shutil.copyfile(data / "good" / "00.png", data / "scratch" / "copy_of_good_00.png")
    scan(data, out=run, workers=1, progress=False)
    dups = pd.read_csv(run / "duplicates.csv")
    assert set(dups["filepath"]) == {"good/00.png", "scratch/copy_of_good_00.png"} and set(dups["kind"]) == {"exact"}


def test_grayscale_is_flagged_only_where_it_is_unusual(tmp_path: Path) -> None:
    # a mono-camera dataset: real photos saved grey, one colour photo among them
    mono = make_dataset(tmp_path / "mono", per_class=3, classes=["daisy", "roses"])
    photos = sorted(mono.rglob("*.jpg"))
    for p in photos[1:]:
        Image.open(p).convert("L").save(p)
    scan(mono, out=tmp_path / "mono_run", workers=1, progress=False)
    m = read_manifest(tmp_path / "mono_run" / "manifest.csv")
    assert not m["flags"].str.contains("grayscale").any()
    info = json.loads((tmp_path / "mono_run" / "scan.json").read_text())
    assert info["thresholds"]["monochrome"] is True and info["counts"]["grayscale"] == 0
    # the same photos in colour with one grey among them: that one is flagged
    colour = make_dataset(tmp_path / "colour", per_class=3, classes=["daisy", "roses"])
    grey = sorted(colour.rglob("*.jpg"))[0]
    Image.open(grey).convert("L").save(grey)
    scan(colour, out=tmp_path / "colour_run", workers=1, progress=False)
    m = read_manifest(tmp_path / "colour_run" / "manifest.csv")
    flagged = m.loc[m["flags"].str.contains("grayscale"), "filepath"].tolist()
    assert flagged == [grey.relative_to(colour).as_posix()]
    assert json.loads((tmp_path / "colour_run" / "scan.json").read_text())["thresholds"]["monochrome"] is False


def test_a_duplicate_group_keeps_the_colour_original_over_grey_and_palette_copies(tmp_path: Path) -> None:
    # copies named to sort first, the grey one even larger: name and size alone would keep a copy
    data = tmp_path / "data" / "daisy"
    data.mkdir(parents=True)
    original, other = real_photos(2, ["daisy"])
    shutil.copyfile(original, data / "photo.jpg")
    shutil.copyfile(other, data / "other.jpg")
    with Image.open(original) as im:
        im.convert("L").resize((im.width * 2, im.height * 2)).save(data / "a_grey_copy.png")
        im.convert("P", palette=Image.Palette.ADAPTIVE).save(data / "b_palette_copy.gif")
    scan(tmp_path / "data", out=tmp_path / "run", workers=1, progress=False)
    dups = pd.read_csv(tmp_path / "run" / "duplicates.csv", dtype={"dup_group": str}, keep_default_na=False)
    [group] = [set(g["filepath"]) for _, g in dups.groupby("dup_group")]
    assert group == {"daisy/photo.jpg", "daisy/a_grey_copy.png", "daisy/b_palette_copy.gif"}
    assert dups.loc[dups["keep"], "filepath"].tolist() == ["daisy/photo.jpg"]
    manifest = read_manifest(tmp_path / "run" / "manifest.csv")
    assert "grayscale" in _flags(manifest, "daisy/a_grey_copy.png")
    # without duplicates.csv, export's fallback on the manifest's dup_group makes the same choice
    from curate.export import duplicate_facts

    facts = duplicate_facts(manifest, None).set_index(manifest["filepath"])
    assert facts.loc[sorted(group), "dup_keep"].tolist() == [False, False, True]


def test_finds_every_exact_duplicate_group_in_flower_photos(tmp_path: Path) -> None:
    """Every group of byte-identical files in ../shared/flower_photos, checked with hashlib."""
    before = {p: p.stat().st_mtime_ns for p in FLOWERS.rglob("*") if p.is_file()}
    by_sha: dict[str, list[str]] = defaultdict(list)
    for p in sorted(FLOWERS.rglob("*.jpg")):
        by_sha[hashlib.sha256(p.read_bytes()).hexdigest()].append(p.relative_to(FLOWERS).as_posix())
    expected = {frozenset(v) for v in by_sha.values() if len(v) > 1}
    assert expected, "the shared dataset is known to hold byte-identical files"

    out = tmp_path / "run"
    manifest = scan(FLOWERS, out=out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in FLOWERS.rglob("*") if p.is_file()} == before
    dups = pd.read_csv(out / "duplicates.csv", dtype={"dup_group": str})
    exact = dups[dups["kind"] == "exact"]
    found = {frozenset(g["filepath"]) for _, g in exact.groupby(["dup_group", manifest.set_index("filepath")
                                                                .loc[exact["filepath"], "sha256"].to_numpy()])}
    assert found == expected
    flagged = set(manifest.loc[manifest["flags"].str.contains("exact_duplicate"), "filepath"])
    assert flagged == set().union(*expected)
    for group in expected:
        labels = {p.split("/")[0] for p in group}
        for p in group:
            assert ("cross_label_duplicate" in _flags(manifest, p)) == (len(labels) > 1)
    # every group has exactly one keep, and the keep is its largest colour image
    size = manifest.set_index("filepath")
    for _, g in dups.groupby("dup_group"):
        assert g["keep"].sum() == 1
        colour = ~size.loc[g["filepath"], "flags"].str.contains("grayscale")
        pixels = size.loc[g["filepath"], "width"] * size.loc[g["filepath"], "height"]
        kept = g.loc[g["keep"], "filepath"].item()
        assert colour[kept] == colour.max() and pixels[kept] == pixels[colour == colour.max()].max()
