"""Export policies on small runs of real photos: which photo goes, which stays, and why."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from runfolder import add_flag, add_flag_columns, manifest_of, write_run
from test_fiftyone import private_mongo  # noqa: F401 -- a private MongoDB for the review-tag test

from curate import cli
from curate.export import POLICIES, build_cleaned, export, load_tables, raw_split
from curate.io import CurateError, data_root_of, read_manifest
from train.data import assign_splits


@pytest.fixture
def messy_run(small_dataset: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A run over real photos with one case of every rule; returns (run_dir, role -> filepath)."""
    data = small_dataset
    daisy = sorted((data / "daisy").glob("*.jpg"))
    roses = sorted((data / "roses").glob("*.jpg"))
    # exact copy in the same class, a resized copy (near duplicate), a copy under another label
    shutil.copyfile(daisy[0], data / "daisy" / "copy_exact.jpg")
    with Image.open(roses[0]) as im:
        im.resize((im.width // 2, im.height // 2)).save(data / "roses" / "copy_small.jpg", quality=90)
    shutil.copyfile(daisy[1], data / "tulips" / "cross_copy.jpg")
    (data / "tulips" / "notes.jpg").write_text("not a photo")
    role = {
        "exact_keep": f"daisy/{daisy[0].name}", "exact_extra": "daisy/copy_exact.jpg",
        "near_keep": f"roses/{roses[0].name}", "near_extra": "roses/copy_small.jpg",
        "cross_a": f"daisy/{daisy[1].name}", "cross_b": "tulips/cross_copy.jpg",
        "unreadable": "tulips/notes.jpg",
        "off_class": f"roses/{roses[2].name}", "blurry": f"roses/{roses[3].name}",
        "outlier": f"daisy/{daisy[3].name}",
    }
    m = manifest_of(data)
    add_flag(m, role["off_class"], "off_class")
    add_flag(m, role["blurry"], "blurry")
    add_flag(m, role["outlier"], "outlier")
    m = add_flag_columns(m, suggestions={role["off_class"]: "tulips"})
    run = write_run(tmp_path / "reports" / "flowers", data, m,
                    groups={"g1": [role["exact_keep"], role["exact_extra"]],
                            "g2": [role["near_keep"], role["near_extra"]],
                            "g3": [role["cross_a"], role["cross_b"]]},
                    kinds={"g1": "exact", "g2": "near", "g3": "exact"})
    return run, role


def _reasons(run: Path) -> dict[str, str]:
    removed = pd.read_csv(run / "removed.csv", keep_default_na=False)
    return dict(zip(removed["filepath"], removed["reason"], strict=True))


def test_default_policy_removes_each_case_for_its_reason(messy_run):
    run, role = messy_run
    export(run)
    reasons = _reasons(run)
    assert reasons == {
        role["exact_extra"]: "exact_duplicate",
        role["near_extra"]: "near_duplicate",
        role["cross_a"]: "cross_label_duplicate",
        role["cross_b"]: "cross_label_duplicate",
        role["unreadable"]: "unreadable",
        role["off_class"]: "off_class",
    }
    cleaned = read_manifest(run / "cleaned.csv", required=("filepath", "label", "split"))
    assert list(cleaned.columns) == ["filepath", "label", "split"]
    kept = set(cleaned["filepath"])
    # the group's keep member, the low-quality photo and the outlier stay
    assert {role["exact_keep"], role["near_keep"], role["blurry"], role["outlier"]} <= kept
    assert kept.isdisjoint(reasons)
    manifest = read_manifest(run / "manifest.csv")
    assert len(kept) + len(reasons) == len(manifest)
    summary = pd.read_json(run / "export.json", typ="series")
    assert summary["low_quality_kept"] == 1
    assert summary["removed_by_reason"]["off_class"] == 1


def test_cleaned_split_is_stratified_and_shared_with_removed(messy_run):
    run, _ = messy_run
    export(run)
    cleaned = pd.read_csv(run / "cleaned.csv")
    removed = pd.read_csv(run / "removed.csv")
    assert set(cleaned["split"]) == {"train", "val", "test"}
    for label, rows in cleaned.groupby("label"):
        assert (rows["split"] == "train").sum() >= 3, label
    # the split is the raw manifest's, so removed photos carry theirs too
    tables = load_tables(run)
    split_of = dict(zip(tables.manifest["filepath"], raw_split(tables.manifest), strict=True))
    for df in (cleaned, removed):
        assert df["split"].tolist() == [split_of[f] for f in df["filepath"]]


def test_assign_splits_is_deterministic_keeps_groups_together_and_ignores_row_order(messy_run):
    run, _ = messy_run
    m = load_tables(run).manifest
    first = assign_splits(m, fractions=(0.5, 0.25, 0.25))["split"]
    shuffled = m.sample(frac=1.0, random_state=3)
    again = assign_splits(shuffled, fractions=(0.5, 0.25, 0.25))["split"]
    assert again.reindex(m.index).tolist() == first.tolist()
    for _, members in first.groupby(m["dup_group"].where(m["dup_group"] != "")):
        assert members.nunique() == 1
    assert assign_splits(m, seed=1)["split"].tolist() != assign_splits(m, seed=2)["split"].tolist()


def test_relabel_policy_moves_only_confident_suggestions(messy_run):
    run, role = messy_run
    tables = load_tables(run)
    m = tables.manifest
    classes = sorted(set(m["label"]))
    # out-of-fold probabilities: confident "tulips" for the off-class rose
    probs = np.full((len(m), len(classes)), 1.0 / len(classes))
    i = int(np.flatnonzero(m["filepath"] == role["off_class"])[0])
    probs[i] = 0.025
    probs[i, classes.index("tulips")] = 0.9
    np.save(run / "oof_vit.npy", probs)
    export(run, policy="relabel")
    cleaned = pd.read_csv(run / "cleaned.csv").set_index("filepath")
    assert cleaned.loc[role["off_class"], "label"] == "tulips"
    assert role["off_class"] not in _reasons(run)

    probs[i, classes.index("tulips")] = 0.5  # no longer confident: dropped as in default
    np.save(run / "oof_vit.npy", probs)
    export(run, policy="relabel")
    assert _reasons(run)[role["off_class"]] == "off_class"


def test_strict_policy_also_drops_low_quality_and_outliers(messy_run):
    run, role = messy_run
    export(run, policy="strict")
    reasons = _reasons(run)
    assert reasons[role["blurry"]] == "low_quality"
    assert reasons[role["outlier"]] == "outlier"
    export(run, policy="duplicates-only")
    reasons = _reasons(run)
    assert role["off_class"] not in reasons and reasons[role["exact_extra"]] == "exact_duplicate"


def test_review_tags_override_the_policy(messy_run):
    run, role = messy_run
    clean_photo = "sunflowers/" + sorted(p.name for p in (data_root_of(run) / "sunflowers").glob("*.jpg"))[0]
    tags = pd.DataFrame({
        "filepath": [clean_photo, role["off_class"], role["cross_b"], role["blurry"], role["unreadable"]],
        "decision": ["reject", "keep", "relabel", "relabel", "keep"],
        "relabel_to": ["", "", "daisy", "tulips", ""],
    })
    export(run, tags=tags)
    reasons = _reasons(run)
    cleaned = pd.read_csv(run / "cleaned.csv").set_index("filepath")
    assert reasons[clean_photo] == "review_reject"
    assert cleaned.loc[role["off_class"], "label"] == "roses"  # kept as it was
    assert cleaned.loc[role["cross_b"], "label"] == "daisy"  # the reviewer decided the cross-label pair
    assert reasons[role["cross_a"]] == "cross_label_duplicate"  # its untagged twin still goes
    assert cleaned.loc[role["blurry"], "label"] == "tulips"
    assert reasons[role["unreadable"]] == "unreadable"  # keep cannot resurrect an unreadable file


def test_requested_columns_and_unknown_names_are_reported(messy_run):
    run, _ = messy_run
    result = export(run, columns=["sha256", "label_quality"])
    assert list(pd.read_csv(run / "cleaned.csv").columns) == ["filepath", "label", "split", "sha256",
                                                              "label_quality"]
    assert result.summary["kept"] == len(result.cleaned)
    with pytest.raises(CurateError, match="no_such_column"):
        export(run, columns=["no_such_column"])
    with pytest.raises(CurateError, match="unknown policy 'nope'"):
        export(run, policy="nope")
    assert build_cleaned(load_tables(run)).summary["removed"] == 6


def test_cli_lists_policies_and_writes_to_out(messy_run, capsys):
    run, _ = messy_run
    assert cli.main(["export", "--policy", "list"]) == 0
    listing = capsys.readouterr().out
    for name, fn in POLICIES.items():
        assert name in listing and fn.__doc__.split()[0] in listing
    out = run.parent / "elsewhere" / "mine.csv"
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--columns", "bytes"]) == 0
    assert out.exists() and "bytes" in pd.read_csv(out).columns
    assert cli.main(["export", "--run", str(run), "--policy", "nope"]) == 2


def test_export_without_a_fiftyone_dataset_does_not_import_fiftyone(messy_run):
    run, _ = messy_run
    code = ("import sys; from curate.export import export; export(sys.argv[1]); "
            "print('fiftyone' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.usefixtures("private_mongo")
def test_review_tags_made_in_fiftyone_override_the_export(messy_run):
    """The whole loop: build the run's FiftyOne dataset, tag samples as a reviewer would, export."""
    from curate.fiftyone_bridge import build_dataset

    run, role = messy_run
    dataset = build_dataset(run, progress=False)
    dataset.match({"relpath": role["off_class"]}).tag_samples("relabel:tulips")
    dataset.match({"relpath": role["blurry"]}).tag_samples("reject")
    dataset.match({"relpath": role["cross_a"]}).tag_samples("keep")
    assert cli.main(["export", "--run", str(run)]) == 0
    reasons = _reasons(run)
    cleaned = pd.read_csv(run / "cleaned.csv").set_index("filepath")
    assert cleaned.loc[role["off_class"], "label"] == "tulips"
    assert reasons[role["blurry"]] == "review_reject"
    assert role["cross_a"] in cleaned.index and reasons[role["cross_b"]] == "cross_label_duplicate"
    summary = pd.read_json(run / "export.json", typ="series")
    assert summary["review_tags"] == 3
