"""Every command that reads the bad-input corpus (tests/badinputs.py) says which file and why, and goes on or stops
as documented (docs/reliability.md); nothing is read or written outside the dataset root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from badinputs import bad_manifests, make_bad_dataset, make_exif_pair, outside_of, run_cli
from conftest import make_dataset, tree_fingerprint
from test_fiftyone import private_mongo  # noqa: F401 -- a private MongoDB for `curate app --no-launch`

from curate.io import read_manifest, safe_relpath


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The bad dataset, scanned and flagged (--fast) once for the module: {data, outside, entries, run, ...}."""
    base = tmp_path_factory.mktemp("reliability")
    data = base / "bad"
    entries = make_bad_dataset(data, outside_of(data))
    fingerprint = tree_fingerprint(data), tree_fingerprint(outside_of(data))
    run = base / "run"
    scan = run_cli(["scan", str(data), "--out", str(run), "--workers", "2", "-q"])
    flagged = base / "flagged"
    shutil.copytree(run, flagged)
    flag = run_cli(["flag", "--run", str(flagged), "--fast", "-q"])
    return {"data": data, "entries": entries, "run": run, "scan": scan, "flagged": flagged, "flag": flag,
            "fingerprint": fingerprint, "base": base}


def _flags(cell: str) -> set[str]:
    return {f for f in str(cell).split(";") if f}


def _untouched(corpus: dict) -> None:
    data = corpus["data"]
    assert (tree_fingerprint(data), tree_fingerprint(outside_of(data))) == corpus["fingerprint"]


def test_scan_names_every_bad_file_and_its_reason_and_goes_on(corpus):
    rc, _, err = corpus["scan"]
    assert rc == 0, err
    m = read_manifest(corpus["run"] / "manifest.csv").set_index("filepath")
    info = json.loads((corpus["run"] / "scan.json").read_text())
    skipped = {s["path"]: s["reason"] for s in info["skipped"]}
    for e in corpus["entries"]:
        if e.outcome == "ignored":
            assert e.path not in m.index and e.path not in skipped and e.path not in err, e
            continue
        if e.outcome == "skipped":
            assert e.path not in m.index, e
            assert e.path in skipped and f"{e.path}: skipped: {skipped[e.path]}" in err, e
            continue
        assert e.path in m.index, e
        row = m.loc[e.path]
        if e.outcome == "error":
            assert _flags(row["flags"]) & set(e.flag.split("|")), (e, row["flags"])
            assert row["error"], e
            assert f"{e.path}: {row['error']}" in err, e  # the warning names the file and the reason
            assert row["phash"] == "" or pd.isna(row["phash"]), e  # never hashed as if it were a picture
        else:
            assert row["error"] == "", (e, row["error"])
            assert not e.flag or e.flag in _flags(row["flags"]), (e, row["flags"])
    assert info["ignored_non_image_files"] == sum(e.path.endswith(".txt") for e in corpus["entries"])
    m = m.reset_index()
    assert m.loc[m["filepath"] == "roses/png_named.jpg", "format"].item() == "PNG"
    assert m.loc[m["filepath"] == "roses/cmyk.jpg", "mode"].item() == "CMYK"
    assert set(m["label"]) == {"daisy", "roses", "tulips", "lonely"}
    assert m.loc[m["filepath"] == "daisy/sub/deeper/nested.jpg", "label"].item() == "daisy"
    for fp in m["filepath"]:
        safe_relpath(corpus["data"], fp)  # raises if a row points outside DATA
    _untouched(corpus)


def test_scan_of_a_symlink_to_itself_skips_it_with_a_reason(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=2, classes=["daisy", "roses"])
    (data / "roses" / "loop.jpg").symlink_to("loop.jpg")
    rc, _, err = run_cli(["scan", str(data), "--out", str(tmp_path / "run"), "--workers", "1", "-q"])
    assert rc == 0, err
    assert "roses/loop.jpg: skipped" in err
    assert "roses/loop.jpg" not in set(read_manifest(tmp_path / "run" / "manifest.csv")["filepath"])


def test_flag_fast_scores_the_readable_photos_and_leaves_the_unreadable_unscored(corpus):
    rc, _, err = corpus["flag"]
    assert rc == 0, err
    before = read_manifest(corpus["run"] / "manifest.csv")
    m = read_manifest(corpus["flagged"] / "manifest.csv")
    assert m["filepath"].tolist() == before["filepath"].tolist()  # no row lost or added
    bad = m["error"] != ""
    assert bad.sum() == sum(e.outcome == "error" for e in corpus["entries"])
    assert m.loc[bad, "label_quality"].isna().all() and (m.loc[bad, "suggested_label"].fillna("") == "").all()
    assert m.loc[~bad, "label_quality"].between(0, 1).all()
    assert np.load(corpus["flagged"] / "embeddings.npy").shape[0] == len(m)
    _untouched(corpus)


def test_export_removes_every_unreadable_file_and_accounts_for_every_row(corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(corpus["flagged"], run)
    rc, _, err = run_cli(["export", "--run", str(run), "-q"])
    assert rc == 0, err
    m = read_manifest(run / "manifest.csv")
    cleaned = read_manifest(run / "cleaned.csv", required=("filepath", "label", "split"))
    removed = pd.read_csv(run / "removed.csv", dtype=str, keep_default_na=False)
    assert set(cleaned["filepath"]).isdisjoint(removed["filepath"])
    assert sorted([*cleaned["filepath"], *removed["filepath"]]) == sorted(m["filepath"])
    reason = removed.set_index("filepath")["reason"]
    for e in corpus["entries"]:
        if e.outcome == "error":
            assert reason[e.path] == "unreadable", e
    for fp in cleaned["filepath"]:
        safe_relpath(corpus["data"], fp)
    _untouched(corpus)


def test_report_builds_with_unreadable_photos_and_counts_them(corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(corpus["flagged"], run)
    assert run_cli(["export", "--run", str(run), "-q"])[0] == 0
    rc, out, err = run_cli(["report", "--run", str(run), "-q"])
    assert rc == 0, err
    assert Path(out.strip()) == run / "index.html" and (run / "index.html").stat().st_size > 0
    n_bad = sum(e.outcome == "error" for e in corpus["entries"])
    assert f"| unreadable | {n_bad} |" in (run / "report.md").read_text()
    _untouched(corpus)


def test_train_tiny_skips_each_unreadable_photo_by_name(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    m = read_manifest(corpus["run"] / "manifest.csv")
    m = m[m["label"] != "lonely"]  # a one-photo class is refused (tested below); everything else goes in
    m.to_csv(tmp_path / "raw.csv", index=False)
    rc, _, err = run_cli(["train", "--manifest", str(tmp_path / "raw.csv"), "--data", str(corpus["data"]),
                          "--out", str(tmp_path / "t"), "--preset", "tiny", "--epochs", "1", "-q"])
    assert rc == 0, err
    unreadable = sorted(m.loc[m["error"] != "", "filepath"])
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert sorted(metrics["skipped_unreadable"]) == unreadable
    for fp in unreadable:
        assert f"skipping unreadable image {fp}" in err
    # CMYK, 16-bit, 1x1, PNG-as-.jpg, EXIF-rotated and oddly named photos were all trained on
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == len(m) - len(unreadable)
    _untouched(corpus)


def test_preview_sheets_show_unreadable_photos_as_numbered_placeholders(corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(corpus["flagged"], run)
    rc, out, err = run_cli(["preview", "--run", str(run), "--by", "flag", "-q"])
    assert rc == 0, err
    listed = set()
    for flag in ("corrupt", "truncated", "not_image"):
        sheet = pd.read_csv(run / "sheets" / "flag" / f"{flag}.csv", dtype=str, keep_default_na=False)
        assert (run / "sheets" / "flag" / sheet["sheet"].iloc[0]).stat().st_size > 0
        listed |= set(sheet["filepath"])
    assert listed == {e.path for e in corpus["entries"] if e.outcome == "error"}
    _untouched(corpus)


@pytest.mark.usefixtures("private_mongo")
def test_app_no_launch_builds_the_dataset_with_the_unreadable_photos_in_their_view(corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(corpus["flagged"], run)
    rc, out, err = run_cli(["app", "--run", str(run), "--no-launch", "-q"])
    assert rc == 0, err
    m = read_manifest(run / "manifest.csv")
    head = [line for line in out.splitlines() if line.startswith("FiftyOne dataset ")]
    assert len(head) == 1 and f": {len(m)} samples" in head[0], out
    views = {line.split()[1]: int(line.split()[2]) for line in out.splitlines()[1:] if line.strip().startswith("view")}
    assert views["unreadable"] == sum(e.outcome == "error" for e in corpus["entries"])
    _untouched(corpus)


# ------------------------------------------------------------------ broken manifests

# case -> what each command must say (exit code 2, a fragment of the message); unknown_label goes on.
REFUSED = {
    "missing_label": "lacks required column(s) label",
    "missing_filepath": "lacks required column(s) filepath",
    "duplicate_rows": "appears in 2 rows",
    "dotdot_path": "escapes the data root",
    "absolute_path": "escapes the data root",
    "empty_label": "empty label",
    "garbage": "not a readable CSV manifest",
    "empty_file": "not a readable CSV manifest",
}


@pytest.fixture(scope="module")
def manifests(corpus) -> dict[str, Path]:
    m = read_manifest(corpus["run"] / "manifest.csv")
    return bad_manifests(m[m["label"] != "lonely"], corpus["data"], corpus["base"] / "manifests")


def _run_with(corpus: dict, manifest: Path, dest: Path) -> Path:
    shutil.copytree(corpus["flagged"], dest)
    shutil.copyfile(manifest, dest / "manifest.csv")
    return dest


def _outputs(run: Path) -> dict:
    """The run folder's files but the lock (which records its last holder)."""
    return {k: v for k, v in tree_fingerprint(run).items() if k not in (".lock", ".pipeline.lock")}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_every_command_refuses_a_broken_manifest_naming_file_and_reason(corpus, manifests, case, tmp_path):
    bad = manifests[case]
    run = _run_with(corpus, bad, tmp_path / "run")
    before = _outputs(run)
    commands = {
        "flag": ["flag", "--run", str(run), "--fast"],
        "export": ["export", "--run", str(run)],
        "report": ["report", "--run", str(run)],
        "preview": ["preview", "--run", str(run)],
        "train": ["train", "--manifest", str(bad), "--data", str(corpus["data"]), "--out", str(tmp_path / "t"),
                  "--preset", "tiny"],
        "compare": ["compare", "--raw", str(corpus["run"] / "manifest.csv"), "--clean", str(bad), "--data",
                    str(corpus["data"]), "--run", str(run), "--preset", "tiny", "--seeds", "1"],
    }
    for name, args in commands.items():
        rc, out, err = run_cli([*args, "-q"])
        assert rc == 2, (name, rc, err)
        lines = [line for line in err.splitlines() if line.startswith(f"curate {name}: error: ")]
        assert len(lines) == 1, (name, err)
        named = str(bad) if name in ("train", "compare") else str(run / "manifest.csv")
        assert lines[0].startswith(f"curate {name}: error: {named}: "), (name, lines[0])
        assert REFUSED[case] in lines[0], (name, lines[0])
        assert out == "", name
    assert _outputs(run) == before  # nothing written, not even a half-done output
    assert not (tmp_path / "t" / "model.keras").exists()
    _untouched(corpus)


def test_an_unknown_label_is_carried_through_and_a_one_photo_class_cannot_train(corpus, manifests, tmp_path):
    bad = manifests["unknown_label"]
    weeds = read_manifest(bad).iloc[0]["filepath"]
    run = _run_with(corpus, bad, tmp_path / "run")
    rc, _, err = run_cli(["export", "--run", str(run), "--policy", "duplicates-only", "-q"])
    assert rc == 0, err
    cleaned = read_manifest(run / "cleaned.csv")
    assert cleaned.set_index("filepath").loc[weeds, "label"] == "weeds"  # a label is what the manifest says
    assert run_cli(["report", "--run", str(run), "-q"])[0] == 0
    rc, _, err = run_cli(["train", "--manifest", str(bad), "--data", str(corpus["data"]), "--out",
                          str(tmp_path / "t"), "--preset", "tiny", "-q"])
    assert rc == 2 and "every class needs at least 2 images; too few in: weeds (1)" in err


# ------------------------------------------------------------------ empty and missing datasets


def test_empty_or_missing_datasets_are_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_empty_classes" / "daisy").mkdir(parents=True)
    (tmp_path / "only_empty_classes" / "roses").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = {"empty": "no images found", "only_empty_classes": "no images found", "missing": "no such folder",
             "a_file": "not a folder"}
    for name, message in cases.items():
        rc, _, err = run_cli(["scan", str(tmp_path / name), "--out", str(tmp_path / f"run_{name}"), "-q"])
        assert rc == 2 and f"{tmp_path / name}: {message}" in err, (name, err)
        assert not (tmp_path / f"run_{name}" / "manifest.csv").exists()
    rc, _, err = run_cli(["scan", str(tmp_path / "only_empty_classes"), "--out", str(tmp_path / "r")])
    assert "daisy: class folder has no images" in err and "roses: class folder has no images" in err
    for cmd in ("flag", "export", "report", "preview"):
        rc, _, err = run_cli([cmd, "--run", str(tmp_path / "empty"), "-q"])
        assert rc == 2 and "no manifest.csv here" in err, (cmd, err)


# ------------------------------------------------------------------ EXIF orientation


def test_an_exif_rotated_copy_is_a_near_duplicate_of_the_rotated_photo(tmp_path):
    data = tmp_path / "d"
    a, b = make_exif_pair(data)
    make_dataset(data, per_class=2, classes=["daisy", "roses"])
    assert run_cli(["scan", str(data), "--out", str(tmp_path / "run"), "-q"])[0] == 0
    m = read_manifest(tmp_path / "run" / "manifest.csv").set_index("filepath")
    assert m.loc[a, "dup_group"] != "" and m.loc[a, "dup_group"] == m.loc[b, "dup_group"]
    assert (m.loc[b, "width"], m.loc[b, "height"]) == (m.loc[a, "width"], m.loc[a, "height"])


def test_nothing_is_written_below_data_even_when_out_points_there(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=2, classes=["daisy", "roses"])
    before = tree_fingerprint(data)
    for out in (data / "reports", data / "daisy" / "run"):
        rc, _, err = run_cli(["scan", str(data), "--out", str(out), "-q"])
        assert rc == 2 and "may not be inside DATA" in err
    rc, _, err = run_cli(["run", str(data), "--out", str(data / "r"), "--fast", "--skip-compare", "-q"])
    assert rc == 2 and "may not be inside DATA" in err
    assert tree_fingerprint(data) == before and not any(p.is_dir() and p.name in ("reports", "run", "r")
                                                        for p in data.rglob("*"))
