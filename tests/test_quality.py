"""Quality measures on real photos, and thresholds taken from the data."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import real_photos
from PIL import Image, ImageFilter

from curate.quality import QualityBounds, data_relative_flags, data_thresholds, image_metrics


def _arrays(im: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    rgb = im.convert("RGB")
    return np.asarray(rgb.convert("L")), np.asarray(rgb)


def test_blur_drops_when_a_real_photo_is_blurred() -> None:
    for path in real_photos(2, ["daisy", "roses"]):
        im = Image.open(path).convert("RGB")
        sharp = image_metrics(*_arrays(im))["blur"]
        blurred = image_metrics(*_arrays(im.filter(ImageFilter.GaussianBlur(3))))["blur"]
        assert blurred < sharp / 3


def test_brightness_contrast_entropy_and_chroma() -> None:
    im = Image.open(real_photos(1, ["tulips"])[0]).convert("RGB")
    m = image_metrics(*_arrays(im))
    dark = image_metrics(*_arrays(im.point(lambda v: v // 6)))
    assert dark["brightness"] < m["brightness"] / 4
    assert 0 < m["contrast"] < 0.5 and 0 < m["entropy"] <= 8
    assert m["chroma"] > 5  # tulips are colourful
    grey = image_metrics(*_arrays(im.convert("L")))
    assert grey["chroma"] == 0

    flat = np.full((40, 50), 128, dtype=np.uint8)
    f = image_metrics(flat, np.stack([flat] * 3, axis=-1))
    assert f["entropy"] == 0 and f["contrast"] == 0 and f["blur"] == 0
    assert abs(f["brightness"] - 128 / 255) < 1e-9
    assert np.isnan(image_metrics(flat)["chroma"])


def _table(blur, brightness, entropy) -> pd.DataFrame:
    return pd.DataFrame({"blur": blur, "brightness": brightness, "entropy": entropy})


def test_thresholds_flag_outliers_of_the_data() -> None:
    rng = np.random.default_rng(0)
    n = 500
    t = _table(np.exp(rng.normal(7, 0.3, n)), rng.normal(0.45, 0.05, n).clip(0, 1), rng.normal(7.2, 0.2, n))
    t.loc[0, "blur"] = 5.0         # far blurrier than the rest
    t.loc[1, "brightness"] = 0.02  # nearly black
    t.loc[2, "brightness"] = 0.97  # nearly white
    t.loc[3, "entropy"] = 1.0      # almost no information
    thresholds = data_thresholds(t, QualityBounds())
    flags = data_relative_flags(t, thresholds)
    assert np.flatnonzero(flags["blurry"]).tolist() == [0]
    assert np.flatnonzero(flags["dark"]).tolist() == [1]
    assert np.flatnonzero(flags["bright"]).tolist() == [2]
    assert np.flatnonzero(flags["low_information"]).tolist() == [3]
    for issue, th in thresholds.items():
        assert set(th) == {"metric", "tail", "robust", "absolute", "threshold"}, issue


def test_absolute_bound_protects_a_uniform_dataset() -> None:
    # a tight distribution of good photos: its own tail is not an issue
    rng = np.random.default_rng(1)
    n = 300
    t = _table(np.exp(rng.normal(8, 0.05, n)), rng.normal(0.5, 0.01, n), rng.normal(7.5, 0.02, n))
    flags = data_relative_flags(t, data_thresholds(t, QualityBounds()))
    assert not any(f.any() for f in flags.values())


def test_thresholds_follow_the_data() -> None:
    # a dataset of night photos: the data-relative bound for `dark` sits lower than for daylight
    rng = np.random.default_rng(2)
    night = _table(np.full(200, 500.0), rng.normal(0.12, 0.02, 200), np.full(200, 6.5))
    day = _table(np.full(200, 500.0), rng.normal(0.5, 0.02, 200), np.full(200, 6.5))
    b = QualityBounds()
    assert data_thresholds(night, b)["dark"]["threshold"] < data_thresholds(day, b)["dark"]["threshold"]
    assert data_relative_flags(night, data_thresholds(night, b))["dark"].sum() < 10
