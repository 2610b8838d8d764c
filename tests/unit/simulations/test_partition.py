from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.partition import PartitionSpec, dirichlet, iid, natural, partition


def check_cover(shards: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(shards)
    assert len(allidx) == n, "every row assigned exactly once"
    assert len(np.unique(allidx)) == n, "shards are disjoint"
    for s in shards:
        assert np.all(np.diff(s) > 0), "each shard is sorted"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_iid_sizes_cover_and_determinism(n: int, k: int, seed: int) -> None:
    if k > n:
        with pytest.raises(ValueError, match="num_clients"):
            iid(n, k, seed)
        return
    shards = iid(n, k, seed)
    check_cover(shards, n)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(shards, iid(n, k, seed), strict=True))


def test_iid_seed_changes_assignment() -> None:
    assert not np.array_equal(iid(100, 4, 0)[0], iid(100, 4, 1)[0])


def test_natural_one_client_per_value() -> None:
    labels = ["b", "a", "b", "c", "a", "b"]
    names, shards = natural(labels)
    assert names == ["a", "b", "c"]
    assert [s.tolist() for s in shards] == [[1, 4], [0, 2, 5], [3]]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31), alpha=st.sampled_from([0.1, 0.5, 1.0, 100.0]), k=st.integers(2, 8)
)
def test_dirichlet_cover_min_size_and_determinism(seed: int, alpha: float, k: int) -> None:
    labels = [f"c{i % 5}" for i in range(400)]
    shards = dirichlet(labels, k, alpha, seed)
    check_cover(shards, 400)
    assert min(len(s) for s in shards) >= 1
    again = dirichlet(labels, k, alpha, seed)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


def test_dirichlet_small_alpha_is_more_skewed_than_large() -> None:
    labels = np.asarray([f"c{i % 4}" for i in range(4000)])

    def skew(alpha: float) -> float:
        shards = dirichlet(labels.tolist(), 8, alpha, seed=3)
        # mean over clients of the share of the client's most common label
        return float(
            np.mean([np.max(np.unique(labels[s], return_counts=True)[1]) / len(s) for s in shards])
        )

    assert skew(0.1) > 0.7 > skew(1000.0)
    assert skew(1000.0) < 0.35


def test_dirichlet_impossible_min_size() -> None:
    with pytest.raises(ValueError, match="could not give each of 10 clients"):
        dirichlet(["a"] * 12, 10, 0.01, seed=0, min_size=2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        ("natural:category", PartitionSpec("natural", column="category")),
        ("dirichlet:category:0.5", PartitionSpec("dirichlet", column="category", alpha=0.5)),
    ],
)
def test_spec_parse(text: str, expected: PartitionSpec) -> None:
    assert PartitionSpec.parse(text) == expected
    assert PartitionSpec.parse(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("random", "is not one of"),
        ("natural", "is not one of"),
        ("dirichlet:category", "is not one of"),
        ("dirichlet:category:abc", "alpha 'abc'"),
        ("dirichlet:category:0", "alpha must be > 0"),
    ],
)
def test_spec_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PartitionSpec.parse(text)


def test_partition_records_errors_name_column_and_row() -> None:
    records = [{"category": "a"}, {"kind": "b"}]
    with pytest.raises(ValueError, match="row 2 has no column 'category'"):
        partition(records, PartitionSpec.parse("natural:category"), None, 0)
    with pytest.raises(ValueError, match="gives 1 clients"):
        partition([{"category": "a"}], PartitionSpec.parse("natural:category"), 3, 0)
    names, shards = partition(
        [{"category": "x"}, {"category": "y"}], PartitionSpec.parse("natural:category"), None, 0
    )
    assert names == ["x", "y"] and [len(s) for s in shards] == [1, 1]
