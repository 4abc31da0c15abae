"""Property-based tests (hypothesis): duplicate grouping (curate/duplicates.py) and export policies (curate/export.py).

Duplicates: the groups are exactly the connected components of "same sha256 or pHash within d bits" among readable
rows (so every exact duplicate is found and grouping is transitive), whatever the row order, with one `keep` each.
Export: under every policy, with or without review tags, no photo is both kept and removed, every photo is one of
the two, and the summary's counts add up.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.duplicates import find_duplicates
from curate.export import POLICIES, REASONS, RunTables, build_cleaned, duplicate_facts
from curate.io import flags_of

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ duplicate grouping


@st.composite
def scan_rows(draw) -> tuple[pd.DataFrame, int]:
    """A manifest-like table whose hashes collide often: few contents (sha), pHashes near a few bases."""
    n = draw(st.integers(0, 24))
    bases = draw(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=3))
    contents = {}  # sha -> (phash, mode): byte-identical files have the same pHash and mode
    rows = []
    for i in range(n):
        sha = f"s{draw(st.integers(0, 7))}"
        if sha not in contents:
            flips = draw(st.lists(st.integers(0, 63), max_size=6))
            h = draw(st.sampled_from(bases))
            for b in flips:
                h ^= 1 << b
            contents[sha] = (f"{h:016x}", draw(st.sampled_from(["RGB", "RGB", "P", "L"])))
        unreadable = draw(st.integers(0, 9)) == 0
        phash, mode = contents[sha]
        rows.append({"filepath": f"{draw(st.sampled_from('abc'))}/{i:02d}.jpg", "label": "", "sha256": sha,
                     "phash": "" if unreadable else phash,
                     "width": draw(st.integers(1, 4)) * 100, "height": 100,
                     "error": "cannot decode" if unreadable else "", "mode": mode,
                     "flags": "tiny;grayscale" if mode == "L" else ""})
    df = pd.DataFrame(rows, columns=["filepath", "label", "sha256", "phash", "width", "height", "error", "mode",
                                     "flags"])
    df["label"] = df["filepath"].str[0]
    return df, draw(st.integers(0, 10))


def _components(df: pd.DataFrame, d: int) -> set[frozenset[str]]:
    """Groups by brute force: all pairs, then connected components (only groups of 2 or more)."""
    ok = df[(df["error"] == "") & (df["phash"] != "")].reset_index(drop=True)
    parent = list(range(len(ok)))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(len(ok)):
        for j in range(i + 1, len(ok)):
            dist = bin(int(ok.at[i, "phash"], 16) ^ int(ok.at[j, "phash"], 16)).count("1")
            if ok.at[i, "sha256"] == ok.at[j, "sha256"] or dist <= d:
                parent[find(i)] = find(j)
    comps: dict[int, set[str]] = {}
    for i in range(len(ok)):
        comps.setdefault(find(i), set()).add(ok.at[i, "filepath"])
    return {frozenset(c) for c in comps.values() if len(c) > 1}


def _groups(df: pd.DataFrame, dup_group: pd.Series) -> set[frozenset[str]]:
    g = pd.Series(dup_group.to_numpy(), index=df["filepath"].to_numpy())
    return {frozenset(members.index) for gid, members in g.groupby(g) if gid != ""}


@SETTINGS
@given(scan_rows())
def test_duplicate_groups_are_the_connected_components_of_close_pairs(case):
    df, d = case
    dup_group, dups, flags = find_duplicates(df, d)
    assert _groups(df, dup_group) == _components(df, d)
    # every exact duplicate found: readable rows sharing a sha256 share a group, and carry the flag
    ok = df["error"] == ""
    for _, same in df[ok].groupby("sha256"):
        if len(same) > 1:
            assert len(set(dup_group[same.index])) == 1 and dup_group[same.index[0]] != ""
            assert flags["exact_duplicate"][same.index].all()
    assert not (dup_group[~ok] != "").any() and not any(f[~ok.to_numpy()].any() for f in flags.values())
    # one keep per group: a colour image before a palette one before a grey one, then the largest, ties to
    # the first filepath
    for gid, members in dups.groupby("dup_group"):
        assert members["keep"].sum() == 1, gid
        rows = df.set_index("filepath").loc[members["filepath"]]
        grey = rows["flags"].str.contains("grayscale") if "flags" in rows else False
        colour = np.where(grey, 0, np.where(rows["mode"].isin(["P", "PA"]), 1, 2)) if "mode" in rows else 2
        rank = pd.Series(colour * 1e12 + rows["width"] * rows["height"], index=rows.index)
        best = sorted(rank[rank == rank.max()].index)[0]
        assert members.loc[members["keep"], "filepath"].item() == best
        labels = df.set_index("filepath").loc[members["filepath"], "label"]
        cross = flags["cross_label_duplicate"][df.index[df["filepath"].isin(members["filepath"])]]
        assert cross.all() == (labels.nunique() > 1) and cross.all() == cross.any()


@SETTINGS
@given(scan_rows(), st.randoms(use_true_random=False))
def test_duplicate_grouping_does_not_depend_on_row_order(case, rnd):
    df, d = case
    order = list(range(len(df)))
    rnd.shuffle(order)
    shuffled = df.iloc[order].reset_index(drop=True)
    g1, dups1, f1 = find_duplicates(df, d)
    g2, dups2, f2 = find_duplicates(shuffled, d)
    by_path1 = dict(zip(df["filepath"], g1, strict=True))
    by_path2 = dict(zip(shuffled["filepath"], g2, strict=True))
    assert by_path1 == by_path2  # same groups, same ids (numbered in filepath order)
    pd.testing.assert_frame_equal(dups1.reset_index(drop=True), dups2.reset_index(drop=True))
    for name in f1:
        assert dict(zip(df["filepath"], f1[name], strict=True)) == dict(zip(shuffled["filepath"], f2[name],
                                                                            strict=True))


# ------------------------------------------------------------------ export policies

FLAG_POOL = ["corrupt", "truncated", "not_image", "blurry", "dark", "tiny", "grayscale", "off_class", "outlier"]
CLASSES = ["daisy", "roses", "tulips"]


@st.composite
def run_tables(draw) -> tuple[RunTables, pd.DataFrame]:
    """A run's manifest with random flags, duplicate groups (some cross-label, some with no keep marked),
    suggestions and OOF confidences, plus random review tags."""
    n = draw(st.integers(1, 30))
    rows, dup_rows = [], []
    for i in range(n):
        label = draw(st.sampled_from(CLASSES))
        flags = draw(st.lists(st.sampled_from(FLAG_POOL), max_size=3, unique=True))
        unreadable = any(f in ("corrupt", "truncated", "not_image") for f in flags)
        rows.append({"filepath": f"{label}/{i:03d}.jpg", "label": label, "flags": ";".join(flags),
                     "error": "cannot decode" if unreadable else "",
                     "suggested_label": draw(st.sampled_from(CLASSES)),
                     "dup_group": "", "width": 100, "height": 100})
    m = pd.DataFrame(rows)
    n_groups = draw(st.integers(0, max(0, n // 2)))
    free = [i for i in range(n) if m.at[i, "error"] == ""]
    for g in range(1, n_groups + 1):
        size = draw(st.integers(2, 4))
        if len(free) < size:
            break
        members = draw(st.lists(st.sampled_from(free), min_size=size, max_size=size, unique=True))
        free = [i for i in free if i not in members]
        kind = draw(st.sampled_from(["exact", "near"]))
        marked = draw(st.sampled_from([0, 1, None]))  # keep on the first, the second, or no keep marked
        for k, i in enumerate(members):
            m.at[i, "dup_group"] = str(g)
            m.at[i, "flags"] = ";".join(filter(None, [m.at[i, "flags"], f"{kind}_duplicate"]))
            dup_rows.append({"dup_group": str(g), "kind": kind, "filepath": m.at[i, "filepath"],
                             "label": m.at[i, "label"], "distance": 0, "keep": str(k == marked)})
    duplicates = pd.DataFrame(dup_rows, columns=["dup_group", "kind", "filepath", "label", "distance", "keep"])
    facts = duplicate_facts(m, duplicates if draw(st.booleans()) else None)
    probs = draw(st.lists(st.one_of(st.just(float("nan")), st.floats(0, 1)), min_size=n, max_size=n))
    tables = RunTables(manifest=m, dup_kind=facts["dup_kind"], dup_keep=facts["dup_keep"].astype(bool),
                       dup_cross_label=facts["dup_cross_label"].astype(bool),
                       suggested_probability=pd.Series(probs, index=m.index))
    tagged = draw(st.lists(st.integers(0, n - 1), max_size=min(n, 6), unique=True))
    tags = pd.DataFrame({
        "filepath": [m.at[i, "filepath"] for i in tagged],
        "decision": [draw(st.sampled_from(["reject", "keep", "relabel", "shrug"])) for _ in tagged],
        "relabel_to": [draw(st.sampled_from([*CLASSES, "", "orchids"])) for _ in tagged],
    }, columns=["filepath", "decision", "relabel_to"])
    return tables, tags


def _check_partition(tables: RunTables, result, tags: pd.DataFrame) -> None:
    m = tables.manifest
    cleaned, removed, s = result.cleaned, result.removed, result.summary
    kept, gone = set(cleaned["filepath"]), set(removed["filepath"])
    assert not kept & gone  # no photo both kept and removed
    assert sorted([*cleaned["filepath"], *removed["filepath"]]) == sorted(m["filepath"])  # nor lost
    assert cleaned["filepath"].is_unique and removed["filepath"].is_unique
    assert s["photos"] == len(m) == s["kept"] + s["removed"]
    assert s["kept"] == len(cleaned) and s["removed"] == len(removed)
    assert sum(s["removed_by_reason"].values()) == s["removed"]
    assert sum(s["classes_before"].values()) == len(m) and sum(s["classes_after"].values()) == s["kept"]
    assert sum(s["split_after"].values()) == s["kept"]
    assert set(removed["reason"]) <= {*REASONS, "relabel"} and (removed["reason"] != "").all()
    old = m.set_index("filepath")["label"]
    changed = (cleaned["label"].to_numpy() != old[cleaned["filepath"]].to_numpy()).sum()
    assert changed <= s["relabelled"]
    unreadable = set(m.loc[(m["error"] != "") | m["flags"].map(lambda c: bool({"corrupt", "truncated", "not_image"}
                                                                                & set(flags_of(c)))), "filepath"])
    assert unreadable <= gone  # a review `keep` cannot bring back a file nothing can read
    rejected = set(tags.loc[tags["decision"] == "reject", "filepath"])
    assert rejected <= gone
    if tags.empty:
        for _, members in m[m["dup_group"] != ""].groupby("dup_group"):
            assert len(kept & set(members["filepath"])) <= 1  # at most one copy of a picture stays
            if members["label"].nunique() > 1:
                assert not kept & set(members["filepath"])  # a cross-label group goes entirely


@SETTINGS
@given(run_tables(), st.sampled_from(sorted(POLICIES)), st.booleans())
def test_every_policy_partitions_the_manifest_and_its_counts_add_up(case, policy, with_tags):
    tables, tags = case
    tags = tags if with_tags else tags.iloc[0:0]
    result = build_cleaned(tables, policy=policy, tags=tags)
    _check_partition(tables, result, tags)
    if policy == "duplicates-only" and tags.empty:
        # each same-label group with no unreadable member keeps exactly one photo
        m = tables.manifest
        for _, members in m[m["dup_group"] != ""].groupby("dup_group"):
            if members["label"].nunique() == 1:
                assert len(set(result.cleaned["filepath"]) & set(members["filepath"])) == 1


@SETTINGS
@given(run_tables(), st.sampled_from(sorted(POLICIES)), st.randoms(use_true_random=False))
def test_policies_do_not_depend_on_row_order(case, policy, rnd):
    tables, tags = case
    order = list(range(len(tables.manifest)))
    rnd.shuffle(order)

    def shuffled(s: pd.Series) -> pd.Series:
        return s.iloc[order].reset_index(drop=True)

    t2 = RunTables(manifest=tables.manifest.iloc[order].reset_index(drop=True), dup_kind=shuffled(tables.dup_kind),
                   dup_keep=shuffled(tables.dup_keep), dup_cross_label=shuffled(tables.dup_cross_label),
                   suggested_probability=shuffled(tables.suggested_probability))
    a = build_cleaned(tables, policy=policy, tags=tags)
    b = build_cleaned(t2, policy=policy, tags=tags)

    def rows(df: pd.DataFrame) -> list[tuple]:
        return sorted(map(tuple, df.astype(str).to_numpy().tolist()))

    assert rows(a.cleaned) == rows(b.cleaned) and rows(a.removed) == rows(b.removed)
    assert a.summary == b.summary


def test_the_strategies_reach_the_interesting_cases():
    """The generators are not vacuous: across draws there are groups, cross-label groups and unreadable rows."""
    seen = {"group": False, "cross": False, "unreadable": False, "exact": False}

    @settings(max_examples=40, deadline=None, database=None)
    @given(run_tables(), scan_rows())
    def probe(case, rows):
        tables, _ = case
        m = tables.manifest
        seen["group"] |= bool((m["dup_group"] != "").any())
        seen["cross"] |= bool(tables.dup_cross_label.any())
        seen["unreadable"] |= bool((m["error"] != "").any())
        df, _ = rows
        seen["exact"] |= bool(df[df["error"] == ""]["sha256"].duplicated().any())

    probe()
    assert all(seen.values()), seen


def test_partition_check_catches_a_photo_both_kept_and_removed():
    """The invariant check itself fails on a broken result (so the properties above can fail)."""
    m = pd.DataFrame({"filepath": ["a/1.jpg", "a/2.jpg"], "label": ["a", "a"], "flags": ["", ""],
                      "error": ["", ""], "dup_group": ["", ""]})
    facts = duplicate_facts(m, None)
    tables = RunTables(m, facts["dup_kind"], facts["dup_keep"].astype(bool), facts["dup_cross_label"].astype(bool),
                       pd.Series(np.nan, index=m.index))
    result = build_cleaned(tables, tags=pd.DataFrame())
    result.removed = pd.concat([result.removed, pd.DataFrame({"filepath": ["a/1.jpg"], "label": ["a"],
                                                              "reason": ["off_class"], "split": ["train"]})])
    try:
        _check_partition(tables, result, pd.DataFrame(columns=["filepath", "decision", "relabel_to"]))
    except AssertionError:
        return
    raise AssertionError("a photo both kept and removed passed the check")
