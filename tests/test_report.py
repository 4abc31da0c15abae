"""The report: opens in headless chromium without console errors, shows its images, says what is missing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from runfolder import add_flag, add_flag_columns, horizontal_overflow_px, manifest_of, open_in_chromium, write_run

from curate import cli
from curate.compare import _fingerprint, compare, training_manifests
from curate.export import export
from curate.io import data_root_of, read_manifest
from curate.report import compare_verdict, load_artifacts, report, section_clusters


def _scanned_run(data: Path, run_dir: Path, flagged: bool) -> tuple[Path, str]:
    roses = sorted(p.name for p in (data / "roses").glob("*.jpg"))
    daisy = sorted(p.name for p in (data / "daisy").glob("*.jpg"))
    off = f"roses/{roses[2]}"
    m = manifest_of(data)
    add_flag(m, f"roses/{roses[3]}", "blurry")
    if flagged:
        add_flag(m, off, "off_class")
        m = add_flag_columns(m, suggestions={off: "tulips"})
    run = write_run(run_dir, data, m, groups={"g1": [f"daisy/{daisy[0]}", f"daisy/{daisy[1]}"]}, kinds={"g1": "near"})
    return run, off


def _fake_trainings(run: Path, preset: str = "tiny", epochs: int = 2, always: str | None = None) -> None:
    """Finished trainings as the trainer leaves them (predictions.csv, log.csv), so compare reuses them.

    Each gets a known number of test photos wrong, or with `always` answers that one class for every photo."""
    raw_t, clean_t, _ = training_manifests(read_manifest(run / "manifest.csv"), read_manifest(run / "cleaned.csv"))
    classes = sorted(set(raw_t["label"]))
    test = raw_t[raw_t["split"] == "test"]
    for variant, frame, n_wrong in (("raw", raw_t, 3), ("clean", clean_t, 1)):
        out = run / f"train_{variant}" / "seed0"
        out.mkdir(parents=True)
        predicted = test["label"].tolist()
        for k in range(n_wrong):  # a known number of mistakes: the next class in the list
            predicted[k] = classes[(classes.index(predicted[k]) + 1) % len(classes)]
        if always is not None:
            predicted = [always] * len(predicted)
        pred = pd.DataFrame({"filepath": test["filepath"], "label": test["label"], "predicted": predicted})
        for c in classes:
            pred[f"p_{c}"] = (pred["predicted"] == c).astype(float)
        pred.to_csv(out / "predictions.csv", index=False)
        pd.DataFrame({"epoch": [0, 1], "acc": [0.3, 0.5], "loss": [1.5, 1.2], "val_acc": [0.25, 0.45],
                      "val_loss": [1.6, 1.3]}).to_csv(out / "log.csv", index=False)
        stamp = _fingerprint(frame, data_root_of(run), preset, epochs, 0)
        (out / "compare_inputs.json").write_text(json.dumps(stamp))


@pytest.fixture
def full_run(small_dataset: Path, tmp_path: Path) -> tuple[Path, str]:
    run, off = _scanned_run(small_dataset, tmp_path / "reports" / "flowers", flagged=True)
    export(run)
    _fake_trainings(run)
    result = compare(run / "manifest.csv", run / "cleaned.csv", preset="tiny", seeds=1, epochs=2, progress=False)
    assert not any(r["trained"] for r in result["runs"])  # the fixture's trainings were reused
    return run, off


def _assert_clean_page(page: Path, min_images: int) -> list[tuple[str, bool]]:
    images, errors = open_in_chromium(page)
    assert errors == []
    assert len(images) >= min_images
    broken = [src for src, ok in images if not ok]
    assert broken == []
    return images


def test_report_of_a_scan_only_run_says_what_is_missing_and_renders(small_dataset, tmp_path):
    run, _ = _scanned_run(small_dataset, tmp_path / "reports" / "flowers", flagged=False)
    page = report(run)
    assert page == run / "index.html"
    text = page.read_text()
    assert "Run <code>curate flag</code>" in text and "Run <code>curate export</code>" in text
    assert "No before/after training yet" in text
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stages"] == {"scan": True, "flag": False, "review": False, "export": False, "compare": False}
    assert metrics["issues"] == {"near_duplicate": 2, "blurry": 1}
    md = (run / "report.md").read_text()
    assert "Not exported yet" in md and "| blurry | 1 |" in md
    # thumbnails of 2 duplicates + 1 blurry (issues), 2 duplicates (groups), 1 low quality, 1 chart, 2 sheets
    images = _assert_clean_page(page, min_images=9)
    assert any(src.startswith("sheets/flag/") for src, _ in images)
    assert any(src.startswith("data:image/jpeg;base64,") for src, _ in images)


def test_report_of_a_full_run_shows_every_stage_with_the_same_numbers(full_run):
    run, off = full_run
    assert cli.main(["report", "--run", str(run), "-q"]) == 0
    page = run / "index.html"
    text = page.read_text()
    compare_json = json.loads((run / "compare.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(metrics["stages"][s] for s in ("scan", "flag", "export", "compare"))
    n_test = compare_json["test"]["verified_test"]
    assert metrics["compare"]["accuracy_raw"]["mean"] == pytest.approx((n_test - 3) / n_test)
    assert metrics["compare"]["accuracy_clean"]["mean"] == pytest.approx((n_test - 1) / n_test)
    assert metrics["export"]["removed_by_reason"]["off_class"] == 1
    # the off-class candidate is listed with its score and suggested label, and the export's decision
    section = text.index("<h2>Off-class candidates")
    start = text.index(f"<small>{off}</small>", section)
    row = text[start:text.index("</tr>", start)]
    assert "<b>tulips</b>" in row and "off_class" in row and "0.050" in row
    for needle in ("accuracy before and after cleaning", "confusion matrix raw", "confusion matrix cleaned",
                   "training curves", "class distribution before and after cleaning"):
        assert f'alt="{needle}"' in text or f"alt='{needle}'" in text, needle
    md = (run / "report.md").read_text()
    assert f"{compare_json['raw']['accuracy']['mean']:.3f}" in md
    assert f"{compare_json['clean']['accuracy']['mean']:.3f}" in md
    assert "| off_class | 1 |" in md
    assert compare_verdict(compare_json) in md
    d_f1 = compare_json["difference_macro_f1"]
    assert f"Cleaned − raw macro-F1: {d_f1['mean']:+.3f}" in md and metrics["compare"]["difference_macro_f1"] == d_f1
    assert f"<th class='n'>{d_f1['mean']:+.3f}</th>" in text
    _assert_clean_page(page, min_images=15)
    # the wide off-class table scrolls in its own box; the page itself never scrolls sideways
    assert horizontal_overflow_px(page) == 0


@pytest.mark.parametrize("seeds_ci, bootstrap_ci, starts", [
    ([-0.057, -0.013], [-0.065, -0.007], "Cleaning cost 3.5 points"),
    ([0.01, 0.06], [0.002, 0.07], "Cleaning helped: +3.5 points"),
    ([-0.02, 0.09], [-0.01, 0.08], "No clear difference (+3.5 points"),
    (None, [0.01, 0.06], "Cleaning helped"),  # one seed: the bootstrap interval decides
])
def test_compare_verdict_follows_the_confidence_interval(seeds_ci, bootstrap_ci, starts):
    mean = -0.035 if starts.startswith("Cleaning cost") else 0.035
    verdict = compare_verdict({"difference": {"mean": mean, "ci95_seeds": seeds_ci, "ci95_bootstrap": bootstrap_ci}})
    assert verdict.startswith(starts), verdict


def test_trainings_no_better_than_chance_give_no_verdict(small_dataset, tmp_path, caplog):
    run, _ = _scanned_run(small_dataset, tmp_path / "reports" / "flowers", flagged=True)
    export(run)
    _fake_trainings(run, always="daisy")  # what a model that learned nothing of an imbalanced dataset answers
    with caplog.at_level(logging.WARNING, logger="curate"):
        result = compare(run / "manifest.csv", run / "cleaned.csv", preset="tiny", seeds=1, epochs=2,
                         progress=False)
    assert not result["raw"]["beats_chance"] and not result["clean"]["beats_chance"]
    assert "neither training did better than chance" in caplog.text
    verdict = compare_verdict(result)
    assert verdict.startswith("No verdict") and f"always '{result['test']['largest_class']}'" in verdict
    report(run)
    md = (run / "report.md").read_text()
    assert verdict in md and "always 'daisy' scores 0.200" in md


def test_one_training_above_chance_is_enough_for_a_verdict(full_run):
    run, _ = full_run
    saved = json.loads((run / "compare.json").read_text())
    n = saved["test"]["verified_test"]  # 5 photos, one per class: chance is 1 in 5
    assert saved["clean"]["accuracy"]["mean"] == (n - 1) / n and saved["clean"]["beats_chance"]
    assert saved["raw"]["accuracy"]["mean"] == (n - 3) / n and not saved["raw"]["beats_chance"]  # 2 of 5: no evidence
    assert saved["raw"]["chance_accuracy"] == pytest.approx(0.2)
    assert not compare_verdict(saved).startswith("No verdict")


@pytest.mark.parametrize("acc_ci, f1_ci, starts, says", [
    ([0.01, 0.06], [0.02, 0.08], "Cleaning helped: +3.5 points", "Macro-F1 agrees (+5.0 points)"),
    ([-0.01, 0.08], [-0.09, -0.02], "Mixed result: accuracy shows no clear difference",
     "macro-F1 fell 5.0 points (the whole 95% interval below zero)"),
    ([0.01, 0.06], [-0.09, -0.02], "Mixed result: accuracy rose 3.5 points", "cost a class that accuracy hides"),
    ([0.01, 0.06], [-0.02, 0.09], "Mixed result: accuracy rose 3.5 points", "the gain is in the big classes"),
    ([-0.02, 0.09], [0.01, 0.09], "Mixed result", "helped a class that accuracy underweights"),
])
def test_compare_verdict_weighs_macro_f1_when_it_disagrees(acc_ci, f1_ci, starts, says):
    f1_mean = -0.05 if f1_ci[1] < 0 else 0.05
    verdict = compare_verdict({"difference": {"mean": 0.035, "ci95_seeds": acc_ci},
                               "difference_macro_f1": {"mean": f1_mean, "ci95_seeds": f1_ci}})
    assert verdict.startswith(starts) and says in verdict, verdict
    assert ("curate app" in verdict) == (f1_ci[1] < 0)  # review advice whenever a measure says cleaning cost


def test_chromium_check_catches_a_missing_sheet(full_run):
    run, _ = full_run
    page = report(run)
    sheet = sorted((run / "sheets" / "flag").glob("*.png"))[0]
    sheet.unlink()
    images, errors = open_in_chromium(page)
    assert [src for src, ok in images if not ok] == [f"sheets/flag/{sheet.name}"]
    assert errors  # the failed load is a browser error
    # the next report redraws the missing sheet
    report(run)
    assert sheet.exists()


def test_report_survives_unreadable_artifacts(full_run):
    run, _ = full_run
    (run / "clusters.csv").write_bytes(b"\xff\xfe\x00garbage")
    m = read_manifest(run / "manifest.csv")
    m.loc[0, "filepath"] = "daisy/gone.jpg"  # the photo vanished from the data folder
    m.to_csv(run / "manifest.csv", index=False)
    page = report(run)
    assert 'class="nothumb" title="daisy/gone.jpg"' in page.read_text()  # a grey cell, not a crash
    _, errors = open_in_chromium(page)
    assert errors == []


def test_cluster_section_lists_the_most_suspicious_clusters_first(full_run):
    # clusters.csv: low mean_label_quality (and low score) = suspicious; 20 clusters, the section shows 15
    run, _ = full_run
    art = load_artifacts(run)
    art.clusters = pd.DataFrame({"label": "roses", "cluster": range(20), "size": 10,
                                 "score": [(19 - k) / 19 for k in range(20)],
                                 "mean_label_quality": [0.9 - 0.04 * k for k in range(20)],
                                 "examples": ""})
    rows = section_clusters(art).split("<tr>")[2:]
    assert len(rows) == 15
    assert [r.split("</td><td>")[1] for r in rows[:3]] == ["19", "18", "17"]  # lowest mean_label_quality first
    assert not any(r.split("</td><td>")[1] == "0" for r in rows)  # the least suspicious is left out
    # an older clusters.csv without mean_label_quality: the structure score, low first
    art.clusters = art.clusters.drop(columns="mean_label_quality").assign(score=[k / 19 for k in range(20)])
    rows = section_clusters(art).split("<tr>")[2:]
    assert [r.split("</td><td>")[1] for r in rows[:2]] == ["0", "1"]
