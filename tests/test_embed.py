"""Representations: the decode cache, cheap features, keras.applications plumbing, the K-fold own ViT."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from curate import embed
from curate.io import CurateError
from train.presets import TINY

TINY_VIT = TINY.with_epochs(1)  # the K-fold ViT at test size: seconds per fold


def _manifest(root: Path) -> pd.DataFrame:
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.jpg"))
    return pd.DataFrame({"filepath": files, "label": [f.split("/")[0] for f in files]})


def test_load_images_decodes_real_photos_and_reuses_the_cache(small_dataset, tmp_path, monkeypatch):
    df = _manifest(small_dataset)
    run = tmp_path / "run"
    images = embed.load_images(run, small_dataset, df["filepath"].tolist(), 24)
    assert images.shape == (len(df), 24, 24, 3) and images.dtype == np.uint8
    assert (images.reshape(len(df), -1).std(1) > 0).all()  # every photo decoded to something
    assert (run / "cache" / "images_24.npy").exists()

    def no_decode(*a, **k):
        raise AssertionError("decoded again although the cache matches")

    monkeypatch.setattr(embed, "_decode", no_decode)
    again = embed.load_images(run, small_dataset, df["filepath"].tolist(), 24)
    np.testing.assert_array_equal(images, again)
    # a different file list invalidates the cache
    with pytest.raises(AssertionError, match="decoded again"):
        embed.load_images(run, small_dataset, df["filepath"].tolist()[:-1], 24)
    # ... and so do pixels decoded another way (a fix to the 8-bit conversion)
    monkeypatch.setattr(embed, "DECODE_VERSION", embed.DECODE_VERSION + 1)
    with pytest.raises(AssertionError, match="decoded again"):
        embed.load_images(run, small_dataset, df["filepath"].tolist(), 24)


def test_undecodable_photo_becomes_black_and_is_named(small_dataset, tmp_path, caplog):
    bad = small_dataset / "daisy" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    df = _manifest(small_dataset)
    with caplog.at_level(logging.WARNING, logger="curate.embed"):
        images = embed.load_images(tmp_path / "run", small_dataset, df["filepath"].tolist(), 16)
    i = df.index[df["filepath"] == "daisy/broken.jpg"][0]
    assert images[i].max() == 0
    assert "daisy/broken.jpg" in caplog.text


def test_cheap_features_are_finite_and_separate_different_photos(small_dataset, tmp_path):
    df = _manifest(small_dataset)
    images = embed.load_images(tmp_path / "run", small_dataset, df["filepath"].tolist(), 48)
    feats = embed.cheap_features(images)
    assert feats.shape[0] == len(df) and np.isfinite(feats).all()
    assert len(np.unique(feats.round(4), axis=0)) == len(df)


def test_keras_application_plumbing_without_weights(small_dataset, tmp_path):
    df = _manifest(small_dataset).head(4)
    images = embed.load_images(tmp_path / "run", small_dataset, df["filepath"].tolist(), 32)
    feats = embed.keras_application("MobileNetV3Small", images, weights=None, batch_size=2)
    assert feats.shape[0] == 4 and feats.ndim == 2 and np.isfinite(feats).all()


def test_keras_application_unknown_name_is_a_usage_error():
    with pytest.raises(CurateError, match="no model named 'NoSuchNet'"):
        embed.keras_application("NoSuchNet", np.zeros((1, 32, 32, 3), np.uint8))


def test_keras_application_without_weights_offline_says_so(monkeypatch):
    import keras

    def offline(*a, **k):
        raise Exception("URL fetch failure: no internet")  # what keras raises when the download fails

    monkeypatch.setattr(keras.utils, "get_file", offline)
    import keras.src.utils.file_utils as file_utils

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(CurateError, match="ImageNet weights.*internet"):
        embed.keras_application("MobileNetV3Small", np.zeros((1, 32, 32, 3), np.uint8))


def test_fold_assignment_is_stratified_and_keeps_groups_together():
    labels = np.repeat([0, 1, 2], 20)
    fold = embed.fold_assignment(labels, 4, seed=0)
    assert set(fold) == {0, 1, 2, 3}
    for k in range(4):
        assert np.bincount(labels[fold == k], minlength=3).min() >= 4
    groups = np.arange(60) // 5
    gfold = embed.fold_assignment(labels, 4, seed=0, groups=groups)
    for g in np.unique(groups):
        assert len(set(gfold[groups == g])) == 1


def test_grouped_folds_train_every_fold_on_some_photos_of_a_rare_class():
    # 12 photos of a rare defect made one visual group of about 20, so all 12 sat in one fold, scored by a
    # model that never saw the class: every one of them looked mislabelled
    labels = np.repeat([0, 1, 2, 3], [200, 180, 12, 2])
    emb = np.random.default_rng(0).normal(size=(len(labels), 16))
    groups = embed.visual_groups(emb, labels, group_size=20, min_groups=5)
    assert len(set(groups[labels == 2])) == 5 and len(set(groups[labels == 3])) == 2
    assert len(set(groups[labels == 0])) == 10  # a large class is grouped as before
    fold = embed.fold_assignment(labels, 5, seed=0, groups=groups)
    for i in range(len(labels)):
        assert (labels[fold != fold[i]] == labels[i]).any(), f"photo {i} (class {labels[i]}): no training example"


def test_vit_kfold_tiny_gives_out_of_fold_scores_and_resumes(small_dataset, tmp_path, monkeypatch):
    from curate.labels import FlagConfig

    df = _manifest(small_dataset)
    classes = sorted(df["label"].unique())
    recipe = TINY_VIT
    cfg = FlagConfig(folds=2, group_folds=False)
    run = tmp_path / "run"
    seen_train: list[set] = []
    real_train_fold = embed.train_fold

    def spy(x_train, y_train, x_test, *a, **k):
        seen_train.append({row.tobytes() for row in x_train})
        overlap = {row.tobytes() for row in x_test} & seen_train[-1]
        assert not overlap, "a held-out photo was in its own fold's training set"
        return real_train_fold(x_train, y_train, x_test, *a, **k)

    monkeypatch.setattr(embed, "train_fold", spy)
    rep = embed.vit_kfold(run, small_dataset, df, classes, cfg, recipe=recipe)
    assert len(seen_train) == 2
    assert rep.oof_probs.shape == (len(df), len(classes))
    np.testing.assert_allclose(rep.oof_probs.sum(1), 1, atol=1e-4)
    assert rep.embeddings.shape == (len(df), TINY_VIT.model.hidden_dim) and np.isfinite(rep.embeddings).all()
    assert sorted(set(rep.space)) == [0, 1]
    assert len(list((run / "cache").glob("vit_fold*of2_*.npz"))) == 2

    def must_not_train(*a, **k):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(embed, "train_fold", must_not_train)
    again = embed.vit_kfold(run, small_dataset, df, classes, cfg, recipe=recipe)
    np.testing.assert_array_equal(again.oof_probs, rep.oof_probs)

    # excluded photos (the retrain without flagged photos): no fold trains on them, each is still scored by
    # its fold's model, and the folds are new models rather than the saved ones
    exclude = np.zeros(len(df), bool)
    exclude[[0, 7, 13, 26]] = True
    images = embed.load_images(run, small_dataset, df["filepath"].tolist(), recipe.model.image_size)
    excluded_rows = {row.tobytes() for row in images[exclude]}
    seen_train.clear()
    monkeypatch.setattr(embed, "train_fold", spy)
    pruned = embed.vit_kfold(run, small_dataset, df, classes, cfg, recipe=recipe, exclude=exclude)
    assert len(seen_train) == 2
    assert all(not (rows & excluded_rows) for rows in seen_train), "an excluded photo was trained on"
    assert sum(len(rows) for rows in seen_train) == len(df) - exclude.sum()  # each kept photo once
    np.testing.assert_array_equal(pruned.space, rep.space)  # same folds
    np.testing.assert_allclose(pruned.oof_probs.sum(1), 1, atol=1e-4)
    assert len(list((run / "cache").glob("vit_fold*of2_*.npz"))) == 4
    monkeypatch.setattr(embed, "train_fold", must_not_train)  # an interrupted retrain resumes from its folds
    resumed = embed.vit_kfold(run, small_dataset, df, classes, cfg, recipe=recipe, exclude=exclude)
    np.testing.assert_array_equal(resumed.oof_probs, pruned.oof_probs)


def test_vit_kfold_grouped_keeps_each_visual_group_in_one_fold(small_dataset, tmp_path):
    from curate.labels import FlagConfig

    df = _manifest(small_dataset)
    classes = sorted(df["label"].unique())
    recipe = TINY_VIT
    rep = embed.vit_kfold(tmp_path / "run", small_dataset, df, classes, FlagConfig(folds=2, group_size=3),
                          recipe=recipe)
    assert rep.common.shape == (len(df), TINY_VIT.model.hidden_dim) and rep.groups is not None
    for g in np.unique(rep.groups):
        assert len(set(rep.space[rep.groups == g])) == 1
    assert len(list((tmp_path / "run" / "cache").glob("vit_*.npz"))) == 3  # the all-data model + 2 folds
