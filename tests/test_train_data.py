"""Manifest checks, splits and the cached image loader of train/data.py, on real photos."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import real_photos

from curate.io import CurateError
from train import data as tdata


def _manifest(root) -> pd.DataFrame:
    rows = [(p.relative_to(root).as_posix(), p.parent.name) for p in sorted(root.glob("*/*.jpg"))]
    return pd.DataFrame(rows, columns=["filepath", "label"])


def test_splits_are_stratified_deterministic_and_keep_existing_ones():
    df = pd.DataFrame({"filepath": [f"{c}/{i}.jpg" for c in "abc" for i in range(20)],
                       "label": [c for c in "abc" for _ in range(20)]})
    s1, s2 = tdata.assign_splits(df, seed=0), tdata.assign_splits(df, seed=0)
    assert s1["split"].tolist() == s2["split"].tolist()
    for _, g in s1.groupby("label"):
        assert g["split"].value_counts().to_dict() == {"train": 16, "val": 2, "test": 2}
    assert tdata.assign_splits(df, seed=1)["split"].tolist() != s1["split"].tolist()
    given = df.assign(split=["test"] * 30 + [""] * 30)
    out = tdata.assign_splits(given, seed=0)
    assert (out["split"][:30] == "test").all()
    assert set(out["split"][30:]) == {"train", "val", "test"}


def test_a_photo_keeps_its_split_when_other_rows_are_removed():
    df = pd.DataFrame({"filepath": [f"a/{i}.jpg" for i in range(100)], "label": "a"})
    full = tdata.assign_splits(df).set_index("filepath")["split"]
    part = tdata.assign_splits(df.drop(index=[3, 50])).set_index("filepath")["split"]
    assert (full[part.index] == part).mean() > 0.9


def test_rows_with_other_split_values_are_ignored():
    df = pd.DataFrame({"filepath": ["a/1.jpg", "a/2.jpg", "a/3.jpg"], "label": "a",
                       "split": ["train", "excluded", "test"]})
    assert tdata.usable_rows(df)["filepath"].tolist() == ["a/1.jpg", "a/3.jpg"]


def test_check_manifest_refuses_bad_input(small_dataset):
    df = _manifest(small_dataset)
    assert len(tdata.check_manifest(df, small_dataset)) == len(df)
    with pytest.raises(CurateError, match="label"):
        tdata.check_manifest(df[["filepath"]], small_dataset)
    with pytest.raises(CurateError, match="escapes"):
        tdata.check_manifest(pd.concat([df, pd.DataFrame({"filepath": ["../x.jpg"], "label": ["daisy"]})]),
                             small_dataset)
    lonely = pd.concat([df, pd.DataFrame({"filepath": ["daisy/x.jpg"], "label": ["lonely"]})])
    with pytest.raises(CurateError, match="lonely"):
        tdata.check_manifest(lonely, small_dataset)


def test_load_images_decodes_once_then_reads_the_cache(small_dataset, tmp_path, monkeypatch):
    df = _manifest(small_dataset).head(6)
    cache = tmp_path / "cache"
    imgs, ok = tdata.load_images(df, small_dataset, 48, cache_dir=cache)
    assert ok.all() and imgs.shape == (6, 48, 48, 3) and imgs.dtype == np.uint8
    assert imgs.reshape(6, -1).std(1).min() > 5  # real pictures, not blank
    assert len(list(cache.rglob("*.npy"))) == 6

    def no_decode(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(tdata, "decode_image", no_decode)
    again, ok2 = tdata.load_images(df, small_dataset, 48, cache_dir=cache)
    assert ok2.all()
    np.testing.assert_array_equal(again, imgs)


def test_cache_is_keyed_by_content_and_size(small_dataset, tmp_path):
    df = _manifest(small_dataset).head(2)
    cache = tmp_path / "cache"
    a, _ = tdata.load_images(df, small_dataset, 32, cache_dir=cache)
    # Swap the two files' contents: the cache must follow the content, not the name.
    p0, p1 = (small_dataset / f for f in df["filepath"])
    tmp = tmp_path / "swap.jpg"
    shutil.copyfile(p0, tmp)
    shutil.copyfile(p1, p0)
    shutil.copyfile(tmp, p1)
    b, _ = tdata.load_images(df, small_dataset, 32, cache_dir=cache)
    np.testing.assert_array_equal(b[0], a[1])
    assert {p.parent.parent.name for p in cache.rglob("*.npy")} == {f"32-v{tdata.DECODE_VERSION}"}
    c, _ = tdata.load_images(df, small_dataset, 40, cache_dir=cache)
    assert c.shape[1:] == (40, 40, 3)


def test_unreadable_files_are_skipped_with_a_warning_naming_them(small_dataset, tmp_path, caplog):
    bad = small_dataset / "daisy" / "broken.jpg"
    bad.write_bytes(real_photos(1, ["daisy"])[0].read_bytes()[:200])
    df = _manifest(small_dataset)
    with caplog.at_level(logging.WARNING, logger="curate.train"):
        _, ok = tdata.load_images(df, small_dataset, 32, cache_dir=tmp_path / "c")
    assert not ok[df["filepath"] == "daisy/broken.jpg"].any()
    assert ok.sum() == len(df) - 1
    assert "daisy/broken.jpg" in caplog.text


def test_decode_image_uses_reduced_size_decode_and_returns_rgb():
    photo = real_photos(1, ["sunflowers"])[0]
    small = tdata.decode_image(photo, 64)
    assert small.shape == (64, 64, 3) and small.dtype == np.uint8
    big = tdata.decode_image(photo, 200)
    # the reduced-size decode agrees with a full-size decode to within resampling noise
    from PIL import Image

    with Image.open(photo) as im:
        ref = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(small.astype(np.float32) - ref).mean() < 8
    assert big.shape == (200, 200, 3)


def test_machine_vision_bit_depths_look_the_same_to_the_trainer_and_to_scan(tmp_path):
    """A 12-bit camera's frames in 16-bit PNG and TIFF (grey and colour), and a float TIFF in 0..1: the
    trainer and scan both see the 8-bit photo they were made from, not a white frame (Pillow's own
    conversion clips grey) or a black one (scaling 12 bits by 65535; Pillow's high bytes of colour)."""
    from PIL import Image

    from curate.scan import scan

    photo = real_photos(1, ["roses"])[0]
    grey = np.asarray(Image.open(photo).convert("L"))
    data = tmp_path / "data" / "part"
    data.mkdir(parents=True)
    Image.fromarray(grey).save(data / "eight.png")
    twelve = grey.astype(np.uint16) * 16  # 0..4080: what a 12-bit sensor stores in a 16-bit file
    Image.fromarray(twelve).save(data / "twelve.png")
    Image.fromarray(twelve).save(data / "twelve.tif")
    Image.fromarray((grey / 255.0).astype(np.float32), "F").save(data / "float.tif")
    assert Image.open(data / "twelve.png").mode.startswith("I") and Image.open(data / "float.tif").mode == "F"
    # colour at 12 bits in a 48-bit PNG and TIFF (OpenCV writes them; Pillow reads them as 8-bit high bytes)
    import cv2

    colour = np.asarray(Image.open(photo).convert("RGB"))
    Image.fromarray(colour).save(data / "eight_colour.png")
    for name in ("twelve_colour.png", "twelve_colour.tif"):
        assert cv2.imwrite(str(data / name), colour[..., ::-1].astype(np.uint16) * 16)
    ref = tdata.decode_image(data / "eight.png", 64).astype(float)
    ref_colour = tdata.decode_image(data / "eight_colour.png", 64).astype(float)
    for name in ("twelve.png", "twelve.tif", "float.tif", "twelve_colour.png", "twelve_colour.tif"):
        got = tdata.decode_image(data / name, 64).astype(float)
        want = ref_colour if "colour" in name else ref
        assert np.abs(got - want).mean() < 2, name  # 255/4095 scaling: 4080 -> 254, within a level or two
    high_bytes = np.asarray(Image.open(data / "twelve_colour.png").convert("RGB"), dtype=float)
    assert high_bytes.mean() < colour.mean() / 8  # what Pillow alone gives a 48-bit image: nearly black
    from curate.io import sensor_range

    # a dim 12-bit frame (brightest pixel 2000 of 4095) stays dim; only one below a quarter of the range is lifted
    assert [sensor_range(np.array([top]), "I;16") for top in (2000, 4095, 900, 40000)] == [4095, 4095, 1023, 65535]
    clipped = np.asarray(Image.open(data / "twelve.png").convert("RGB"), dtype=float)
    assert clipped.mean() > grey.mean() + 50  # what the trainer saw before: nearly white
    m = scan(tmp_path / "data", out=tmp_path / "run", progress=False)
    by_file = m.set_index("filepath")
    bright = by_file["brightness"].astype(float)
    for name in ("twelve.png", "twelve.tif", "float.tif", "twelve_colour.png", "twelve_colour.tif"):
        assert abs(bright[f"part/{name}"] - bright["part/eight.png"]) < 0.01, name
    assert by_file.loc["part/twelve_colour.tif", "mode"] == "RGB;16"
    assert by_file.loc["part/eight_colour.png", "mode"] == "RGB"


def test_stratified_sample_keeps_class_proportions():
    df = pd.DataFrame({"filepath": [f"{i}.jpg" for i in range(300)], "label": ["a"] * 200 + ["b"] * 90 + ["c"] * 10})
    s = tdata.stratified_sample(df, 30, seed=0)
    assert s["label"].value_counts().to_dict() == {"a": 20, "b": 9, "c": 2}
    assert s.equals(tdata.stratified_sample(df, 30, seed=0))


def test_classes_never_trained_are_those_whose_every_photo_is_in_val_or_test():
    df = pd.DataFrame({"filepath": [f"{i}.jpg" for i in range(7)],
                       "label": ["good", "good", "good", "scratch", "scratch", "dent", "dent"],
                       "split": ["train", "val", "test", "test", "val", "test", ""]})
    assert tdata.classes_never_trained(df) == ["scratch"]  # a dent without a split will get one for training
    assert tdata.classes_never_trained(df.drop(columns="split")) == []
