"""`curate export`: apply a named cleaning policy to the manifest -> cleaned.csv and removed.csv.

A policy is a small function `(RunTables) -> DataFrame[action, reason, new_label]`, one row per
manifest row, where `action` is "keep", "drop" or "relabel". Policies live in `POLICIES`, and
their docstrings are what `curate export --policy list` prints. After the policy, review tags
from the FiftyOne App (`reject`, `keep`, `relabel:<class>`) override its decision per photo.

cleaned.csv has `filepath,label,split` (plus any manifest columns asked for); `split` is the
deterministic stratified split of the whole raw manifest (see `raw_split`), so the raw and
the cleaned trainings share their test photos. removed.csv has `filepath,label,reason` (plus
`split`), one reason per photo: the first rule that removed it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from curate.duplicates import KEEP_ORDER, keep_preference
from curate.io import (
    LOW_QUALITY_FLAGS,
    UNREADABLE_FLAGS,
    CurateError,
    atomic_write_csv,
    flags_of,
    read_manifest,
    resolve_run_dir,
    run_lock,
)

log = logging.getLogger("curate.export")

# Reasons in the order the default policy applies them; removed.csv names the first that fired.
REASONS = ("review_reject", "unreadable", "cross_label_duplicate", "exact_duplicate", "near_duplicate",
           "off_class", "outlier", "low_quality")
DEFAULT_SPLIT_SEED = 0
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class RelabelConfig:
    """When a suggestion is confident enough to relabel instead of drop."""

    # Mean out-of-fold probability of the suggested class across models; 0.7 keeps to the cases
    # where the models agree clearly, so a coherent off-class group (no true class) stays dropped.
    min_probability: float = 0.7


@dataclass
class RunTables:
    """What a policy may look at: the manifest and, per row, its duplicate-group facts."""

    manifest: pd.DataFrame  # the run's manifest.csv (scan + flag columns), index 0..N-1
    dup_kind: pd.Series  # "exact", "near" or "" per row
    dup_keep: pd.Series  # True where the row is its duplicate group's `keep` member (or in no group)
    dup_cross_label: pd.Series  # True where the row's duplicate group has members with different labels
    suggested_probability: pd.Series  # mean OOF probability of `suggested_label` (NaN when unknown)

    def has_flag(self, *names: str) -> pd.Series:
        wanted = set(names)
        return self.manifest["flags"].map(lambda cell: bool(wanted.intersection(flags_of(cell))))


def _decisions(tables: RunTables) -> pd.DataFrame:
    n = len(tables.manifest)
    return pd.DataFrame({"action": ["keep"] * n, "reason": [""] * n, "new_label": [""] * n},
                        index=tables.manifest.index)


def _drop(decisions: pd.DataFrame, mask: pd.Series, reason: str) -> None:
    """Drop the rows in `mask` for `reason`, unless an earlier rule already decided them."""
    todo = mask & (decisions["action"] == "keep") & (decisions["reason"] == "")
    decisions.loc[todo, "action"] = "drop"
    decisions.loc[todo, "reason"] = reason


def _unreadable(tables: RunTables) -> pd.Series:
    error = tables.manifest.get("error", pd.Series("", index=tables.manifest.index)).fillna("").astype(str)
    return (error.str.strip() != "") | tables.has_flag(*UNREADABLE_FLAGS)


def _structural_rules(tables: RunTables) -> pd.DataFrame:
    """Unreadable files and duplicates: the rules every policy shares."""
    d = _decisions(tables)
    _drop(d, _unreadable(tables), "unreadable")
    _drop(d, tables.dup_cross_label, "cross_label_duplicate")
    extra = ~tables.dup_keep
    _drop(d, extra & (tables.dup_kind == "exact"), "exact_duplicate")
    _drop(d, extra & (tables.dup_kind != "exact"), "near_duplicate")
    return d


def policy_default(tables: RunTables) -> pd.DataFrame:
    """Drop unreadable files; keep one photo per exact/near duplicate group (its `keep`); drop every
    member of a cross-label duplicate group; drop `off_class` photos. Low-quality photos stay (the
    report lists them)."""
    d = _structural_rules(tables)
    _drop(d, tables.has_flag("off_class"), "off_class")
    return d


def policy_relabel(tables: RunTables, config: RelabelConfig = RelabelConfig()) -> pd.DataFrame:
    """As `default`, but an `off_class` photo whose `suggested_label` is confident (mean out-of-fold
    probability >= 0.7) is moved to that class instead of dropped."""
    d = _structural_rules(tables)
    m = tables.manifest
    suggested = m.get("suggested_label", pd.Series("", index=m.index)).fillna("").astype(str)
    classes = set(m["label"])
    confident = (tables.suggested_probability >= config.min_probability) & suggested.isin(classes) & (
        suggested != m["label"])
    off_class = tables.has_flag("off_class")
    todo = off_class & confident & (d["action"] == "keep")
    d.loc[todo, "action"] = "relabel"
    d.loc[todo, "reason"] = "relabel"
    d.loc[todo, "new_label"] = suggested[todo]
    _drop(d, off_class, "off_class")
    return d


def policy_strict(tables: RunTables) -> pd.DataFrame:
    """As `default`, and also drop `outlier` photos and every low-quality photo (blurry, dark,
    bright, low_information, tiny, odd_aspect_ratio, grayscale)."""
    d = policy_default(tables)
    _drop(d, tables.has_flag("outlier"), "outlier")
    _drop(d, tables.has_flag(*LOW_QUALITY_FLAGS), "low_quality")
    return d


def policy_duplicates_only(tables: RunTables) -> pd.DataFrame:
    """Only the structural rules: drop unreadable files and duplicates (as `default`), keep every
    flagged photo. Shows what de-duplication alone buys."""
    return _structural_rules(tables)


PolicyFn = Callable[[RunTables], pd.DataFrame]
POLICIES: dict[str, PolicyFn] = {
    "default": policy_default,
    "relabel": policy_relabel,
    "strict": policy_strict,
    "duplicates-only": policy_duplicates_only,
}


def describe_policies() -> str:
    """One paragraph per policy: its name and docstring (what `--policy list` prints)."""
    out = []
    for name, fn in POLICIES.items():
        doc = " ".join((fn.__doc__ or "").split())
        out.append(f"{name}\n    {doc}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Inputs


def _truthy(values: pd.Series) -> pd.Series:
    return values.astype(str).str.strip().str.lower().isin({"true", "1", "yes", "y", "keep"})


def _normalise_kind(kind: str) -> str:
    kind = str(kind or "").strip().lower()
    return "exact" if kind.startswith("exact") else "near" if kind else ""


def duplicate_facts(manifest: pd.DataFrame, duplicates: pd.DataFrame | None) -> pd.DataFrame:
    """Per manifest row: `dup_kind` ("exact"/"near"/""), `dup_keep`, `dup_cross_label`.

    `duplicates` is duplicates.csv (dup_group, kind, filepath, label, distance, keep). Without it
    the manifest's `dup_group` column is used, keeping the copy scan keeps (`duplicates.keep_preference`:
    colour, then pixels, then the first path). A group with no `keep` marked keeps its first member, so
    no group disappears entirely.
    """
    facts = pd.DataFrame({"dup_kind": "", "dup_keep": True, "dup_cross_label": False}, index=manifest.index)
    if duplicates is not None and len(duplicates):
        dup = pd.DataFrame({
            "filepath": duplicates["filepath"].astype(str),
            "group": duplicates["dup_group"].astype(str),
            "kind": duplicates["kind"].map(_normalise_kind) if "kind" in duplicates else "near",
            "keep": _truthy(duplicates["keep"]) if "keep" in duplicates else False,
        })
        # The manifest's label wins: a relabelled copy of the manifest must not resurrect old labels.
        dup["label"] = dup["filepath"].map(manifest.set_index("filepath")["label"])
        if "label" in duplicates:
            dup["label"] = dup["label"].fillna(duplicates["label"].astype(str))
    elif "dup_group" in manifest.columns and (manifest["dup_group"].fillna("").astype(str) != "").any():
        grouped = manifest[manifest["dup_group"].fillna("").astype(str) != ""]
        dup = pd.DataFrame({
            "filepath": grouped["filepath"].astype(str),
            "group": grouped["dup_group"].astype(str),
            "kind": grouped["flags"].map(lambda c: "exact" if "exact_duplicate" in flags_of(c) else "near"),
            "label": grouped["label"],
        }).join(keep_preference(grouped))
        dup = dup.sort_values(["group", *KEEP_ORDER, "filepath"], ascending=[True, False, False, True])
        dup["keep"] = ~dup.duplicated("group")
    else:
        return facts
    has_keep = dup.groupby("group")["keep"].transform("any")
    dup["keep"] = dup["keep"] | (~has_keep & ~dup.duplicated("group"))
    dup["cross"] = dup.groupby("group")["label"].transform("nunique") > 1
    dup = dup.drop_duplicates("filepath").set_index("filepath")
    fp = manifest["filepath"].astype(str)
    in_dup = fp.isin(dup.index)
    facts.loc[in_dup, "dup_kind"] = fp[in_dup].map(dup["kind"]).to_numpy()
    facts.loc[in_dup, "dup_keep"] = fp[in_dup].map(dup["keep"]).astype(bool).to_numpy()
    facts.loc[in_dup, "dup_cross_label"] = fp[in_dup].map(dup["cross"]).astype(bool).to_numpy()
    return facts


def suggested_probability(run_dir: Path, manifest: pd.DataFrame) -> pd.Series:
    """Mean out-of-fold probability of each row's `suggested_label`, over every `oof_<model>.npy`.

    The OOF arrays have one row per manifest row (manifest order) and one column per class
    (sorted class names). Arrays of another shape are skipped with a warning; NaN when none fit.
    """
    out = pd.Series(np.nan, index=manifest.index)
    if "suggested_label" not in manifest.columns:
        return out
    classes = sorted(set(manifest["label"].astype(str)))
    probs = []
    for path in sorted(run_dir.glob("oof_*.npy")):
        try:
            arr = np.load(path)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); not used for relabel confidence", path, exc)
            continue
        if arr.shape != (len(manifest), len(classes)):
            log.warning("%s: shape %s does not match the manifest (%d rows x %d classes); not used",
                        path, arr.shape, len(manifest), len(classes))
            continue
        probs.append(arr.astype(float))
    if not probs:
        return out
    mean = np.mean(probs, axis=0)
    col = {c: i for i, c in enumerate(classes)}
    idx = manifest["suggested_label"].map(lambda s: col.get(str(s), -1)).to_numpy()
    ok = idx >= 0
    values = np.full(len(manifest), np.nan)
    values[ok] = mean[np.flatnonzero(ok), idx[ok]]
    return pd.Series(values, index=manifest.index)


def raw_split(manifest: pd.DataFrame) -> pd.Series:
    """The split of the whole raw manifest that cleaned.csv and `curate compare` share: train.data's
    stratified 80/10/10 assignment, duplicate groups kept together."""
    from train.data import assign_splits

    return assign_splits(manifest, seed=DEFAULT_SPLIT_SEED, fractions=DEFAULT_SPLIT_FRACTIONS)["split"]


def read_review_tags(run_dir: Path) -> pd.DataFrame:
    """Review decisions (filepath, decision, relabel_to) from the run's FiftyOne dataset, if any.

    The bridge imports FiftyOne (seconds, and a database start) only when `curate app` has built a
    dataset for this run (`<run>/fiftyone.json`), so an export without review stays fast.
    """
    from curate import fiftyone_bridge

    tags = fiftyone_bridge.read_review_tags(run_dir)
    if tags is None or tags.empty:
        return pd.DataFrame({"filepath": [], "decision": [], "relabel_to": []})
    return tags


def apply_review_tags(decisions: pd.DataFrame, manifest: pd.DataFrame, tags: pd.DataFrame) -> pd.DataFrame:
    """Let the reviewer's tags override the policy: reject drops, keep keeps, relabel moves.

    `keep` and `relabel` cannot resurrect an unreadable file (nothing could train on it); it says so.
    """
    d = decisions.copy()
    if tags is None or tags.empty:
        return d
    row_of = pd.Series(manifest.index, index=manifest["filepath"].astype(str))
    classes = set(manifest["label"].astype(str))
    for rec in tags.itertuples(index=False):
        fp = str(rec.filepath)
        if fp not in row_of.index:
            log.warning("review tag for %s: not in the manifest; ignored", fp)
            continue
        i = row_of[fp]
        decision = str(rec.decision).strip().lower()
        if decision == "reject":
            d.loc[i, ["action", "reason", "new_label"]] = ["drop", "review_reject", ""]
        elif decision == "keep":
            if d.loc[i, "reason"] == "unreadable":
                log.warning("review tag keep for %s: the file is unreadable; it stays removed", fp)
                continue
            d.loc[i, ["action", "reason", "new_label"]] = ["keep", "review_keep", ""]
        elif decision == "relabel":
            new = str(getattr(rec, "relabel_to", "") or "").strip()
            if not new or new == "nan":
                log.warning("review tag relabel for %s names no class; ignored", fp)
                continue
            if d.loc[i, "reason"] == "unreadable":
                log.warning("review tag relabel for %s: the file is unreadable; it stays removed", fp)
                continue
            if new not in classes:
                log.warning("review tag relabel for %s: %r is a new class", fp, new)
            d.loc[i, ["action", "reason", "new_label"]] = ["relabel", "review_relabel", new]
        else:
            log.warning("review tag %r for %s: unknown decision; ignored", decision, fp)
    return d


def load_tables(run_dir: Path) -> RunTables:
    """Read the manifest, duplicates.csv and OOF arrays of a run into what policies look at."""
    manifest = read_manifest(run_dir / "manifest.csv").reset_index(drop=True)
    if "flags" not in manifest.columns:
        manifest["flags"] = ""
    dup_path = run_dir / "duplicates.csv"
    duplicates = None
    if dup_path.exists():
        duplicates = pd.read_csv(dup_path, dtype={"dup_group": str, "filepath": str, "label": str, "keep": str},
                                 keep_default_na=False)
    facts = duplicate_facts(manifest, duplicates)
    return RunTables(manifest=manifest, dup_kind=facts["dup_kind"], dup_keep=facts["dup_keep"].astype(bool),
                     dup_cross_label=facts["dup_cross_label"].astype(bool),
                     suggested_probability=suggested_probability(run_dir, manifest))


@dataclass
class ExportResult:
    cleaned: pd.DataFrame
    removed: pd.DataFrame
    summary: dict


def build_cleaned(tables: RunTables, policy: str = "default", tags: pd.DataFrame | None = None,
                  columns: Sequence[str] = ()) -> ExportResult:
    """Apply `policy` and the review `tags` to the run's tables; return cleaned/removed frames.

    Pure: reads and writes nothing, so tests and `compare` can call it directly.
    """
    if policy not in POLICIES:
        raise CurateError(f"unknown policy {policy!r}; choose one of: {', '.join(POLICIES)} (`--policy list`)")
    m = tables.manifest
    missing = [c for c in columns if c not in m.columns]
    if missing:
        raise CurateError(f"column(s) {', '.join(missing)} not in the manifest; available: {', '.join(m.columns)}")
    decisions = POLICIES[policy](tables)
    decisions = apply_review_tags(decisions, m, tags if tags is not None else pd.DataFrame())
    split = m["split"] if "split" in m.columns and m["split"].notna().all() else raw_split(m)

    kept = decisions["action"] != "drop"
    relabel = decisions["action"] == "relabel"
    cleaned = pd.DataFrame({"filepath": m["filepath"], "label": m["label"], "split": split})
    cleaned.loc[relabel, "label"] = decisions.loc[relabel, "new_label"]
    extra = [c for c in columns if c not in cleaned.columns]
    cleaned = pd.concat([cleaned, m[extra]], axis=1)[kept].reset_index(drop=True)
    removed = pd.DataFrame({"filepath": m["filepath"], "label": m["label"], "reason": decisions["reason"],
                            "split": split})[~kept].reset_index(drop=True)

    reasons = removed["reason"].value_counts()
    reason_names = [*REASONS, *sorted(set(reasons.index) - set(REASONS))]
    low_quality = tables.has_flag(*LOW_QUALITY_FLAGS)
    summary = {
        "policy": policy,
        "photos": int(len(m)),
        "kept": int(len(cleaned)),
        "removed": int(len(removed)),
        "relabelled": int(relabel.sum()),
        "removed_by_reason": {r: int(reasons.get(r, 0)) for r in reason_names},
        "relabelled_to": {str(k): int(v) for k, v in decisions.loc[relabel, "new_label"].value_counts().items()},
        "review_overrides": {k: int((decisions["reason"] == k).sum()) for k in ("review_reject", "review_keep",
                                                                                 "review_relabel")},
        "low_quality_kept": int((low_quality & kept).sum()),
        "classes_before": {str(k): int(v) for k, v in m["label"].value_counts().sort_index().items()},
        "classes_after": {str(k): int(v) for k, v in cleaned["label"].value_counts().sort_index().items()},
        "split_after": {str(k): int(v) for k, v in cleaned["split"].value_counts().sort_index().items()},
    }
    return ExportResult(cleaned=cleaned, removed=removed, summary=summary)


def export(run: str | os.PathLike | None = None, policy: str = "default", out: str | os.PathLike | None = None,
           columns: Sequence[str] = (), tags: pd.DataFrame | None = None) -> ExportResult | None:
    """Write `<run>/cleaned.csv` (or `out`), `<run>/removed.csv` and `<run>/export.json`.

    `policy="list"` prints the named policies and writes nothing. `columns` adds manifest
    columns to cleaned.csv. `tags` (filepath, decision, relabel_to) replaces the review tags
    otherwise read from the run's FiftyOne dataset.
    """
    if policy == "list":
        print(describe_policies())
        return None
    from curate.io import atomic_write_json

    run_dir = resolve_run_dir(run)
    with run_lock(run_dir, "export"):
        tables = load_tables(run_dir)
        if tags is None:
            tags = read_review_tags(run_dir)
        result = build_cleaned(tables, policy=policy, tags=tags, columns=columns)
        cleaned_path = Path(out) if out else run_dir / "cleaned.csv"
        atomic_write_csv(cleaned_path, result.cleaned)
        atomic_write_csv(run_dir / "removed.csv", result.removed)
        result.summary["cleaned_csv"] = str(cleaned_path)
        result.summary["review_tags"] = int(len(tags))
        atomic_write_json(run_dir / "export.json", result.summary)
    s = result.summary
    by_reason = ", ".join(f"{k} {v}" for k, v in s["removed_by_reason"].items() if v)
    log.info("export (%s): kept %d of %d photos, removed %d (%s), relabelled %d; %d low-quality photo(s) kept -> %s",
             policy, s["kept"], s["photos"], s["removed"], by_reason or "none", s["relabelled"],
             s["low_quality_kept"], cleaned_path)
    return result
