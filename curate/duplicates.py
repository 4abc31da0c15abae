"""Exact and near-duplicate grouping: sha256 equality, pHash Hamming distance through an index, union-find.

Never reads images: it works on the manifest's `sha256` and `phash` columns.

The near-duplicate search is multi-index hashing (Norouzi et al., "Fast Search in Hamming Space
with Multi-Index Hashing"): the 64-bit hash is cut into m chunks; if two hashes differ in at most
d bits, then by pigeonhole some chunk differs in at most floor(d / m) bits. So each chunk gets a
bucket table, and a hash only meets the hashes whose chunk lies within that small radius of its
own -- a few lookups per hash instead of comparing all pairs. m is chosen per call from a cost
model (lookups + expected candidates), and the whole search is vectorised with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations

import numpy as np
import pandas as pd

from curate.io import flags_of

DUPLICATE_COLUMNS = ["dup_group", "kind", "filepath", "label", "distance", "keep"]

_TABLE_MAX_BITS = 22  # chunks up to this width get a direct bucket table (2**22 int64 = 32 MiB); wider use bisection
_BATCH = 1 << 20  # candidate pairs checked per vectorised step (bounds memory)


def hex_to_uint64(hexes: Iterable[str]) -> np.ndarray:
    """16-hex-digit hash strings -> uint64 array (the bit order of imagehash's hex strings)."""
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between uint64 arrays (element-wise)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    """All `bits`-wide integers with at most `radius` bits set (the probes of one chunk)."""
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << b for b in combo) for combo in combinations(range(bits), k)]
    return np.array(masks, dtype=np.int64)


def _chunk_widths(m: int) -> list[int]:
    return [64 // m + (1 if i < 64 % m else 0) for i in range(m)]


def _plan(n: int, max_distance: int) -> int:
    """The number of chunks m that minimises lookups + expected candidate checks for n uniform hashes."""
    best_m, best_cost = 1, math.inf
    for m in range(1, max_distance + 2):
        radius = max_distance // m
        cost = 0.0
        for bits in _chunk_widths(m):
            probes = sum(math.comb(bits, k) for k in range(radius + 1))
            lookup = 1.0 if bits <= _TABLE_MAX_BITS else math.log2(max(n, 2))
            cost += probes * n * (lookup + n / 2.0**bits)
        if cost < best_cost:
            best_m, best_cost = m, cost
    return best_m


def near_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Pairs (i, j), i < j, of `hashes` (uint64) at Hamming distance <= `max_distance`, enough to group them.

    Out: an int64 array of shape (P, 2), each pair once. Among distinct hash values every close
    pair is returned; rows with an identical hash are joined to the first of them (a star, not all
    k^2 pairs), so a large bucket of equal hashes costs nothing extra. The connected components of
    the result are exactly those of all close pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    if hashes.size < 2 or max_distance < 0:
        return np.empty((0, 2), dtype=np.int64)
    uniq, inverse = np.unique(hashes, return_inverse=True)
    pairs = [_same_value_pairs(inverse)]
    if max_distance > 0 and uniq.size > 1:
        upairs = _near_pairs_unique(uniq, max_distance)
        pairs.append(_expand_unique_pairs(upairs, inverse))
    out = np.concatenate(pairs)
    out.sort(axis=1)
    return np.unique(out, axis=0) if out.size else out


def _same_value_pairs(inverse: np.ndarray) -> np.ndarray:
    """Star pairs (first member, other member) inside every run of equal values: enough for grouping."""
    order = np.argsort(inverse, kind="stable")
    vals = inverse[order]
    first = np.r_[True, vals[1:] != vals[:-1]]
    head = order[np.maximum.accumulate(np.where(first, np.arange(vals.size), 0))]
    keep = ~first
    return np.stack([head[keep], order[keep]], axis=1).astype(np.int64)


def _expand_unique_pairs(upairs: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Pairs of distinct hash values -> one pair of representative rows each (equal rows are joined anyway)."""
    if upairs.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    rep = np.full(inverse.max() + 1, -1, dtype=np.int64)
    rep[inverse[::-1]] = np.arange(inverse.size - 1, -1, -1)  # first row holding each value
    return np.stack([rep[upairs[:, 0]], rep[upairs[:, 1]]], axis=1)


def _near_pairs_unique(uniq: np.ndarray, max_distance: int) -> np.ndarray:
    n = uniq.size
    m = _plan(n, max_distance)
    radius = max_distance // m
    found: list[np.ndarray] = []
    shift = 0
    for bits in _chunk_widths(m):
        keys = ((uniq >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        shift += bits
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        if bits <= _TABLE_MAX_BITS:
            counts_table = np.bincount(keys, minlength=1 << bits)
            starts_table = np.cumsum(counts_table) - counts_table
        for mask in _flip_masks(bits, radius):
            query = keys ^ mask
            if bits <= _TABLE_MAX_BITS:
                lo = starts_table[query]
                cnt = counts_table[query]
            else:
                lo = np.searchsorted(sorted_keys, query, side="left")
                cnt = np.searchsorted(sorted_keys, query, side="right") - lo
            found += _check_candidates(uniq, order, lo, cnt, max_distance)
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.concatenate(found)


def _check_candidates(uniq: np.ndarray, order: np.ndarray, lo: np.ndarray, cnt: np.ndarray,
                      max_distance: int) -> list[np.ndarray]:
    """Pairs (query i, bucket member j), i < j, that are within `max_distance`, batch by batch."""
    out = []
    queries = np.flatnonzero(cnt)
    if queries.size == 0:
        return out
    cnt_q = cnt[queries]
    ends = np.cumsum(cnt_q)
    start = 0
    while start < queries.size:
        # as many queries as fit in one batch of candidates (at least one)
        stop = int(np.searchsorted(ends, (ends[start - 1] if start else 0) + _BATCH, side="right"))
        stop = max(stop, start + 1)
        q = queries[start:stop]
        c = cnt_q[start:stop]
        total = int(c.sum())
        qi = np.repeat(q, c)
        offsets = np.arange(total) - np.repeat(np.cumsum(c) - c, c)
        qj = order[np.repeat(lo[q], c) + offsets]
        sel = qi < qj
        qi, qj = qi[sel], qj[sel]
        close = hamming(uniq[qi], uniq[qj]) <= max_distance
        if close.any():
            out.append(np.stack([qi[close], qj[close]], axis=1))
        start = stop
    return out


def union_find_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of n items joined by `pairs` (transitive grouping).

    Out: int64 array, for each item the smallest index in its component.
    """
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees shallow
            x = parent[x]
        return x

    for a, b in np.asarray(pairs, dtype=np.int64).tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    return np.array([find(i) for i in range(n)], dtype=np.int64)


KEEP_ORDER = ["colour", "pixels"]  # within a duplicate group, the copy kept: most colour, then most pixels
_PALETTE_MODES = frozenset({"P", "PA"})


def keep_preference(rows: pd.DataFrame) -> pd.DataFrame:
    """Columns KEEP_ORDER per row, higher = the better copy to keep of a duplicate group.

    `colour`: 2 full colour, 1 palette (a GIF or PNG-8 copy has at most 256 colours), 0 grey (scan's
    `grayscale` flag: a grey copy of a colour photo has lost what cannot be restored). `pixels`: width x
    height. Missing columns count as 0, so a table without them falls back to the first filepath.
    """
    n = len(rows)
    flags = rows["flags"].fillna("").astype(str) if "flags" in rows else pd.Series([""] * n, index=rows.index)
    mode = rows["mode"].fillna("").astype(str) if "mode" in rows else pd.Series([""] * n, index=rows.index)
    grey = flags.map(lambda cell: "grayscale" in flags_of(cell)).to_numpy(bool)
    colour = np.where(grey, 0, np.where(mode.isin(_PALETTE_MODES).to_numpy(), 1, 2))
    size = [pd.to_numeric(rows[c], errors="coerce").fillna(0).to_numpy(float) if c in rows else np.zeros(n)
            for c in ("width", "height")]
    return pd.DataFrame({"colour": colour, "pixels": size[0] * size[1]}, index=rows.index)


def find_duplicates(rows: pd.DataFrame, max_distance: int) -> tuple[pd.Series, pd.DataFrame, dict[str, np.ndarray]]:
    """Group exact (same sha256) and near (pHash within `max_distance` bits) duplicates.

    In: a manifest-like table with `filepath`, `label`, `sha256`, `phash` (16 hex digits, empty
    where the image could not be decoded), `width`, `height`, `error`, and (optional) `mode`, `flags`.
    Only readable rows take part.
    Out: (`dup_group` per row: "" or a group id "1", "2", ... numbered in filepath order;
    the duplicates table with columns DUPLICATE_COLUMNS, one row per group member, `keep` True for
    the best copy in each group (`keep_preference`: colour over palette over grey, then the most pixels,
    then the first filepath), `distance` the pHash distance to it,
    `kind` "exact" for a member with a byte-identical copy in the group, else "near";
    {flag: boolean array per row} for exact_duplicate, near_duplicate, cross_label_duplicate).
    """
    n = len(rows)
    dup_group = pd.Series([""] * n, index=rows.index, dtype=object)
    flags = {name: np.zeros(n, dtype=bool) for name in ("exact_duplicate", "near_duplicate", "cross_label_duplicate")}
    readable = np.flatnonzero(((rows["error"].fillna("") == "") & (rows["phash"].fillna("") != "")).to_numpy())
    if readable.size < 2:
        return dup_group, pd.DataFrame(columns=DUPLICATE_COLUMNS), flags

    sub = rows.iloc[readable]
    sha_codes = pd.factorize(sub["sha256"])[0]
    phashes = hex_to_uint64(sub["phash"])
    pairs = [_same_value_pairs(sha_codes), near_pairs(phashes, max_distance)]
    roots = union_find_groups(readable.size, np.concatenate(pairs))

    sizes = np.bincount(roots, minlength=readable.size)
    in_group = sizes[roots] > 1
    if not in_group.any():
        return dup_group, pd.DataFrame(columns=DUPLICATE_COLUMNS), flags

    sha_count = np.bincount(sha_codes)[sha_codes]
    table = pd.DataFrame({
        "row": readable, "root": roots, "filepath": sub["filepath"].to_numpy(), "label": sub["label"].to_numpy(),
        "sha": sha_codes, "phash": phashes,
    })
    table = pd.concat([table, keep_preference(sub).set_axis(table.index)], axis=1)[in_group]
    table = table.sort_values(["root", *KEEP_ORDER, "filepath"], ascending=[True, False, False, True],
                              kind="stable")
    keep_of_root = table.groupby("root", sort=False).head(1).set_index("root")
    table["keep"] = table["row"].to_numpy() == keep_of_root.loc[table["root"], "row"].to_numpy()
    keep_phash = keep_of_root.loc[table["root"], "phash"].to_numpy().astype(np.uint64)
    table["distance"] = hamming(table["phash"].to_numpy().astype(np.uint64), keep_phash)

    # group ids in order of each group's first filepath, so they are stable across re-scans
    first_path = table.groupby("root")["filepath"].min().sort_values()
    group_id = pd.Series(np.arange(1, len(first_path) + 1), index=first_path.index).astype(str)
    table["dup_group"] = group_id.loc[table["root"]].to_numpy()

    pos = table.index.to_numpy()  # positions within `sub`
    shares_sha = sha_count[pos] > 1
    # "exact": a byte-identical copy of another member exists; "near": similar pixels only
    table["kind"] = np.where(shares_sha, "exact", "near")
    n_sha_in_group = table.groupby("root")["sha"].transform("nunique").to_numpy()
    n_labels_in_group = table.groupby("root")["label"].transform("nunique").to_numpy()

    rows_idx = table["row"].to_numpy()
    flags["exact_duplicate"][rows_idx] = shares_sha
    flags["near_duplicate"][rows_idx] = n_sha_in_group > 1
    flags["cross_label_duplicate"][rows_idx] = n_labels_in_group > 1
    dup_group.iloc[rows_idx] = table["dup_group"].to_numpy()

    table["_gid"] = table["dup_group"].astype(int)
    table = table.sort_values(["_gid", "keep", "filepath"], ascending=[True, False, True], kind="stable")
    dups = table[DUPLICATE_COLUMNS].reset_index(drop=True)
    return dup_group, dups, flags


def groups_of(dups: pd.DataFrame) -> list[Sequence[str]]:
    """The member filepaths of each duplicate group, in group order (for reports and tests)."""
    return [list(g["filepath"]) for _, g in dups.groupby("dup_group", sort=False)]
