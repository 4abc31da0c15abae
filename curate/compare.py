"""`curate compare`: what cleaning bought, measured by training the same recipe on both manifests.

Both trainings use the same preset and the same seeds, and are scored on the same photos: the
raw manifest's test split minus every photo the cleaning removed or relabelled, so each test
label is one the cleaning did not dispute (the "verified" test photos). The raw and cleaned
training manifests get one shared split (the raw manifest's, see `curate.export.raw_split`);
test photos outside the verified set are marked `excluded`, which the trainer neither trains nor
evaluates on.

Writes `<run>/compare.json` and trains into `<run>/train_raw/seed<k>/` and
`<run>/train_clean/seed<k>/`. A training whose inputs (manifest, preset, epochs, seed, data) are
unchanged since it finished is reused, so an interrupted compare resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from curate.io import CurateError, atomic_write_csv, atomic_write_json, data_root_of, read_json, read_manifest, run_lock

log = logging.getLogger("curate.compare")

VARIANTS = ("raw", "clean")
BOOTSTRAP_SAMPLES = 2000


def _shared_split(raw: pd.DataFrame, clean: pd.DataFrame) -> pd.Series:
    """The raw manifest's split (its own column if complete, else the export's assignment)."""
    if "split" in raw.columns and raw["split"].fillna("").astype(str).str.strip().ne("").all():
        return raw["split"].astype(str).str.strip()
    from curate.export import raw_split

    split = raw_split(raw)
    if "split" in clean.columns:
        theirs = clean.set_index("filepath")["split"]
        mine = pd.Series(split.to_numpy(), index=raw["filepath"])
        common = theirs.index.intersection(mine.index)
        differ = int((theirs[common].astype(str) != mine[common]).sum())
        if differ:
            log.warning("cleaned manifest: %d photos carry a split other than the raw manifest's; "
                        "the raw manifest's split is used for both, so the test photos are shared", differ)
    return split


def training_manifests(raw: pd.DataFrame, clean: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The raw and cleaned training manifests (filepath, label, split) and facts about the test set.

    Test photos the cleaning removed or relabelled get split `excluded` in both manifests.
    """
    dup = clean["filepath"].duplicated()
    if dup.any():
        raise CurateError(f"cleaned manifest: {clean['filepath'][dup].iloc[0]} appears more than once")
    unknown = ~clean["filepath"].isin(raw["filepath"])
    if unknown.any():
        raise CurateError(f"cleaned manifest: {clean['filepath'][unknown].iloc[0]} is not in the raw manifest; "
                          "compare needs the cleaned manifest made from this raw one")
    split = _shared_split(raw, clean)
    raw_t = pd.DataFrame({"filepath": raw["filepath"].astype(str), "label": raw["label"].astype(str),
                          "split": split.to_numpy()})
    clean_label = clean.set_index("filepath")["label"].astype(str)
    in_clean = raw_t["filepath"].isin(clean_label.index)
    same_label = in_clean & (raw_t["filepath"].map(clean_label) == raw_t["label"])
    is_test = raw_t["split"] == "test"
    verified = is_test & same_label
    facts = {
        "raw_test": int(is_test.sum()),
        "verified_test": int(verified.sum()),
        "excluded_removed": int((is_test & ~in_clean).sum()),
        "excluded_relabelled": int((is_test & in_clean & ~same_label).sum()),
    }
    raw_t.loc[is_test & ~verified, "split"] = "excluded"
    split_of = raw_t.set_index("filepath")["split"]
    clean_t = pd.DataFrame({"filepath": clean["filepath"].astype(str), "label": clean["label"].astype(str)})
    clean_t["split"] = clean_t["filepath"].map(split_of)
    if facts["verified_test"] == 0:
        raise CurateError("no verified test photos: the raw test split is empty or the cleaning removed all of it")
    return raw_t, clean_t, facts


def _fingerprint(manifest: pd.DataFrame, data: Path, preset: str, epochs: int | None, seed: int) -> dict:
    digest = hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest()
    return {"manifest_sha256": digest, "data": str(data), "preset": preset, "epochs": epochs, "seed": seed}


def _train_one(manifest: pd.DataFrame, manifest_path: Path, data: Path, out: Path, preset: str,
               epochs: int | None, seed: int, progress: bool) -> bool:
    """Train into `out` unless a finished training with the same inputs is there; True if trained."""
    stamp = out / "compare_inputs.json"
    want = _fingerprint(manifest, data, preset, epochs, seed)
    if stamp.exists() and (out / "predictions.csv").exists() and read_json(stamp) == want:
        return False
    from train.fit import train  # keras: imported only when something must be trained

    if stamp.exists():
        stamp.unlink()  # the inputs changed: this folder's old results no longer count
    train(str(manifest_path), str(data), str(out), preset=preset, epochs=epochs, seed=seed, limit=None,
          progress=progress)
    if not (out / "predictions.csv").exists():
        raise CurateError(f"{out}: training finished without predictions.csv", exit_code=1)
    atomic_write_json(stamp, want)
    return True


def _scores(pred: pd.DataFrame, test_files: pd.Index, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class F1 and confusion matrix of one training on the test photos."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    pred = pred.drop_duplicates("filepath").set_index("filepath")
    missing = test_files.difference(pred.index)
    if len(missing):
        raise CurateError(f"predictions lack {len(missing)} verified test photo(s), e.g. {missing[0]} "
                          "(unreadable files are skipped by the trainer)", exit_code=1)
    pred = pred.loc[test_files]
    y, p = pred["label"].astype(str), pred["predicted"].astype(str)
    f1 = f1_score(y, p, labels=classes, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y, p)),
        "macro_f1": float(f1_score(y, p, labels=classes, average="macro", zero_division=0)),
        "per_class_f1": {c: float(v) for c, v in zip(classes, f1, strict=True)},
        "confusion": confusion_matrix(y, p, labels=classes).tolist(),
        "truth": y.tolist(),
        "predicted": p.tolist(),
    }


def _mean_sd(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "per_seed": [float(v) for v in arr]}


def _seed_interval(diff: np.ndarray) -> dict:
    """Per-seed differences, their mean +- sd and a 95% t-interval over seeds (None with one seed)."""
    from scipy import stats

    out = {"per_seed": [float(d) for d in diff], "mean": float(diff.mean()),
           "sd": float(diff.std(ddof=1)) if len(diff) > 1 else None, "ci95_seeds": None}
    if len(diff) > 1:
        half = float(stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff)))
        out["ci95_seeds"] = [float(diff.mean() - half), float(diff.mean() + half)]
    return out


def paired_difference(raw_acc: list[float], clean_acc: list[float], raw_correct: np.ndarray,
                      clean_correct: np.ndarray, seed: int = 0) -> dict:
    """Clean minus raw accuracy: per seed, mean +- sd, a t-interval over seeds and a bootstrap
    interval over test photos (both 95%).

    The t-interval needs >= 2 seeds; the bootstrap resamples the shared test photos (their
    correctness averaged over seeds), so it also says how much the test set's size alone allows.
    """
    out = _seed_interval(np.asarray(clean_acc, dtype=float) - np.asarray(raw_acc, dtype=float))
    per_photo = clean_correct.mean(axis=0) - raw_correct.mean(axis=0)  # (n_test,)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_photo), size=(BOOTSTRAP_SAMPLES, len(per_photo)))
    boot = per_photo[idx].mean(axis=1)
    out["ci95_bootstrap"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


def macro_f1_resampled(truth: np.ndarray, predicted: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """Macro-F1 (classes coded 0..n_classes-1) for each row of `weights`, how often each test photo was drawn.

    Same definition as scikit-learn's `f1_score(average="macro", zero_division=0)` over all classes,
    in matrix form so thousands of resamples cost a few matrix products.
    """
    total = np.zeros(len(weights))
    for c in range(n_classes):
        is_true, is_pred = truth == c, predicted == c
        tp = weights @ (is_true & is_pred)
        wrong = weights @ (is_true ^ is_pred)  # false positives + false negatives
        denom = 2 * tp + wrong
        total += np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)
    return total / n_classes


def paired_macro_f1_difference(raw_f1: list[float], clean_f1: list[float], truth: list[str],
                               raw_predicted: list[list[str]], clean_predicted: list[list[str]],
                               classes: list[str], seed: int = 0) -> dict:
    """Clean minus raw macro-F1, with the same intervals as `paired_difference`.

    Macro-F1 weighs every class equally, so with imbalanced classes (a few defects among many good
    parts) it shows what accuracy hides: a cleaning that costs the rare class. It is not a mean over
    photos, so the bootstrap recomputes it on each resample of the shared test photos (averaged over seeds).
    """
    out = _seed_interval(np.asarray(clean_f1, dtype=float) - np.asarray(raw_f1, dtype=float))
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code.get(v, -1) for v in truth])
    raw_p = np.array([[code.get(v, -1) for v in run] for run in raw_predicted])
    clean_p = np.array([[code.get(v, -1) for v in run] for run in clean_predicted])
    rng = np.random.default_rng(seed)
    n, boot = len(y), []
    for start in range(0, BOOTSTRAP_SAMPLES, 250):  # chunks keep (resamples x photos) small for big test sets
        rows = min(250, BOOTSTRAP_SAMPLES - start)
        weights = np.zeros((rows, n))
        np.add.at(weights, (np.repeat(np.arange(rows), n), rng.integers(0, n, size=rows * n)), 1.0)
        raw_f = np.mean([macro_f1_resampled(y, p, len(classes), weights) for p in raw_p], axis=0)
        clean_f = np.mean([macro_f1_resampled(y, p, len(classes), weights) for p in clean_p], axis=0)
        boot.append(clean_f - raw_f)
    diffs = np.concatenate(boot)
    out["ci95_bootstrap"] = [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]
    return out


def _run_dir_for(raw_path: Path, run: str | os.PathLike | None) -> Path:
    if run is not None:
        return Path(run)
    return raw_path.parent


def compare(raw: str | os.PathLike, clean: str | os.PathLike, data: str | os.PathLike | None = None,
            run: str | os.PathLike | None = None, preset: str = "cpu", seeds: int = 3, epochs: int | None = None,
            progress: bool = True) -> dict:
    """Train `preset` on the raw and the cleaned manifest with seeds 0..seeds-1; score both on the
    verified test photos; write and return `<run>/compare.json`.

    `data` defaults to the run's scanned folder (scan.json); `run` defaults to the raw manifest's folder.
    """
    if seeds < 1:
        raise CurateError(f"--seeds must be at least 1 (got {seeds})")
    raw_path, clean_path = Path(raw), Path(clean)
    run_dir = _run_dir_for(raw_path, run)
    data_root = Path(data) if data is not None else data_root_of(run_dir)
    if not data_root.is_dir():
        raise CurateError(f"{data_root}: data folder not found (pass --data DATA)")
    raw_df = read_manifest(raw_path)
    clean_df = read_manifest(clean_path)
    raw_t, clean_t, test_facts = training_manifests(raw_df, clean_df)
    classes = sorted(set(raw_t["label"]))
    test_files = pd.Index(raw_t.loc[raw_t["split"] == "test", "filepath"])
    started = time.monotonic()
    runs: list[dict] = []
    with run_lock(run_dir, "compare"):
        frames = {"raw": raw_t, "clean": clean_t}
        for variant, frame in frames.items():
            atomic_write_csv(run_dir / f"train_{variant}" / "manifest.csv", frame)
        total = seeds * len(VARIANTS)
        for seed in range(seeds):
            for variant in VARIANTS:
                out = run_dir / f"train_{variant}" / f"seed{seed}"
                step = len(runs) + 1
                t0 = time.monotonic()
                trained = _train_one(frames[variant], run_dir / f"train_{variant}" / "manifest.csv", data_root,
                                     out, preset, epochs, seed, progress)
                seconds = time.monotonic() - t0
                pred = pd.read_csv(out / "predictions.csv", dtype={"filepath": str, "label": str, "predicted": str},
                                   keep_default_na=False)
                scores = _scores(pred, test_files, classes)
                log.info("compare [%d/%d] %s seed %d: test accuracy %.3f (%s, %.0f s)", step, total, variant, seed,
                         scores["accuracy"], "trained" if trained else "up to date, reused", seconds)
                runs.append({"variant": variant, "seed": seed, "dir": str(out), "trained": trained,
                             "seconds": round(seconds, 1), **scores})
        result = _summarise(runs, classes, test_facts, raw_t, clean_t)
        result.update({"preset": preset, "epochs": epochs, "seeds": list(range(seeds)), "data": str(data_root),
                       "raw_manifest": str(raw_path), "clean_manifest": str(clean_path),
                       "seconds": round(time.monotonic() - started, 1)})
        atomic_write_json(run_dir / "compare.json", result)
    if not (result["raw"]["beats_chance"] or result["clean"]["beats_chance"]):
        t = result["test"]
        log.warning("compare: neither training did better than chance on the %d verified test photos (answering "
                    "without looking at the photo; always '%s' alone scores %.3f): the comparison says nothing about "
                    "the cleaning. Train longer or larger (--epochs, --preset cpu) or add photos of the small classes",
                    t["verified_test"], t["largest_class"], t["largest_class_share"])
    log.info("compare: accuracy raw %s, cleaned %s, difference %+.3f; macro-F1 raw %s, cleaned %s, difference "
             "%+.3f; on %d verified test photos -> %s", _fmt(result["raw"]["accuracy"]),
             _fmt(result["clean"]["accuracy"]), result["difference"]["mean"], _fmt(result["raw"]["macro_f1"]),
             _fmt(result["clean"]["macro_f1"]), result["difference_macro_f1"]["mean"], test_facts["verified_test"],
             run_dir / "compare.json")
    return result


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.3f}" + (f" +- {stat['sd']:.3f}" if stat["sd"] is not None else "")


def _summarise(runs: list[dict], classes: list[str], test_facts: dict, raw_t: pd.DataFrame,
               clean_t: pd.DataFrame) -> dict:
    out: dict = {"classes": classes, "test": test_facts}
    for variant, frame in (("raw", raw_t), ("clean", clean_t)):
        mine = [r for r in runs if r["variant"] == variant]
        out[variant] = {
            "accuracy": _mean_sd([r["accuracy"] for r in mine]),
            "macro_f1": _mean_sd([r["macro_f1"] for r in mine]),
            "per_class_f1": {c: float(np.mean([r["per_class_f1"][c] for r in mine])) for c in classes},
            "confusion": np.sum([r["confusion"] for r in mine], axis=0).tolist(),
            "confusion_note": f"summed over {len(mine)} seed(s); rows = true class, columns = predicted",
            "split_sizes": {k: int(v) for k, v in frame["split"].value_counts().sort_index().items()},
        }
    raw_runs = sorted((r for r in runs if r["variant"] == "raw"), key=lambda r: r["seed"])
    clean_runs = sorted((r for r in runs if r["variant"] == "clean"), key=lambda r: r["seed"])
    # is each training better than answers that ignore the photo (labels.beats_chance, over all seeds' answers)?
    from curate.labels import beats_chance

    code = {c: i for i, c in enumerate(classes)}
    for variant, mine in (("raw", raw_runs), ("clean", clean_runs)):
        truth = np.array([code[v] for r in mine for v in r["truth"]])
        answers = np.array([code.get(v, len(classes)) for r in mine for v in r["predicted"]])
        _, chance, better = beats_chance(truth, answers)
        out[variant]["chance_accuracy"], out[variant]["beats_chance"] = chance, better
    test_truth = pd.Series(raw_runs[0]["truth"])
    out["test"]["largest_class"] = str(test_truth.value_counts().idxmax())
    out["test"]["largest_class_share"] = float(test_truth.value_counts(normalize=True).max())
    def correct(mine: list[dict]) -> np.ndarray:  # (seeds, test photos): right or wrong
        return np.array([np.asarray(r["truth"]) == np.asarray(r["predicted"]) for r in mine])

    out["difference"] = paired_difference([r["accuracy"] for r in raw_runs], [r["accuracy"] for r in clean_runs],
                                          correct(raw_runs), correct(clean_runs))
    out["difference_macro_f1"] = paired_macro_f1_difference(
        [r["macro_f1"] for r in raw_runs], [r["macro_f1"] for r in clean_runs], raw_runs[0]["truth"],
        [r["predicted"] for r in raw_runs], [r["predicted"] for r in clean_runs], classes)
    out["runs"] = [{k: v for k, v in r.items() if k not in ("truth", "predicted")} for r in runs]
    return json.loads(json.dumps(out, default=_to_builtin))


def _to_builtin(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj).__name__)
