"""`curate run` end to end on a tiny real dataset (--fast flag, tiny trainer preset, one seed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import make_dataset, tree_fingerprint
from runfolder import open_in_chromium

from curate import cli


def _stage_lines(err: str) -> dict[str, str]:
    """stage -> 'ran' | 'skipped' from the progress lines `[i/n] stage: ...`."""
    out = {}
    for m in re.finditer(r"^\[\d/\d\] (\w+): (done in|up to date, skipped|.* is in place, skipped)", err, re.M):
        out[m.group(1)] = "skipped" if "skipped" in m.group(2) else "ran"
    return out


def test_run_fetches_scans_flags_exports_compares_reports_then_skips_what_is_up_to_date(tmp_path, capsys):
    source = make_dataset(tmp_path / "source", per_class=8)
    before = tree_fingerprint(source)
    data = tmp_path / "flowers"
    run_dir = tmp_path / "reports" / "flowers"
    args = ["run", str(data), "--from", str(source), "--fast", "--preset", "tiny", "--seeds", "1"]

    assert cli.main(args) == 0
    first = capsys.readouterr()
    assert _stage_lines(first.err) == {s: "ran" for s in ("fetch", "scan", "flag", "export", "compare", "report")}
    # stdout carries the result only, the report's path (Keras's epoch lines went to stderr)
    assert Path(first.out.strip()).resolve() == (run_dir / "index.html").resolve(), first.out[:500]
    assert tree_fingerprint(source) == before  # the source was copied, never written
    assert len(list(data.rglob("*.jpg"))) == 40
    for name in ("manifest.csv", "duplicates.csv", "cleaned.csv", "removed.csv", "compare.json", "index.html",
                 "report.md", "metrics.json", "pipeline.json"):
        assert (run_dir / name).exists(), name
    compare = json.loads((run_dir / "compare.json").read_text())
    assert compare["preset"] == "tiny" and compare["seeds"] == [0]
    assert (run_dir / "train_raw" / "seed0" / "predictions.csv").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(metrics["stages"][s] for s in ("scan", "flag", "export", "compare"))
    images, errors = open_in_chromium(run_dir / "index.html")
    assert errors == [] and images and all(ok for _, ok in images)

    # nothing changed: every stage is skipped, no training
    assert cli.main(args) == 0
    second = capsys.readouterr()
    assert set(_stage_lines(second.err).values()) == {"skipped"}
    assert "compare [" not in second.err

    # a lost output: only its stage runs again; identical results leave compare and report alone
    (run_dir / "cleaned.csv").unlink()
    assert cli.main(args) == 0
    third = _stage_lines(capsys.readouterr().err)
    assert third["export"] == "ran"
    assert {s: third[s] for s in ("scan", "flag", "compare", "report")} == {s: "skipped" for s in
                                                                             ("scan", "flag", "compare", "report")}

    # --epochs reaches compare: it retrains (and so reports again) with the preset's epochs overridden
    assert cli.main([*args, "--epochs", "1"]) == 0
    fourth = _stage_lines(capsys.readouterr().err)
    assert fourth["compare"] == "ran" and fourth["report"] == "ran" and fourth["flag"] == "skipped"
    assert json.loads((run_dir / "compare.json").read_text())["epochs"] == 1
    log = (run_dir / "train_raw" / "seed0" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 2  # the header and one epoch


def test_run_without_a_dataset_or_source_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nothing_here"), "--fast", "--skip-compare"]) == 2
    assert "nothing_here: no dataset here" in capsys.readouterr().err


def test_skip_compare_still_reports(tmp_path: Path, capsys):
    # 20 photos a class: with 6, --fast learns no class beyond chance and flags nothing off_class
    small_dataset = make_dataset(tmp_path / "flowers", per_class=20, classes=["daisy", "dandelion", "sunflowers"])
    assert cli.main(["run", str(small_dataset), "--fast", "--skip-compare", "--out", "r"]) == 0
    lines = _stage_lines(capsys.readouterr().err)
    assert "compare" not in lines and lines["report"] == "ran"
    assert "No before/after training yet" in Path("r/index.html").read_text()
    assert "q_face" in Path("r/manifest.csv").read_text().splitlines()[0]

    # --no-scene changes the flag recipe: flag runs again without the detectors, and what follows it too
    assert cli.main(["run", str(small_dataset), "--fast", "--skip-compare", "--out", "r", "--no-scene"]) == 0
    lines = _stage_lines(capsys.readouterr().err)
    assert lines["scan"] == "skipped" and lines["flag"] == "ran" and lines["report"] == "ran"
    assert "q_face" not in Path("r/manifest.csv").read_text().splitlines()[0]

    # so does --max-off-class: a shorter flag, and export removes fewer photos
    removed = json.loads(Path("r/export.json").read_text())["removed_by_reason"]["off_class"]
    assert removed >= 1
    assert cli.main(["run", str(small_dataset), "--fast", "--skip-compare", "--out", "r", "--no-scene",
                     "--max-off-class", "0"]) == 0
    lines = _stage_lines(capsys.readouterr().err)
    assert lines["scan"] == "skipped" and lines["flag"] == "ran" and lines["export"] == "ran"
    assert json.loads(Path("r/export.json").read_text())["removed_by_reason"]["off_class"] == 0
