"""Rescore a finished `curate flag` run with each component alone and in combinations (benchmark only).

Usage:
    .venv/bin/python bench/flag_ablation.py RUN_DIR [--audit CSV]

Reads the run's saved arrays (oof_<model>.npy, embeddings.npy, the cached fold predictions and, for the
grouped K-fold ViT, the all-data model's embeddings in cache/vit_all_*.npz) plus the cheap features, so
no model is trained again. Prints the AP against the hand audit of every component and combination, so
the defaults in curate.labels.FlagConfig can be chosen from measurements. Takes about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flag_eval import AUDIT, load_audit, ranking_scores  # noqa: E402

from curate import embed  # noqa: E402
from curate import labels as L  # noqa: E402
from curate.io import data_root_of, read_manifest  # noqa: E402
from curate.scene import SCENE_COMPONENTS, detected, scene_quality  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder after `curate flag` (full mode)")
    ap.add_argument("--audit", default=str(AUDIT))
    args = ap.parse_args(argv)
    run = Path(args.run)
    audit = load_audit(args.audit)
    df = read_manifest(run / "manifest.csv")
    ok = (df["error"] == "").to_numpy()
    good = df[ok].reset_index(drop=True)
    classes = embed.class_names(good["label"])
    y = good["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    n_cls = len(classes)
    fp = good["filepath"]

    def ap_of(q: np.ndarray) -> float:
        return ranking_scores(fp, q, audit)["ap"]

    cfg = L.FlagConfig()
    oof_files = sorted(run.glob("oof_*.npy"))
    probs = np.load(oof_files[0])[ok] if oof_files else None
    emb = np.load(run / "embeddings.npy")[ok]
    common_files = glob.glob(str(run / "cache" / "vit_all_*.npz"))
    common = np.load(common_files[0])["emb"] if common_files else None
    groups = embed.visual_groups(common, y, cfg.group_size, cfg.seed) if common is not None else None
    fold = embed.fold_assignment(y, cfg.folds, cfg.seed, groups) if probs is not None else None
    images = embed.load_images(run, data_root_of(run), fp.tolist(), cfg.image_size)
    feats = embed.cheap_features(images)

    comps: dict[str, np.ndarray] = {}
    if probs is not None:
        print(f"out-of-fold accuracy: {(probs.argmax(1) == y).mean():.3f}")
        comps["vit_cleanlab"], _ = L.cleanlab_quality(y, probs)
        p = L._safe_probs(probs)
        comps["vit_maxprob"] = p.max(1)  # low = unlike every class
        comps["vit_margin"] = p[np.arange(len(y)), y] - np.where(
            np.arange(n_cls) == y[:, None], -1, p).max(1)
        s = L.score(emb, y, n_cls, {"vit": probs}, cfg, space=fold)
        comps["vit_knn_perfold"] = s["q_knn"]
        comps["vit_cluster_perfold"] = s["q_cluster"]
    if common is not None:
        comps["common_cluster"], _, _ = L.cluster_quality(common, y, n_cls, cfg.cluster_size, cfg.seed)
        comps["common_knn"] = L.knn_quality(common, y, n_cls, cfg.knn_k)
    comps["features_cluster"], _, _ = L.cluster_quality(feats, y, n_cls, cfg.cluster_size, cfg.seed)
    comps["features_knn"] = L.knn_quality(feats, y, n_cls, cfg.knn_k)
    scene_cols = [c for c in SCENE_COMPONENTS if c in good.columns and good[c].notna().all()]
    for col in scene_cols:  # the scene measures' components, as the run measured them
        comps[col] = good[col].to_numpy(dtype=float)

    print(f"machine: {platform.node()} ({platform.machine()}), {len(y)} photos, base rate "
          f"{ranking_scores(fp, comps['features_knn'], audit)['base_rate']:.3f}")
    for name, q in comps.items():
        print(f"  {name:<22} AP {ap_of(q):.3f}")
    names = list(comps)
    results = []
    for r in (2, 3):
        for combo in itertools.combinations(names, r):
            q = L.combine({n: comps[n] for n in combo}, {n: 1.0 for n in combo})
            results.append((ap_of(q), combo))
    print("best equal-weight combinations:")
    for a, combo in sorted(results, reverse=True)[:10]:
        print(f"  AP {a:.3f}  {' + '.join(combo)}")
    if scene_cols and probs is not None:
        # the shipped recipe: the model components equally, each scene measure half as much as all of them
        model = {n: comps[n] for n in ("vit_cleanlab", "vit_knn_perfold", "vit_cluster_perfold", "vit_maxprob",
                                       "features_cluster")}
        both = model | {n: comps[n] for n in scene_cols}
        print("own score (before look-alikes): model components (weight 1 each) and scene measures, by each "
              "scene measure's weight as a share of the model components' total:")
        for share in (0.0, 0.25, 0.5, 0.75, 1.0):
            w = {n: 1.0 for n in model} | {n: share * len(model) for n in scene_cols}
            print(f"  share {share:.2f}: AP {ap_of(L.combine(both, w)):.3f}")
        # as FlagConfig.weights (the person detectors weigh 1.4 times as much as the other scene measures)
        shipped = {n: cfg.weights[AS_COLUMN[n]] for n in model} | {n: cfg.weights[n] for n in scene_cols}
        for left_out in scene_cols:
            w = {n: v for n, v in shipped.items() if n != left_out}
            print(f"  share 0.50 without {left_out}: AP {ap_of(L.combine(both, w)):.3f}")
        # label_quality = (1 - share) x own score + share x mean own score of k same-folder look-alikes
        own = L.combine(both, shipped)

        def final(own_score: np.ndarray) -> float:
            return ap_of(L.with_lookalikes(own_score, feats, y, cfg)[0])

        print(f"label_quality as shipped: AP {final(own):.3f}")
        people = [n for n in ("q_face", "q_body") if n in scene_cols]
        if people:
            print("the person detectors (q_face, q_body): their weight, and the score they count from")
            for w in (2.5, 3.5, 5.0):
                print(f"  weight {w}: AP {final(L.combine(both, shipped | {n: w for n in people})):.3f}")
            for threshold in (0.5, 0.6, 0.7, 0.8):
                scored = scene_quality(good, y, person_threshold=threshold)
                print(f"  from {threshold}: AP {final(L.combine(both | {n: scored[n] for n in people}, shipped)):.3f}")
        spaces = {"cheap features": feats, "ViT fold embeddings": None}
        print("the shipped own score blended with its look-alikes' (share 0 = own score alone):")
        for space, e in spaces.items():
            for k in (3, 5, 10):
                if e is None:  # the K-fold ViT's embeddings are comparable only within a fold
                    look = np.zeros(len(y))
                    for f in np.unique(fold):
                        rows = np.flatnonzero(fold == f)
                        look[rows] = L.lookalike_quality(emb[rows], y[rows], own[rows], k)
                else:
                    look = L.lookalike_quality(e, y, own, k)
                aps = "  ".join(f"{share:.2f}: {ap_of((1 - share) * own + share * look):.3f}"
                                for share in (0.0, 0.25, 0.5, 0.75, 1.0))
                print(f"  {space:<20} k={k:<3} share {aps}")
        if "face_score" in good.columns:
            shipped_quality = L.with_lookalikes(own, feats, y, cfg)[0]
            print("a confident face ranks the photo first (FlagConfig.sure_face), from face_score:")
            for t in (None, 0.75, 0.8, 0.85, 0.9):
                q = shipped_quality if t is None else L.sure_first(shipped_quality, detected(good["face_score"], t))
                print(f"  {'off' if t is None else t}: AP {ap_of(q):.3f}")
        first = first_pass_folds(run, good, y, fold, cfg)
        if first is not None and not np.allclose(first[0], probs):  # the run was flagged with --retrain
            # FlagConfig.retrain_pruned: the run's oof/embeddings come from the folds retrained without the
            # first pass's most suspicious photos; the first pass's folds are still in the cache
            extra = {n: comps[n] for n in ("features_cluster", *scene_cols)}
            extra["q_features"] = extra.pop("features_cluster")
            certainty = detected(good["face_score"], cfg.sure_face) if "face_score" in good.columns else None
            print("the K-fold ViT as first trained, and retrained without that pass's most suspicious photos "
                  "(label_quality AP, by the weight of q_cleanlab, q_knn and q_cluster):")
            for name, (p, e) in {"first pass": first, "retrained": (probs, emb)}.items():
                aps = []
                for w in (1.0, 1.5, 2.0, 3.0):
                    wcfg = dataclasses.replace(cfg, weights=cfg.weights | dict.fromkeys(
                        ("q_cleanlab", "q_knn", "q_cluster"), w))
                    s = L.score(e, y, n_cls, {"vit": p}, wcfg, space=fold, extra=extra, lookalike_space=feats,
                                certainty=certainty)
                    aps.append(f"{w}: {ap_of(s['label_quality']):.3f}")
                alone = L.score(e, y, n_cls, {"vit": p}, cfg, space=fold)
                print(f"  {name:<11} {'  '.join(aps)}   alone: "
                      + "  ".join(f"{c} {ap_of(alone[c]):.3f}" for c in ("q_cleanlab", "q_knn", "q_cluster")))
    return 0


# the ablation's names of the K-fold ViT's components, as FlagConfig.weights calls them
AS_COLUMN = {"vit_cleanlab": "q_cleanlab", "vit_knn_perfold": "q_knn", "vit_cluster_perfold": "q_cluster",
             "vit_maxprob": "q_confidence", "features_cluster": "q_features"}


def first_pass_folds(run: Path, good, y: np.ndarray, fold: np.ndarray,
                     cfg: L.FlagConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """(out-of-fold probabilities, embeddings) of the K-fold ViT's first pass, from the run's cache, or None
    when the cache does not hold all its folds (a run flagged without --retrain has them in oof_vit.npy)."""
    from train.presets import FLAG

    paths = embed.fold_cache_files(run, good["filepath"].astype(str).tolist(), y, cfg.vit or FLAG, cfg, fold)
    if not all(p.exists() for p in paths):
        return None  # vit_kfold would train the missing folds: minutes, not this benchmark's job
    rep = embed.vit_kfold(run, data_root_of(run), good, embed.class_names(good["label"]), cfg, recipe=cfg.vit)
    return rep.oof_probs, rep.embeddings


if __name__ == "__main__":
    sys.exit(main())
