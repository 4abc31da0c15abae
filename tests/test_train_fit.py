"""`curate train` / `curate predict` and the array API, with the tiny preset on real photos."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from curate.cli import main
from train import data as tdata
from train.fit import predict_images

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))


def _manifest(root, path, **extra) -> pd.DataFrame:
    rows = [(p.relative_to(root).as_posix(), p.parent.name) for p in sorted(root.glob("*/*.jpg"))]
    df = pd.DataFrame(rows, columns=["filepath", "label"]).assign(**extra)
    df.to_csv(path, index=False)
    return df


def test_train_writes_every_output_and_predict_reads_the_model(small_dataset, tmp_path, capsys):
    _manifest(small_dataset, tmp_path / "m.csv")
    out = tmp_path / "run"
    rc = main(["-q", "train", "--manifest", str(tmp_path / "m.csv"), "--data", str(small_dataset),
               "--out", str(out), "--preset", "tiny", "--epochs", "2"])
    assert rc == 0
    for name in ("model.keras", "log.csv", "history.png", "metrics.json", "predictions.csv", "manifest.csv"):
        assert (out / name).is_file(), name
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"

    log = pd.read_csv(out / "log.csv")
    assert len(log) == 2
    assert {"loss", "acc", "val_loss", "val_acc", "lr", "seconds"} <= set(log.columns)

    split = pd.read_csv(out / "manifest.csv")
    assert split.groupby("label")["split"].apply(lambda s: sorted(s.unique())).map(len).eq(3).all()
    test_rows = split[split["split"] == "test"]

    preds = pd.read_csv(out / "predictions.csv")
    assert sorted(preds["filepath"]) == sorted(test_rows["filepath"])
    prob_cols = [f"p_{c}" for c in sorted(split["label"].unique())]
    np.testing.assert_allclose(preds[prob_cols].sum(1), 1, atol=1e-4)
    assert (preds["predicted"] == preds[prob_cols].idxmax(axis=1).str[2:]).all()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx((preds["label"] == preds["predicted"]).mean())
    assert np.array(metrics["confusion_matrix"]).sum() == len(preds)
    assert set(metrics["per_class"]) == set(split["label"])
    for key in ("macro_f1", "params", "images_per_second", "backend", "device"):
        assert metrics[key] is not None, key

    capsys.readouterr()
    photo = small_dataset / test_rows["filepath"].iloc[0]
    assert main(["predict", str(out / "model.keras"), str(photo)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split("\t")[0] == str(photo)
    assert line.split("\t")[1] == preds.set_index("filepath").loc[test_rows["filepath"].iloc[0], "predicted"]

    # a folder stands for every image under it, sorted; hidden files and files of other kinds are left out
    (small_dataset / "daisy" / ".hidden.jpg").write_bytes(photo.read_bytes())
    (small_dataset / "daisy" / "notes.txt").write_text("not a photo")
    (small_dataset / "empty").mkdir()
    assert main(["-q", "predict", str(out / "model.keras"), str(small_dataset), str(small_dataset / "empty")]) == 0
    folder_lines = capsys.readouterr().out.splitlines()
    photos = sorted(str(p) for p in small_dataset.glob("*/[!.]*.jpg"))
    assert [ln.split("\t")[0] for ln in folder_lines] == photos + [str(small_dataset / "empty")]
    assert folder_lines[-1].split("\t")[1:] == ["ERROR", "no image files in this folder"]
    by_path = {ln.split("\t")[0]: ln.split("\t")[1:] for ln in folder_lines}
    assert by_path[str(photo)][0] == line.split("\t")[1]
    # predicted a few at a time (memory stays flat on a big folder), the answers are the same
    def probabilities(lines: list[str]) -> np.ndarray:
        return np.array([[float(kv.split("=")[1]) for kv in ln.split("\t")[2].split()] for ln in lines])

    few = list(predict_images(out / "model.keras", [str(small_dataset)], batch_size=4))
    assert [ln.split("\t")[0] for ln in few] == photos
    np.testing.assert_allclose(probabilities(few), probabilities(folder_lines[:-1]), atol=2e-3)


def test_existing_split_is_respected_and_other_values_are_ignored(small_dataset, tmp_path):
    df = _manifest(small_dataset, tmp_path / "m.csv")
    df["split"] = ["test" if i % 6 == 0 else "val" if i % 6 == 1 else "excluded" if i % 6 == 2 else "train"
                   for i in range(len(df))]
    df.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "run"
    assert main(["-q", "train", "--manifest", str(tmp_path / "m.csv"), "--data", str(small_dataset),
                 "--out", str(out), "--preset", "tiny", "--epochs", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (15, 5, 5)
    preds = pd.read_csv(out / "predictions.csv")
    assert sorted(preds["filepath"]) == sorted(df.loc[df["split"] == "test", "filepath"])
    assert not set(pd.read_csv(out / "manifest.csv")["filepath"]) & set(df.loc[df["split"] == "excluded", "filepath"])


def test_unreadable_photo_is_skipped_and_training_goes_on(small_dataset, tmp_path, capsys):
    (small_dataset / "roses" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _manifest(small_dataset, tmp_path / "m.csv")
    rc = main(["-q", "train", "--manifest", str(tmp_path / "m.csv"), "--data", str(small_dataset),
               "--out", str(tmp_path / "run"), "--preset", "tiny", "--epochs", "1"])
    assert rc == 0
    assert "skipping unreadable image roses/truncated.jpg" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_unreadable"] == ["roses/truncated.jpg"]


@pytest.mark.parametrize("problem, message", [
    ("no_label", "label"),
    ("outside", "escapes"),
    ("one_image_class", "at least 2 images"),
])
def test_bad_manifests_stop_before_training(small_dataset, tmp_path, capsys, problem, message):
    df = _manifest(small_dataset, tmp_path / "m.csv")
    if problem == "no_label":
        df = df.drop(columns="label")
    elif problem == "outside":
        df.loc[0, "filepath"] = "../../etc/passwd"
    else:
        df.loc[0, "label"] = "orchids"
    df.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "run"
    rc = main(["train", "--manifest", str(tmp_path / "m.csv"), "--data", str(small_dataset),
               "--out", str(out), "--preset", "tiny"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (out / "model.keras").exists() and not (out / "log.csv").exists()


def test_array_api_is_deterministic_and_returns_probabilities_and_embeddings(small_dataset):
    from train.fit import fit_arrays, predict_arrays
    from train.presets import PRESETS

    df = tdata.assign_splits(tdata.check_manifest(_manifest(small_dataset, "m.csv"), small_dataset))
    size = PRESETS["tiny"].model.image_size
    x, ok = tdata.load_images(df, small_dataset, size)
    assert ok.all()
    y = df["label"].map({c: i for i, c in enumerate(tdata.class_names(df))}).to_numpy()
    tr, va = (df["split"] == "train").to_numpy(), (df["split"] != "train").to_numpy()
    # as every real preset trains (a traced graph) twice, then as the tests' tiny preset does (eagerly)
    graph = dataclasses.replace(PRESETS["tiny"], run_eagerly=False)
    runs = []
    for preset in (graph, graph, PRESETS["tiny"]):
        model = fit_arrays(x[tr], y[tr], x[va], y[va], preset=preset, seed=3, epochs=1)
        runs.append(predict_arrays(model, x[va]))
    probs, emb = runs[0]
    assert probs.shape == (va.sum(), 5) and emb.shape == (va.sum(), PRESETS["tiny"].model.hidden_dim)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(runs[1][0], probs, rtol=1e-5, atol=1e-6)
    # eager steps compute what the graph computes: the other tests' eager shortcut tests the same training
    np.testing.assert_allclose(runs[2][0], probs, rtol=1e-4, atol=1e-5)
