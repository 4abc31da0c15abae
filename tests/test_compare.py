"""Compare: the shared verified test photos, the statistics, and a real tiny training of both manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from runfolder import add_flag, add_flag_columns, manifest_of, write_run

from curate import cli
from curate.compare import (
    compare,
    macro_f1_resampled,
    paired_difference,
    paired_macro_f1_difference,
    training_manifests,
)
from curate.export import export, raw_split
from curate.io import CurateError, read_manifest


@pytest.fixture
def cleaned_run(small_dataset: Path, tmp_path: Path) -> Path:
    """A run of 30 real photos where export removed two off-class photos and relabelled a third."""
    m = manifest_of(small_dataset)
    m = add_flag_columns(m)
    run = write_run(tmp_path / "reports" / "flowers", small_dataset, m)
    raw = read_manifest(run / "manifest.csv")
    test_files = raw.loc[raw_split(raw) == "test", "filepath"].tolist()
    for fp in test_files[:2]:
        add_flag(m, fp, "off_class")
    write_run(run, small_dataset, m)
    tags = pd.DataFrame({"filepath": [test_files[2]], "decision": ["relabel"], "relabel_to": ["daisy"]})
    if m.set_index("filepath").loc[test_files[2], "label"] == "daisy":
        tags["relabel_to"] = "roses"
    export(run, tags=tags)
    return run


def test_test_photos_are_the_raw_test_split_minus_what_cleaning_removed_or_relabelled(cleaned_run):
    raw = read_manifest(cleaned_run / "manifest.csv")
    clean = read_manifest(cleaned_run / "cleaned.csv")
    raw_t, clean_t, facts = training_manifests(raw, clean)
    assert facts["excluded_removed"] == 2 and facts["excluded_relabelled"] == 1
    assert facts["verified_test"] == facts["raw_test"] - 3 > 0
    raw_test = set(raw_t.loc[raw_t["split"] == "test", "filepath"])
    clean_test = set(clean_t.loc[clean_t["split"] == "test", "filepath"])
    assert raw_test == clean_test and len(raw_test) == facts["verified_test"]
    # train/val are the same partition in both, except for what cleaning removed
    for split in ("train", "val"):
        r = set(raw_t.loc[raw_t["split"] == split, "filepath"])
        c = set(clean_t.loc[clean_t["split"] == split, "filepath"])
        assert c <= r
    assert (raw_t["split"] == "excluded").sum() == 3 and (clean_t["split"] == "excluded").sum() == 1


def test_cleaned_manifest_from_another_run_is_refused(cleaned_run):
    raw = read_manifest(cleaned_run / "manifest.csv")
    clean = read_manifest(cleaned_run / "cleaned.csv")
    alien = pd.concat([clean, pd.DataFrame({"filepath": ["x/elsewhere.jpg"], "label": ["x"], "split": ["train"]})])
    with pytest.raises(CurateError, match="x/elsewhere.jpg"):
        training_manifests(raw, alien)


def test_paired_difference_statistics():
    raw_acc, clean_acc = [0.60, 0.62, 0.58], [0.66, 0.65, 0.63]
    rng = np.random.default_rng(0)
    raw_c = rng.random((3, 200)) < 0.6
    clean_c = rng.random((3, 200)) < 0.65
    d = paired_difference(raw_acc, clean_acc, raw_c, clean_c)
    assert d["per_seed"] == pytest.approx([0.06, 0.03, 0.05])
    assert d["mean"] == pytest.approx(np.mean([0.06, 0.03, 0.05]))
    assert d["sd"] == pytest.approx(np.std([0.06, 0.03, 0.05], ddof=1))
    lo, hi = d["ci95_seeds"]
    assert lo < d["mean"] < hi and hi - lo > 2 * d["sd"] / np.sqrt(3)  # t(2) is wider than the normal
    blo, bhi = d["ci95_bootstrap"]
    observed = clean_c.mean() - raw_c.mean()
    assert blo < observed < bhi
    one = paired_difference([0.5], [0.6], raw_c[:1], clean_c[:1])
    assert one["sd"] is None and one["ci95_seeds"] is None and one["ci95_bootstrap"] is not None


def test_resampled_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    p[:120] = y[:120]
    p[y == 3] = 0  # class 3 never predicted: its F1 is 0
    idx = rng.integers(0, 300, size=(5, 300))
    weights = np.stack([np.bincount(row, minlength=300) for row in idx]).astype(float)
    got = macro_f1_resampled(y, p, 4, np.vstack([np.ones(300), weights]))
    want = [f1_score(y, p, labels=range(4), average="macro", zero_division=0)]
    want += [f1_score(y[row], p[row], labels=range(4), average="macro", zero_division=0) for row in idx]
    assert got == pytest.approx(want)


def test_macro_f1_difference_sees_a_rare_class_that_accuracy_hides():
    # 270 good parts and 30 scratched ones. Raw: 250 good parts right, 24 of 30 scratches found (274 right).
    # Cleaned: every good part right, only 6 scratches found (276 right).
    truth = ["good"] * 270 + ["scratch"] * 30
    raw = ["good"] * 250 + ["scratch"] * 20 + ["scratch"] * 24 + ["good"] * 6
    clean = ["good"] * 270 + ["scratch"] * 6 + ["good"] * 24
    acc = lambda pred: float(np.mean([a == b for a, b in zip(truth, pred, strict=True)]))  # noqa: E731
    from sklearn.metrics import f1_score

    f1 = lambda pred: f1_score(truth, pred, average="macro")  # noqa: E731
    assert acc(clean) > acc(raw)  # accuracy says cleaning helped ...
    d = paired_macro_f1_difference([f1(raw)] * 2, [f1(clean)] * 2, truth, [raw, raw], [clean, clean],
                                   ["good", "scratch"])
    assert d["mean"] == pytest.approx(f1(clean) - f1(raw)) and d["mean"] < -0.1
    assert d["ci95_bootstrap"][1] < 0  # ... macro-F1 says it cost the rare class, beyond resampling noise
    assert d["ci95_seeds"] == pytest.approx([d["mean"], d["mean"]])  # identical seeds: no spread
    same = paired_macro_f1_difference([f1(raw)], [f1(raw)], truth, [raw], [raw], ["good", "scratch"])
    assert same["mean"] == 0 and same["ci95_bootstrap"] == [0.0, 0.0] and same["ci95_seeds"] is None


def test_compare_trains_both_on_the_same_test_photos_and_resumes(cleaned_run):
    result = compare(cleaned_run / "manifest.csv", cleaned_run / "cleaned.csv", preset="tiny", seeds=1, epochs=1,
                     progress=False)
    saved = json.loads((cleaned_run / "compare.json").read_text())
    assert saved["raw"]["accuracy"] == result["raw"]["accuracy"]
    n_test = result["test"]["verified_test"]
    for variant in ("raw", "clean"):
        seed_dir = cleaned_run / f"train_{variant}" / "seed0"
        pred = pd.read_csv(seed_dir / "predictions.csv")
        assert len(pred) == n_test  # the trainer evaluated exactly the verified photos
        stats = saved[variant]
        assert 0.0 <= stats["accuracy"]["mean"] <= 1.0 and stats["accuracy"]["sd"] is None
        assert set(stats["per_class_f1"]) == set(saved["classes"])
        assert np.asarray(stats["confusion"]).sum() == n_test
    run = {r["variant"]: r for r in saved["runs"]}
    assert saved["difference"]["mean"] == pytest.approx(run["clean"]["accuracy"] - run["raw"]["accuracy"])
    assert saved["difference_macro_f1"]["mean"] == pytest.approx(run["clean"]["macro_f1"] - run["raw"]["macro_f1"])
    assert len(saved["difference_macro_f1"]["ci95_bootstrap"]) == 2
    assert all(r["trained"] for r in saved["runs"])
    # same inputs again: nothing retrained, same numbers
    assert cli.main(["compare", "--raw", str(cleaned_run / "manifest.csv"), "--clean",
                     str(cleaned_run / "cleaned.csv"), "--preset", "tiny", "--seeds", "1", "--epochs", "1", "-q"]) == 0
    again = json.loads((cleaned_run / "compare.json").read_text())
    assert not any(r["trained"] for r in again["runs"])
    assert again["raw"]["accuracy"] == saved["raw"]["accuracy"]
