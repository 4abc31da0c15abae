"""Duplicate grouping: the multi-index search must find exactly what all-pairs comparison finds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from curate.duplicates import _plan, find_duplicates, hamming, near_pairs, union_find_groups


def _brute_force_pairs(hashes: np.ndarray, d: int) -> set[tuple[int, int]]:
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(dist <= d, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def _planted_hashes(rng: np.random.Generator, n: int, max_flip: int) -> np.ndarray:
    """Random 64-bit hashes, a third of them copies of others with up to `max_flip` bits flipped."""
    base = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) ^ (
        rng.integers(0, 2, size=n, dtype=np.int64).astype(np.uint64) << np.uint64(63))
    for i in range(n // 3):
        src = base[rng.integers(0, n)]
        bits = rng.choice(64, size=rng.integers(0, max_flip + 1), replace=False)
        for b in bits:
            src ^= np.uint64(1) << np.uint64(int(b))
        base[i] = src
    return base


def _components(n: int, pairs) -> set[frozenset[int]]:
    roots = union_find_groups(n, np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2))
    groups: dict[int, set[int]] = {}
    for i, r in enumerate(roots.tolist()):
        groups.setdefault(r, set()).add(i)
    return {frozenset(g) for g in groups.values()}


@pytest.mark.parametrize("d", [0, 1, 2, 4, 6, 8, 10, 13])
def test_near_pairs_match_all_pairs(d: int) -> None:
    rng = np.random.default_rng(d)
    hashes = _planted_hashes(rng, 600, max_flip=d + 2)
    expected = _brute_force_pairs(hashes, d)
    found = near_pairs(hashes, d)
    assert (found[:, 0] < found[:, 1]).all()
    assert (hamming(hashes[found[:, 0]], hashes[found[:, 1]]) <= d).all()
    assert _components(len(hashes), found.tolist()) == _components(len(hashes), expected)
    # among distinct values nothing may be missed, pair by pair
    uniq = np.unique(hashes)
    assert set(map(tuple, near_pairs(uniq, d).tolist())) == _brute_force_pairs(uniq, d)


def test_near_pairs_with_many_identical_hashes() -> None:
    hashes = np.array([5] * 50 + [7, 2**40], dtype=np.uint64)  # 5 and 7 differ in one bit
    pairs = near_pairs(hashes, 1)
    roots = union_find_groups(len(hashes), pairs)
    assert len(set(roots[:51].tolist())) == 1
    assert roots[51] == 51


def test_plan_avoids_single_chunk_for_large_sets() -> None:
    # one 64-bit chunk at radius 8 would mean billions of probes; the cost model must split the hash
    assert _plan(1_000_000, 8) > 1
    assert _plan(1_000, 0) == 1


def test_union_find_is_transitive() -> None:
    roots = union_find_groups(6, np.array([[0, 1], [1, 2], [4, 5]]))
    assert roots[0] == roots[1] == roots[2]
    assert roots[4] == roots[5]
    assert len({roots[0], roots[3], roots[4]}) == 3


def test_hamming() -> None:
    a = np.array([0, 0xFF, 2**64 - 1], dtype=np.uint64)
    b = np.array([0, 0x0F, 0], dtype=np.uint64)
    assert hamming(a, b).tolist() == [0, 4, 64]


def _rows(records: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(records, columns=["filepath", "label", "sha256", "phash", "width", "height", "error"])


def test_find_duplicates_groups_keep_kind_and_flags() -> None:
    rows = _rows([
        ("a/1.jpg", "a", "s1", "00000000000000ff", 100, 100, ""),
        ("b/1.jpg", "b", "s1", "00000000000000ff", 100, 100, ""),   # exact copy of a/1, other label
        ("a/2.jpg", "a", "s2", "00000000000000fe", 200, 200, ""),   # near (1 bit) and largest
        ("a/3.jpg", "a", "s3", "ffffffff00000000", 50, 50, ""),     # unrelated
        ("a/4.jpg", "a", "s4", "", 0, 0, "not an image"),           # unreadable: never grouped
        ("a/5.jpg", "a", "s5", "ffffffff000000f0", 30, 30, ""),     # 4 bits from a/3: outside d=2
    ])
    dup_group, dups, flags = find_duplicates(rows, max_distance=2)
    assert dup_group.tolist() == ["1", "1", "1", "", "", ""]
    assert list(dups.columns) == ["dup_group", "kind", "filepath", "label", "distance", "keep"]
    keep = dups[dups["keep"]]
    assert keep["filepath"].tolist() == ["a/2.jpg"]  # the largest image
    by_path = dups.set_index("filepath")
    assert by_path.loc["a/1.jpg", "kind"] == "exact" and by_path.loc["a/2.jpg", "kind"] == "near"
    assert by_path.loc["a/1.jpg", "distance"] == 1 and by_path.loc["a/2.jpg", "distance"] == 0
    assert flags["exact_duplicate"].tolist() == [True, True, False, False, False, False]
    assert flags["near_duplicate"].tolist() == [True, True, True, False, False, False]
    assert flags["cross_label_duplicate"].tolist() == [True, True, True, False, False, False]


def test_keep_ties_go_to_first_path() -> None:
    rows = _rows([
        ("z/b.jpg", "z", "s1", "0000000000000000", 10, 10, ""),
        ("z/a.jpg", "z", "s1", "0000000000000000", 10, 10, ""),
    ])
    _, dups, flags = find_duplicates(rows, max_distance=0)
    assert dups.loc[dups["keep"], "filepath"].tolist() == ["z/a.jpg"]
    assert not flags["cross_label_duplicate"].any()
    assert not flags["near_duplicate"].any()


def test_no_duplicates_gives_empty_table() -> None:
    rows = _rows([("a/1.jpg", "a", "s1", "0000000000000000", 1, 1, ""),
                  ("a/2.jpg", "a", "s2", "ffffffffffffffff", 1, 1, "")])
    dup_group, dups, flags = find_duplicates(rows, max_distance=8)
    assert dups.empty and (dup_group == "").all()
    assert not any(f.any() for f in flags.values())
