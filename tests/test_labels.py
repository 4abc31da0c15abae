"""`curate flag`: the scoring functions and the --fast stage end to end on real photos."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FLOWERS, inspection_shots, make_dataset

from curate import labels as L
from curate.io import CurateError, read_manifest
from train.presets import TINY

TINY_VIT = TINY.with_epochs(1)  # the K-fold ViT at test size: seconds per fold


def _blobs(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float = 0.05) -> np.ndarray:
    return centre + spread * rng.standard_normal((n, len(centre)))


def _two_classes_with_a_foreign_group(seed: int = 0):
    """Class 0: 40 photos around A plus a coherent group of 6 that looks like class 1; class 1: 40 around B."""
    rng = np.random.default_rng(seed)
    a, b = np.eye(8)[0], np.eye(8)[1]
    emb = np.concatenate([_blobs(rng, a, 40), _blobs(rng, b + 0.3 * np.eye(8)[2], 6), _blobs(rng, b, 40)])
    labels = np.array([0] * 46 + [1] * 40)
    foreign = np.arange(40, 46)
    return emb, labels, foreign


def test_knn_quality_is_low_for_photos_whose_neighbours_carry_another_label():
    emb, labels, foreign = _two_classes_with_a_foreign_group()
    q = L.knn_quality(emb, labels, 2, k=5)
    assert q.min() >= 0 and q.max() <= 1
    assert q[foreign].max() < np.median(q[:40])


def test_knn_never_counts_a_photo_as_its_own_neighbour():
    emb = np.array([[1.0, 0], [1.0, 0.01], [0, 1.0], [0.01, 1.0]])
    idx, _ = L.knn_neighbours(emb, k=1)
    assert list(idx[:, 0]) == [1, 0, 3, 2]


def test_cluster_quality_puts_the_coherent_foreign_group_last():
    emb, labels, foreign = _two_classes_with_a_foreign_group()
    q, cluster, table = L.cluster_quality(emb, labels, 2, cluster_size=10)
    assert set(np.argsort(q)[:6]) == set(foreign)
    assert len(set(cluster[foreign])) == 1
    worst = table.sort_values("score").iloc[0]
    assert worst["label_index"] == 0 and worst["size"] == 6


def test_cleanlab_quality_flags_a_confidently_contradicted_label():
    labels = np.array([0] * 30 + [1] * 30)
    probs = np.where(labels[:, None] == np.arange(2), 0.9, 0.1)
    probs[5] = [0.02, 0.98]
    q, issues = L.cleanlab_quality(labels, probs)
    assert np.argmin(q) == 5 and issues[5] and issues.sum() == 1


def test_combine_averages_percentile_ranks_and_respects_weights():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([40.0, 30.0, 20.0, 10.0])
    assert np.allclose(L.combine({"x": a, "y": b}, {"x": 1, "y": 1}), 0.625)
    only_a = L.combine({"x": a, "y": b}, {"x": 1, "y": 0})
    assert list(np.argsort(only_a)) == [0, 1, 2, 3] and only_a.max() <= 1
    with pytest.raises(CurateError):
        L.combine({"x": a}, {"x": 0})


def test_score_keeps_embedding_spaces_apart():
    emb, labels, foreign = _two_classes_with_a_foreign_group()
    # the same data in a second, rotated space (another fold's model): kNN must not mix the two
    rot = np.linalg.qr(np.random.default_rng(1).standard_normal((8, 8)))[0]
    both = np.concatenate([emb, emb @ rot])
    space = np.repeat([0, 1], len(emb))
    s = L.score(both, np.concatenate([labels, labels]), 2, {}, L.FlagConfig(knn_k=5, cluster_size=10), space=space)
    np.testing.assert_allclose(s["q_knn"][: len(emb)], s["q_knn"][len(emb):], atol=1e-6)
    assert s["label_quality"].shape == (2 * len(emb),)
    assert s["clusters"].groupby("label_index")["cluster"].apply(lambda c: c.is_unique).all()


def test_lookalike_quality_is_the_mean_of_the_closest_photos_with_the_same_label():
    # two classes at the same spot: look-alikes must come from the photo's own class only
    emb = np.array([[1.0, 0.0], [1.0, 0.05], [1.0, 0.1], [0.0, 1.0], [1.0, 0.02], [1.0, 0.06], [5.0, 5.0]])
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    own = np.array([0.1, 0.2, 0.3, 0.9, 0.5, 0.7, 0.4])
    q = L.lookalike_quality(emb, labels, own, k=2)
    # photo 0's two closest class-0 photos are 1 and 2 (never itself); photo 3 is far from them all
    np.testing.assert_allclose(q[:4], [0.25, 0.2, 0.15, 0.25], atol=1e-9)
    np.testing.assert_allclose(q[4:6], [0.7, 0.5])  # a class of two: each other's look-alike
    assert q[6] == 0.4  # alone in its class: keeps its own score


def test_score_blends_own_score_and_lookalikes_by_the_configured_share():
    emb, labels, foreign = _two_classes_with_a_foreign_group()
    off = L.score(emb, labels, 2, {}, L.FlagConfig(knn_k=5, cluster_size=10, lookalikes=0))
    on = L.score(emb, labels, 2, {}, L.FlagConfig(knn_k=5, cluster_size=10, lookalikes=3, lookalike_share=0.5))
    np.testing.assert_allclose(off["lookalike_quality"], off["label_quality"])
    own = off["label_quality"]
    np.testing.assert_allclose(on["lookalike_quality"], L.lookalike_quality(emb, labels, own, 3))
    np.testing.assert_allclose(on["label_quality"], 0.5 * own + 0.5 * on["lookalike_quality"])
    # the coherent foreign group's members are each other's look-alikes: they stay at the bottom
    assert set(np.argsort(on["label_quality"])[:6]) == set(foreign)


def test_sure_first_moves_certain_photos_below_all_others_most_certain_lowest():
    quality = np.array([0.9, 0.4, 0.2, 0.7, 0.5])
    certainty = np.array([0.0, 0.9, 0.0, 0.95, 0.0])
    out = L.sure_first(quality, certainty)
    assert list(np.argsort(out)) == [3, 1, 2, 4, 0]
    np.testing.assert_allclose(out[[0, 2, 4]], quality[[0, 2, 4]])  # the rest keep their scores
    assert ((out >= 0) & (out <= 1)).all()
    np.testing.assert_allclose(L.sure_first(quality, np.zeros(5)), quality)


def test_a_confident_face_ranks_a_real_portrait_first(small_dataset, tmp_path):
    portrait = "sunflowers/4933230395_7930697335_m.jpg"  # a woman among sunflowers (tests/test_people.py)
    shutil.copyfile(FLOWERS / portrait, small_dataset / portrait)
    run = _scanned_run(small_dataset, tmp_path / "run")
    L.flag(run, folds=3, fast=True, progress=False)
    df = read_manifest(run / "manifest.csv").set_index("filepath")
    assert df.loc[portrait, "face_score"] >= L.FlagConfig().sure_face
    others = df.drop(index=portrait)
    assert (others["face_score"] < L.FlagConfig().sure_face).all()
    assert df.loc[portrait, "label_quality"] < others["label_quality"].min()
    # without the rule the portrait gets its blended score back and nothing else moves
    L.flag(run, folds=3, fast=True, progress=False, config=L.FlagConfig(sure_face=None))
    off = read_manifest(run / "manifest.csv").set_index("filepath")
    assert off.loc[portrait, "label_quality"] > df.loc[portrait, "label_quality"]
    np.testing.assert_allclose(off.drop(index=portrait)["label_quality"], others["label_quality"])


# photos of sunflowers/ in which the bundled detectors find someone with confidence (face >= 0.92)
PEOPLE = ["40410686_272bc66faf_m.jpg", "4933823300_39fd4420b6.jpg", "4933230247_a0432f01da.jpg",
          "4933823194_33f6e32c5a.jpg", "4933822052_2dfef02517.jpg", "4933821940_38064522a8.jpg"]


def test_in_a_class_of_people_finding_someone_counts_against_no_photo(tmp_path, caplog):
    """Workers with and without helmets: people are what the class is about, so neither the person measures
    nor the sure-face rule may rank its photos first; a portrait filed in daisy/ still ranks first."""
    root = make_dataset(tmp_path / "data", 12, ["daisy", "dandelion"])
    (root / "people").mkdir()
    for name in PEOPLE:
        shutil.copyfile(FLOWERS / "sunflowers" / name, root / "people" / name)
    portrait = "daisy/4933230395_7930697335_m.jpg"  # a woman among sunflowers (tests/test_people.py)
    shutil.copyfile(FLOWERS / "sunflowers" / Path(portrait).name, root / portrait)
    run = _scanned_run(root, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="curate"):
        L.flag(run, folds=3, fast=True, progress=False)
    df = read_manifest(run / "manifest.csv").set_index("filepath")
    people = df[df["label"] == "people"]
    sure = L.FlagConfig().sure_face
    # the people class has photos whose face is found more confidently than the portrait's
    assert (people["face_score"] > df.loc[portrait, "face_score"]).any()
    assert (people["face_score"] >= sure).all()
    assert (people[["q_face", "q_body"]] == 0).all().all()
    assert df.loc[portrait, "q_face"] < 0
    assert df.loc[portrait, "label_quality"] < df.drop(index=portrait)["label_quality"].min()
    assert "100% of the 'people' photos" in caplog.text


def _scanned_run(dataset: Path, run: Path, error_file: str | None = None, pattern: str = "*/*.jpg") -> Path:
    files = sorted(p.relative_to(dataset).as_posix() for p in dataset.glob(pattern))
    df = pd.DataFrame({"filepath": files, "label": [f.split("/")[0] for f in files], "flags": "", "error": ""})
    df.loc[0, "flags"] = "blurry"
    if error_file:
        df.loc[df["filepath"] == error_file, "error"] = "cannot identify image file"
    run.mkdir(parents=True)
    df.to_csv(run / "manifest.csv", index=False)
    (run / "scan.json").write_text(json.dumps({"data": str(dataset)}))
    return run


def test_flag_fast_end_to_end_on_real_photos(small_dataset, tmp_path):
    # a few roses filed as daisies: the stage must score them, not prove it finds them on 30 photos
    for src in sorted((small_dataset / "roses").glob("*.jpg"))[:2]:
        shutil.move(src, small_dataset / "daisy" / f"moved_{src.name}")
    bad = sorted(p.relative_to(small_dataset).as_posix() for p in (small_dataset / "tulips").glob("*.jpg"))[0]
    run = _scanned_run(small_dataset, tmp_path / "run", error_file=bad)
    L.flag(run, folds=3, fast=True, progress=False)

    df = read_manifest(run / "manifest.csv")
    for col in ["label_quality", "q_cleanlab", "q_knn", "q_cluster", "suggested_label", "cluster",
                "models_disagreeing", "pred_knn"]:
        assert col in df.columns, col
    scored = df[df["error"] == ""]
    assert scored["label_quality"].between(0, 1).all() and scored["q_cluster"].notna().all()
    assert set(scored["suggested_label"]) <= {"daisy", "dandelion", "roses", "sunflowers", "tulips"}
    errored = df[df["filepath"] == bad].iloc[0]
    assert pd.isna(errored["label_quality"]) and pd.isna(errored["suggested_label"])
    assert "blurry" in df.loc[0, "flags"]  # scan's flags survive

    n_cls = 5
    oof = np.load(run / "oof_knn.npy")
    assert oof.shape == (len(df), n_cls) and np.isnan(oof[df["filepath"] == bad]).all()
    assert np.load(run / "embeddings.npy").shape[0] == len(df)
    clusters = pd.read_csv(run / "clusters.csv")
    assert list(clusters.columns[:4]) == ["label", "cluster", "size", "score"]
    assert clusters["size"].sum() == len(scored)
    # most suspicious first: by the members' mean label_quality, which is what the column says it is
    assert clusters["mean_label_quality"].is_monotonic_increasing
    means = scored.groupby(["label", "cluster"])["label_quality"].mean()
    for row in clusters.itertuples():
        assert row.mean_label_quality == pytest.approx(means[(row.label, row.cluster)], abs=1e-4)

    # rerunning replaces this stage's flags rather than piling them up
    first = df["flags"].tolist()
    L.flag(run, folds=3, fast=True, progress=False)
    assert read_manifest(run / "manifest.csv")["flags"].tolist() == first

    # label_quality is half the photo's own score, half its look-alikes' (lookalike_quality)
    assert scored["lookalike_quality"].between(0, 1).all()
    L.flag(run, folds=3, fast=True, progress=False, config=L.FlagConfig(lookalikes=0))
    alone = read_manifest(run / "manifest.csv")
    alone = alone[alone["error"] == ""]
    np.testing.assert_allclose(alone["label_quality"], 2 * scored["label_quality"] - scored["lookalike_quality"],
                               atol=5e-5)
    assert not np.allclose(alone["label_quality"], scored["label_quality"])

    # q_typical: similarity to the most similar photos of the same folder, in the pretrained network's bottleneck
    # features (cached in the run); the look-alikes come from its last convolution's
    from curate import pretrained

    good = scored.reset_index(drop=True)
    general = pretrained.embeddings(run, small_dataset, good)
    y = good["label"].map({c: i for i, c in enumerate(sorted(set(good["label"])))}).to_numpy()
    cfg = L.FlagConfig()
    typical = L.typicality_quality(pretrained.bottleneck_features(general), y, cfg.typical_k, cfg.typical_share)
    np.testing.assert_allclose(good["q_typical"], typical, atol=1e-5)
    assert not np.allclose(typical, L.typicality_quality(pretrained.last_conv_features(general), y, 30), atol=1e-3)
    last_conv = pretrained.last_conv_features(general)
    lookalike = L.lookalike_quality(last_conv, y, 2 * good["label_quality"] - good["lookalike_quality"], 5)
    np.testing.assert_allclose(good["lookalike_quality"], lookalike, atol=5e-5)
    # ... and what the App's map is drawn from: one space for every photo (error rows zero)
    written = np.load(run / "embeddings_pretrained.npy")
    np.testing.assert_allclose(written[(df["error"] == "").to_numpy()], last_conv, atol=1e-6)
    assert not written[(df["error"] != "").to_numpy()].any()
    L.flag(run, folds=3, fast=True, progress=False, config=L.FlagConfig(pretrained=False))
    plain = read_manifest(run / "manifest.csv")
    assert "q_typical" not in plain.columns and not (run / "embeddings_pretrained.npy").exists()
    assert not np.allclose(plain.loc[plain["error"] == "", "label_quality"], scored["label_quality"])


def test_flag_names_the_classes_too_small_to_judge(small_dataset, tmp_path, caplog, recwarn):
    # a class of one photo: cleanlab's own warning calls it "class: 5"; flag's names it and its size
    lone = small_dataset / "lilies"
    lone.mkdir()
    shutil.move(sorted((small_dataset / "tulips").glob("*.jpg"))[0], lone / "lily.jpg")
    run = _scanned_run(small_dataset, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="curate.labels"):
        L.flag(run, folds=3, fast=True, progress=False)
    [message] = [r.getMessage() for r in caplog.records if "too few readable photos" in r.getMessage()]
    assert "'lilies' (1)" in message and "'tulips' (5)" in message
    assert not [w for w in recwarn if "May not flag all label issues" in str(w.message)]
    df = read_manifest(run / "manifest.csv")
    assert df.loc[df["label"] == "lilies", "label_quality"].between(0, 1).all()  # still scored


def test_beats_chance_compares_with_answers_that_ignore_the_photo():
    labels = np.array([0] * 60 + [1] * 40)
    assert L.beats_chance(labels, np.zeros(100, int)) == (0.6, 0.6, False)  # always the largest class
    assert L.beats_chance(labels, labels)[2]
    shuffled = np.random.default_rng(0).permutation(labels)  # the right answers, in no relation to the photos
    accuracy, chance, informative = L.beats_chance(labels, shuffled)
    assert chance == pytest.approx(0.52) and not informative  # 60 x 0.6 + 40 x 0.4 right expected
    # 95 good parts, 5 defects: finding 3 defects with 1 false alarm is 97% right, barely above never
    # saying "defect" (95%), yet far beyond chance for a model that says "defect" 4 times in 100
    parts = np.array([0] * 95 + [1] * 5)
    finder = parts.copy()
    finder[[95, 96]] = 0
    finder[0] = 1
    accuracy, chance, informative = L.beats_chance(parts, finder)
    assert accuracy == pytest.approx(0.97) and chance == pytest.approx(0.914) and informative
    assert not L.beats_chance(parts, np.zeros(100, int))[2]


def test_classes_learned_asks_of_each_class_whether_the_model_answers_it_beyond_chance():
    parts = np.array([0] * 95 + [1] * 5)
    assert L.classes_learned(parts, np.zeros(100, int), 2).tolist() == [False, False]  # never says "defect"
    finder = parts.copy()
    finder[[95, 96]] = 0
    finder[0] = 1
    assert L.classes_learned(parts, finder, 2).tolist() == [False, True]  # 3 of 5 defects, 4 answers in 100
    labels = np.repeat([0, 1, 2], 40)
    guessing = np.random.default_rng(0).permutation(labels)
    assert not L.classes_learned(labels, guessing, 3).any() and L.classes_learned(labels, labels, 3).all()
    assert L.classes_learned(labels, labels, 4).tolist() == [True, True, True, False]  # a class with no photo


def _learned_classes(df: pd.DataFrame) -> set[str]:
    """The classes flag judged learned, from a flagged manifest's labels and answers (`suggested_label`)."""
    classes = sorted(set(df["label"]) | set(df["suggested_label"]))
    learned = L.classes_learned(df["label"].map(classes.index), df["suggested_label"].map(classes.index),
                                len(classes))
    return {c for c, ok in zip(classes, learned, strict=True) if ok}


def test_a_rare_class_is_not_flagged_for_what_the_model_never_learned(tmp_path, caplog):
    # 20 photos each of three classes and 3 of a fourth: kNN never answers the rare class, so each of its
    # photos disagrees with its label. That says nothing of the photo; before, they topped the flag
    from conftest import make_dataset, real_photos

    data = make_dataset(tmp_path / "parts", per_class=20, classes=["daisy", "dandelion", "sunflowers"])
    (data / "tulips").mkdir()
    for photo in real_photos(3, ["tulips"]):
        shutil.copyfile(photo, data / "tulips" / photo.name)
    run = _scanned_run(data, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="curate.labels"):
        L.flag(run, folds=3, fast=True, progress=False)
    df = read_manifest(run / "manifest.csv")
    off = df["flags"].fillna("").str.contains("off_class")
    assert off.any() and not off[df["label"] == "tulips"].any(), df.loc[off, "filepath"].tolist()
    [message] = [r.getMessage() for r in caplog.records if "did not learn" in r.getMessage()]
    assert "'tulips' (0 of 3 photos answered as such)" in message
    assert set(df.loc[off, "label"]) <= _learned_classes(df)
    from curate.report import report

    report(run)
    assert "<code>tulips</code> (answered for 0 of its 3 photos)" in (run / "index.html").read_text()


@pytest.mark.parametrize("unlearned_photos", [60, 20])
def test_an_unlearned_class_is_ranked_without_the_models_disagreement(unlearned_photos):
    # three classes; the model answers classes 0 and 1 for their photos, but class 0 for every photo of class 2
    # (the 48-px ViT on 748 flower photos learned neither roses nor tulips). In each class 6 photos are strays:
    # a label-free measure (q_typical) marks them all, and the model answers the other class for those of 0 and 1
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [60, 60, unlearned_photos])
    n = len(labels)
    strays = np.concatenate([np.flatnonzero(labels == c)[:6] for c in range(3)])
    answers = np.where(labels == 2, 0, labels)
    answers[strays[:12]] = 1 - labels[strays[:12]]
    probs = np.full((n, 3), 0.05)
    probs[np.arange(n), answers] = 0.9
    typical = rng.uniform(0.5, 1.0, n)
    typical[strays] = rng.uniform(0.0, 0.1, len(strays))
    emb = _blobs(rng, np.zeros(8), n, spread=1.0)
    cfg = L.FlagConfig(knn_k=5, cluster_size=10, lookalikes=0, typical_k=30, sure_face=None,
                       weights={"q_cleanlab": 1.0, "q_knn": 1.0, "q_confidence": 1.0, "q_typical": 3.0})
    s = L.score(emb, labels, 3, {"model": probs}, cfg, extra={"q_typical": typical})
    assert s["chance"]["beats_chance"] and s["chance"]["classes_learned"].tolist() == [True, True, False]
    off, _ = L.choose_flags(s, cfg)
    everything = L.combine({k: s[k] for k in ("q_cleanlab", "q_knn", "q_confidence", "q_typical")}, cfg.weights)
    issues = int(s["issues"][labels < 2].sum())  # cleanlab's count among the classes the model learned
    assert issues >= 12
    np.testing.assert_allclose(s["label_quality"][labels < 2], everything[labels < 2])
    if unlearned_photos > cfg.typical_k:
        # class 2 is ranked by q_typical alone: the disagreement no longer sinks all its photos, its strays are
        # flagged with the others', and the flag is cleanlab's share among classes 0 and 1 of all the photos
        assert s["chance"]["classes_ranked"].all()
        np.testing.assert_allclose(s["label_quality"][labels == 2], L.percentile_rank(typical)[labels == 2])
        assert off[strays[12:]].all() and off.sum() == issues * n // 120
    else:
        # a class no bigger than a photo's typical_k neighbours: within-class measures would rank all its photos
        # low, so it is ranked as before and none of its photos is flagged; the flag is cleanlab's count
        assert s["chance"]["classes_ranked"].tolist() == [True, True, False]
        np.testing.assert_allclose(s["label_quality"], everything)
        assert not off[labels == 2].any() and off.sum() == issues


def test_no_off_class_from_models_that_know_nothing_of_the_classes(tmp_path, caplog):
    # inspection shots: the cheap features cannot see a scratch, so --fast's kNN guesses; cleanlab
    # then "finds" label issues among photos that are all correctly filed
    data = inspection_shots(tmp_path / "inspection")
    run = _scanned_run(data, tmp_path / "run", pattern="*/*.png")
    with caplog.at_level(logging.WARNING, logger="curate.labels"):
        L.flag(run, folds=3, fast=True, progress=False)
    df = read_manifest(run / "manifest.csv")
    assert not df["flags"].str.contains("off_class").any() and df["label_quality"].notna().all()
    assert any("no better than chance" in r.getMessage() for r in caplog.records)
    from curate.report import report

    report(run)
    assert "no better than chance" in (run / "index.html").read_text()
    L.flag(run, folds=3, fast=True, progress=False, config=L.FlagConfig(chance_p_value=None))
    assert read_manifest(run / "manifest.csv")["flags"].str.contains("off_class").any()  # what it did before


def test_models_at_chance_rank_photos_unlike_every_class_first(tmp_path):
    # the same shots with two real photos of something else filed as `good` parts: with nothing learned of
    # the classes, label_quality follows the distance to the nearest class centre, which puts them first
    from conftest import real_photos
    from PIL import Image

    data = inspection_shots(tmp_path / "inspection")
    for i, photo in enumerate(real_photos(1, ["roses", "tulips"])):
        Image.open(photo).convert("RGB").resize((320, 240)).save(data / "good" / f"stray{i}.png")
    run = _scanned_run(data, tmp_path / "run", pattern="*/*.png")
    L.flag(run, folds=3, fast=True, progress=False)
    df = read_manifest(run / "manifest.csv")
    assert not df["flags"].str.contains("off_class").any()  # still at chance: nothing flagged
    first = df.sort_values("label_quality")["filepath"].head(2).tolist()
    assert sorted(first) == ["good/stray0.png", "good/stray1.png"], df.sort_values("label_quality").head(5)


def test_max_off_class_shortens_the_flag_and_leaves_the_ranking_alone(tmp_path):
    from badinputs import run_cli
    from conftest import make_dataset

    # 20 photos a class: with 6, kNN on the cheap features learns no class beyond chance, and nothing is flagged
    data = make_dataset(tmp_path / "flowers", per_class=20, classes=["daisy", "dandelion", "sunflowers"])
    run = _scanned_run(data, tmp_path / "run")
    assert run_cli(["flag", "--run", str(run), "--fast", "-q"])[0] == 0
    full = read_manifest(run / "manifest.csv")
    full_off = full["flags"].fillna("").str.contains("off_class").to_numpy()
    assert full_off.sum() >= 3  # cleanlab finds issues on these photos; the cap must have something to cut

    share = (full_off.sum() - 2) / len(full)
    assert run_cli(["flag", "--run", str(run), "--fast", "-q", "--max-off-class", str(share)])[0] == 0
    short = read_manifest(run / "manifest.csv")
    short_off = short["flags"].fillna("").str.contains("off_class").to_numpy()
    pd.testing.assert_series_equal(short["label_quality"], full["label_quality"])
    assert short_off.sum() == int(share * len(full)) and not (short_off & ~full_off).any()
    # the flag is the lowest label_quality photos of the classes the models learned
    judged = short["label"].isin(_learned_classes(short)).to_numpy()
    assert short.loc[short_off, "label_quality"].max() <= short.loc[judged & ~short_off, "label_quality"].min()

    assert run_cli(["flag", "--run", str(run), "--fast", "-q", "--max-off-class", "0"])[0] == 0
    assert not read_manifest(run / "manifest.csv")["flags"].fillna("").str.contains("off_class").any()
    for bad in ("1.5", "-0.1", "a lot"):
        rc, _, err = run_cli(["flag", "--run", str(run), "--fast", "-q", "--max-off-class", bad])
        assert rc == 2 and f"--max-off-class: {bad}: expected a share of the photos, 0 to 1" in err, err
    with pytest.raises(CurateError, match="max_off_class_fraction = 1.5: expected a share"):
        L.flag(run, fast=True, progress=False, config=L.FlagConfig(max_off_class_fraction=1.5))


def test_flag_usage_errors(small_dataset, tmp_path):
    run = _scanned_run(small_dataset, tmp_path / "run")
    with pytest.raises(CurateError, match="at least 2 folds"):
        L.flag(run, folds=1, fast=True, progress=False)
    with pytest.raises(CurateError, match="expected 'vit'"):
        L.flag(run, embeddings="magic", progress=False)
    with pytest.raises(CurateError, match="--fast"):
        L.flag(run, embeddings="vit", fast=True, progress=False)


def test_flag_with_a_tiny_kfold_vit_writes_its_out_of_fold_outputs(small_dataset, tmp_path):
    run = _scanned_run(small_dataset, tmp_path / "run")
    # a tiny ViT on 30 photos is at chance, where label_quality is the centre distance alone: score as if not
    # (chance_p_value=None), so the combination of the components is what is tested
    L.flag(run, folds=2, embeddings="vit", progress=False,
           config=L.FlagConfig(vit=TINY_VIT, group_size=3, retrain_pruned=False, chance_p_value=None))
    df = read_manifest(run / "manifest.csv")
    for col in ["q_cleanlab", "q_knn", "q_cluster", "q_confidence", "q_features", "q_typical", "q_face", "q_body",
                "q_structure", "q_focus", "q_colour", "q_foliage", "face_score", "body_score",
                "straight_edges", "in_focus", "colourfulness", "foliage", "pred_vit"]:
        assert df[col].notna().all(), col
    assert (df["q_structure"] == -df["straight_edges"]).all()  # the detector's measure, sign flipped
    assert (df["q_focus"] == -df["in_focus"]).all() and df["in_focus"].between(0, 1).all()
    # less green than the class's other photos
    by_class = df.groupby("label")["foliage"]
    np.testing.assert_allclose(df["q_foliage"], (by_class.rank() - 0.5) / by_class.transform("size"), atol=1e-5)
    assert df["foliage"].between(0, 1).all()
    assert df["label_quality"].between(0, 1).all()
    oof = np.load(run / "oof_vit.npy")
    assert oof.shape == (len(df), 5)
    np.testing.assert_allclose(oof.sum(1), 1, atol=1e-4)
    assert (df["pred_vit"] == np.array(sorted(set(df["label"])))[oof.argmax(1)]).all()
    assert np.load(run / "embeddings.npy").shape == (len(df), TINY_VIT.model.hidden_dim)

    # --no-scene: the detectors' columns go (the folds come from the cache) and label_quality changes
    L.flag(run, folds=2, embeddings="vit", progress=False,
           config=L.FlagConfig(vit=TINY_VIT, group_size=3, scene=False, retrain_pruned=False, chance_p_value=None))
    plain = read_manifest(run / "manifest.csv")
    assert not {"q_face", "q_body", "q_structure", "q_focus", "q_colour", "q_foliage", "face_score", "body_score",
                "straight_edges", "in_focus", "colourfulness", "foliage"} & set(plain.columns)
    assert (plain["q_cleanlab"] == df["q_cleanlab"]).all()
    assert not np.allclose(plain["label_quality"], df["label_quality"])


def test_flag_retrains_the_kfold_vit_without_the_photos_it_flagged(small_dataset, tmp_path, monkeypatch):
    from curate import embed

    run = _scanned_run(small_dataset, tmp_path / "run")
    # a tiny ViT on 30 photos is at chance: flag anyway (chance_p_value=None), the retrain plumbing is tested
    cfg = L.FlagConfig(vit=TINY_VIT, group_size=3, scene=False, chance_p_value=None, retrain_pruned=True)
    assert not L.FlagConfig().retrain_pruned  # off by default (`curate flag --retrain`): tested here turned on
    L.flag(run, folds=2, embeddings="vit", progress=False, config=dataclasses.replace(cfg, retrain_pruned=False))
    first = read_manifest(run / "manifest.csv")
    first_off = first["flags"].fillna("").str.contains("off_class").to_numpy()
    assert 0 < first_off.sum() < len(first)

    calls = []
    real_vit_kfold = embed.vit_kfold

    def spy(*a, **k):
        calls.append(k.get("exclude"))
        return real_vit_kfold(*a, **k)

    monkeypatch.setattr(embed, "vit_kfold", spy)
    L.flag(run, folds=2, embeddings="vit", progress=False, config=cfg)
    # the first pass (its folds from the cache), then the folds trained without the first pass's off_class
    assert len(calls) == 2 and calls[0] is None
    np.testing.assert_array_equal(calls[1], first_off)
    again = read_manifest(run / "manifest.csv")
    assert len(list((run / "cache").glob("vit_fold*of2_*.npz"))) == 4
    # every photo is scored by the retrained models: their probabilities replace the first pass's
    assert not np.allclose(again["q_cleanlab"], first["q_cleanlab"])
    oof = np.load(run / "oof_vit.npy")
    assert (again["pred_vit"] == np.array(sorted(set(again["label"])))[oof.argmax(1)]).all()
    assert again["label_quality"].between(0, 1).all() and again["label_quality"].notna().all()

    # a shorter flag leaves what the retrain left out, and so the ranking, as it was (its folds are reused)
    calls.clear()
    L.flag(run, folds=2, embeddings="vit", progress=False, config=dataclasses.replace(cfg, max_off_class_fraction=0.05))
    np.testing.assert_array_equal(calls[1], first_off)
    short = read_manifest(run / "manifest.csv")
    pd.testing.assert_series_equal(short["label_quality"], again["label_quality"])
    assert short["flags"].fillna("").str.contains("off_class").sum() <= int(0.05 * len(short))
    assert len(list((run / "cache").glob("vit_fold*of2_*.npz"))) == 4


@pytest.mark.parametrize(("options", "retrain"), [([], False), (["--retrain"], True), (["--no-retrain"], False)])
def test_curate_flag_retrains_only_when_asked(options, retrain, tmp_path, monkeypatch):
    """The prune-and-retrain pass is off by default (it bought 0.005 AP for a third of the full mode's time on
    flower_photos) and `--retrain` turns it on."""
    from curate import cli

    seen = []
    monkeypatch.setattr(L, "flag", lambda run, **kwargs: seen.append(kwargs["config"]))
    assert cli.main(["flag", "--run", str(tmp_path), "-q", *options]) == 0
    assert [c.retrain_pruned for c in seen] == [retrain]
