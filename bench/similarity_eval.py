"""What the App's "sort by similarity" finds once a person has seen one off-class photo (benchmark only).

Usage:
    .venv/bin/python bench/similarity_eval.py RUN_DIR [--verdict other_species] [--audit CSV] [--trials 30]

Simulates a reviewer who spots one photo of a kind (by default another species: a gerbera in daisy/) and sorts
that folder by similarity to it in the FiftyOne App: the run's embeddings_pretrained.npy, centred on the run's
mean, cosine, as FiftyOne's sklearn similarity index computes it. For each folder with at least 5 audited
`positive` photos of that verdict, it picks one of them at random (`--trials` times; with `--selected 3`, three,
whose similarities are averaged) and counts how many of the folder's first 20 and 50 other photos the audit
gives that verdict (positive or ignored rows: a doubtful gerbera is still one to look at), against the folder's
first 20 and 50 by label_quality. Prints the machine too.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flag_eval import AUDIT, load_audit  # noqa: E402

from curate.io import read_manifest  # noqa: E402
from curate.labels import l2_normalise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder after `curate flag` with the pretrained network")
    ap.add_argument("--verdict", default="other_species")
    ap.add_argument("--selected", type=int, default=1, help="photos the reviewer selects before sorting")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--audit", default=str(AUDIT))
    args = ap.parse_args(argv)
    run = Path(args.run)
    m = read_manifest(run / "manifest.csv")
    readable = m["label_quality"].notna().to_numpy()
    emb = np.load(run / "embeddings_pretrained.npy")
    if len(emb) != len(m):
        sys.exit(f"{run}: embeddings_pretrained.npy has {len(emb)} rows, manifest.csv {len(m)}")
    m, emb = m[readable].reset_index(drop=True), emb[readable]
    z = l2_normalise(emb - emb.mean(axis=0))
    audit = load_audit(args.audit).set_index("filepath")
    verdict = m["filepath"].map(audit["verdict"]).fillna("").to_numpy()
    role = m["filepath"].map(audit["role"]).fillna("").to_numpy()
    quality = m["label_quality"].to_numpy(float)
    rng = np.random.default_rng(0)
    print(f"machine: {platform.node()} {platform.machine()}; run {run}; verdict {args.verdict!r}; "
          f"{args.selected} selected, {args.trials} trials")
    for label in sorted(m["label"].unique()):
        members = np.flatnonzero(m["label"].to_numpy() == label)
        kind = members[verdict[members] == args.verdict]
        sure = kind[role[kind] == "positive"]
        if len(sure) < max(5, args.selected):
            continue
        found = {"similar": {20: [], 50: []}, "label_quality": {20: [], 50: []}}
        for _ in range(args.trials):
            chosen = rng.choice(sure, args.selected, replace=False)
            rest = np.setdiff1d(members, chosen)
            is_kind = np.isin(rest, kind)
            by_similarity = np.argsort(-(z[rest] @ z[chosen].T).mean(axis=1), kind="stable")
            by_quality = np.argsort(quality[rest], kind="stable")
            for depth in (20, 50):
                found["similar"][depth].append(is_kind[by_similarity[:depth]].sum())
                found["label_quality"][depth].append(is_kind[by_quality[:depth]].sum())
        print(f"{label:<12} {len(kind):3d} {args.verdict} ({len(sure)} positive): sorted by similarity "
              f"{np.mean(found['similar'][20]):.1f} of the first 20, {np.mean(found['similar'][50]):.1f} of 50 | "
              f"by label_quality {np.mean(found['label_quality'][20]):.1f}, {np.mean(found['label_quality'][50]):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
