"""Score a label-issue ranking against the hand audit (benchmark only; product code never reads the audit).

Usage:
    .venv/bin/python bench/flag_eval.py [RUN_DIR or manifest.csv] [--column label_quality] [--audit CSV] [--json OUT]

The manifest must carry `filepath` and a score column where LOW means suspicious (`label_quality` or any
`q_*`). Audit rows with role `positive` are the positives, role `ignore` rows are left out, and every
photo the audit does not list is a negative. Unscored rows (empty score, e.g. unreadable files) rank last.

Prints: average precision (AP) with a 95% bootstrap interval over the audited photos, recall among the top
2x(number of positives), the best flag the ranking allows at the issue's operating point (the highest recall
at precision >= 0.6, and the precision where recall first reaches 0.8, each with how many of the top photos
it takes), precision and recall of the `off_class` flag (and of `off_class` or `outlier`), the AP of each
`q_*` column alone, and AP per class.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

ROOT = Path(__file__).resolve().parents[1]
AUDIT = ROOT.parent / "shared" / "audit" / "dev_audit.csv"


def load_audit(path: str | Path = AUDIT) -> pd.DataFrame:
    audit = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"filepath", "role"} <= set(audit.columns):
        sys.exit(f"{path}: audit needs filepath and role columns")
    return audit


def truth_of(filepaths: pd.Series, audit: pd.DataFrame) -> pd.Series:
    """1 = positive, 0 = negative, NaN = ignored, aligned to `filepaths`."""
    role = filepaths.map(dict(zip(audit["filepath"], audit["role"], strict=True)))
    truth = pd.Series(0.0, index=filepaths.index)
    truth[role == "positive"] = 1.0
    truth[role == "ignore"] = np.nan
    return truth


def audited_suspicion(filepaths: pd.Series, quality: np.ndarray, audit: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(truth 0/1, suspicion = -quality) over the audited rows (ignored rows left out)."""
    truth = truth_of(filepaths, audit)
    keep = truth.notna().to_numpy()
    y = truth.to_numpy()[keep].astype(int)
    q = np.asarray(quality, dtype=float)[keep]
    # Unscored rows rank last: a detector gets no credit for what it did not score.
    suspicion = -q
    if np.isnan(q).any():
        floor = np.nanmin(suspicion) - 1 if (~np.isnan(q)).any() else 0.0
        suspicion = np.where(np.isnan(q), floor, suspicion)
    return y, suspicion


# the flag target of curate flag's issue: recall >= 0.8 at precision >= 0.6
TARGET_PRECISION = 0.6
TARGET_RECALL = 0.8


def operating_points(hits: np.ndarray, n_pos: int) -> dict:
    """What a flag of the top N photos of a ranking would reach, at the best N for the issue's target: the
    highest recall with precision >= TARGET_PRECISION, and the precision where recall first reaches
    TARGET_RECALL. `hits[i]`: positives among the ranking's first i + 1 audited photos (ignored rows left out);
    `n_pos` > 0. Every positive is in the ranking, so recall always reaches TARGET_RECALL somewhere."""
    precision, recall = hits / np.arange(1, len(hits) + 1), hits / n_pos
    ok = np.flatnonzero(precision >= TARGET_PRECISION)
    at_p = int(ok[np.argmax(recall[ok])]) if len(ok) else None
    at_r = int(np.argmax(recall >= TARGET_RECALL))
    return {
        "recall_at_precision": float(recall[at_p]) if at_p is not None else 0.0,
        "top_n_at_precision": at_p + 1 if at_p is not None else 0,
        "precision_at_recall": float(precision[at_r]),
        "top_n_at_recall": at_r + 1,
    }


def ranking_scores(filepaths: pd.Series, quality: np.ndarray, audit: pd.DataFrame) -> dict:
    """AP, recall@2P and the operating points of a quality score (low = suspicious) over the audited rows."""
    y, suspicion = audited_suspicion(filepaths, quality, audit)
    n_pos = int(y.sum())
    if n_pos == 0:
        return {"ap": float("nan"), "recall_at_2p": float("nan"), "positives": 0, "n": int(len(y))}
    hits = np.cumsum(y[np.argsort(-suspicion, kind="stable")])
    return {
        "ap": float(average_precision_score(y, suspicion)),
        "recall_at_2p": float(hits[min(2 * n_pos, len(hits)) - 1] / n_pos),
        "positives": n_pos,
        "n": int(len(y)),
        "base_rate": float(n_pos / len(y)),
        **operating_points(hits, n_pos),
    }


def ap_interval(filepaths: pd.Series, quality: np.ndarray, audit: pd.DataFrame, resamples: int = 1000,
                seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the AP: the audited photos resampled with replacement.

    With under 200 positives the AP of one ranking is itself uncertain by several points; this says how
    many, so a target like AP >= 0.6 is read against it (differences between two rankings need a paired
    bootstrap instead: bench/flag_ablation.py)."""
    y, suspicion = audited_suspicion(filepaths, quality, audit)
    rng = np.random.default_rng(seed)
    aps = []
    for _ in range(resamples):
        b = rng.integers(0, len(y), len(y))
        if 0 < y[b].sum() < len(b):
            aps.append(average_precision_score(y[b], suspicion[b]))
    if not aps:
        return float("nan"), float("nan")
    lo, hi = np.percentile(aps, [2.5, 97.5])
    return float(lo), float(hi)


def flag_scores(filepaths: pd.Series, flagged: np.ndarray, audit: pd.DataFrame) -> dict:
    truth = truth_of(filepaths, audit)
    keep = truth.notna().to_numpy()
    y = truth.to_numpy()[keep].astype(int)
    f = np.asarray(flagged, dtype=bool)[keep]
    tp = int((f & (y == 1)).sum())
    return {
        "flagged": int(f.sum()),
        "flagged_ignored_rows": int(np.asarray(flagged, dtype=bool)[~keep].sum()),
        "precision": tp / f.sum() if f.sum() else float("nan"),
        "recall": tp / y.sum() if y.sum() else float("nan"),
    }


def evaluate(manifest: pd.DataFrame, column: str = "label_quality", audit: pd.DataFrame | None = None) -> dict:
    """Every figure the benchmark prints, as a dict."""
    audit = load_audit() if audit is None else audit
    fp = manifest["filepath"].astype(str)
    out: dict = {"column": column, "overall": ranking_scores(fp, manifest[column].to_numpy(float), audit)}
    out["overall"]["ap_95"] = ap_interval(fp, manifest[column].to_numpy(float), audit)
    out["components"] = {c: ranking_scores(fp, manifest[c].to_numpy(float), audit)["ap"]
                         for c in manifest.columns if c.startswith("q_")}
    out["per_class"] = {}
    for label, part in manifest.groupby("label"):
        out["per_class"][label] = ranking_scores(part["filepath"].astype(str), part[column].to_numpy(float), audit)
    if "flags" in manifest.columns:
        flags = manifest["flags"].fillna("").astype(str).str.split(";")
        off = flags.map(lambda fs: "off_class" in fs).to_numpy()
        either = flags.map(lambda fs: "off_class" in fs or "outlier" in fs).to_numpy()
        out["flag_off_class"] = flag_scores(fp, off, audit)
        out["flag_off_class_or_outlier"] = flag_scores(fp, either, audit)
    return out


def print_report(res: dict) -> None:
    o = res["overall"]
    print(f"machine: {platform.node()} {platform.machine()} ({platform.processor() or 'cpu'})")
    lo, hi = o.get("ap_95", (float("nan"), float("nan")))
    print(f"column {res['column']}: AP {o['ap']:.3f} [95% {lo:.3f}-{hi:.3f}] "
          f"(base rate {o.get('base_rate', float('nan')):.3f}, {o['positives']} positives / {o['n']} scored), "
          f"recall@2P {o['recall_at_2p']:.3f}")
    if "recall_at_precision" in o:
        print(f"best flag by this ranking: recall {o['recall_at_precision']:.3f} at precision >= {TARGET_PRECISION} "
              f"(top {o['top_n_at_precision']} audited photos); precision {o['precision_at_recall']:.3f} at recall "
              f"{TARGET_RECALL} (top {o['top_n_at_recall']})")
    for name in ("flag_off_class", "flag_off_class_or_outlier"):
        if name in res:
            f = res[name]
            print(f"{name}: {f['flagged']} flagged (+{f['flagged_ignored_rows']} on ignored rows), "
                  f"precision {f['precision']:.3f}, recall {f['recall']:.3f}")
    for c, ap in res["components"].items():
        print(f"  {c:<16} AP {ap:.3f}")
    for label, r in res["per_class"].items():
        print(f"  class {label:<12} AP {r['ap']:.3f}  recall@2P {r['recall_at_2p']:.3f}  ({r['positives']} pos)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", nargs="?", default="reports/flower_photos", help="run folder or manifest CSV")
    ap.add_argument("--column", default="label_quality", help="score column, low = suspicious")
    ap.add_argument("--audit", default=str(AUDIT))
    ap.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    target = Path(args.target)
    path = target / "manifest.csv" if target.is_dir() else target
    manifest = pd.read_csv(path, dtype={"filepath": str, "label": str, "flags": str}, keep_default_na=False,
                           na_values=[""])
    if args.column not in manifest.columns:
        sys.exit(f"{path}: no column {args.column!r}")
    res = evaluate(manifest, args.column, load_audit(args.audit))
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
