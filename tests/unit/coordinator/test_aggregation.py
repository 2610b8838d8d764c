from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import apply_delta, fedavg, weighted_mean


def make(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


SHAPES = {"a.lora_A.weight": (4, 8), "a.lora_B.weight": (8, 4), "b.lora_A.weight": (2, 3)}


def test_weighted_mean_matches_numpy_with_unequal_sizes() -> None:
    deltas = [make(i, SHAPES) for i in range(3)]
    sizes = [10, 250, 3]
    got = weighted_mean(list(zip(deltas, sizes, strict=True)))
    for k in SHAPES:
        stacked = np.stack([d[k].astype(np.float64) for d in deltas])
        expected = np.average(stacked, axis=0, weights=sizes)
        np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-7)
        assert got[k].dtype == np.float32
    # Unweighted averaging would be visibly different here.
    assert not np.allclose(
        got["a.lora_A.weight"], np.mean([d["a.lora_A.weight"] for d in deltas], axis=0)
    )


def test_fedavg_of_deltas_equals_weighted_mean_of_client_adapters() -> None:
    g = make(100, SHAPES)
    clients = [make(i, SHAPES) for i in range(4)]
    sizes = [1, 2, 3, 4]
    deltas = [{k: c[k] - g[k] for k in g} for c in clients]
    new = fedavg(g, list(zip(deltas, sizes, strict=True)))
    for k in g:
        expected = np.average(
            np.stack([c[k] for c in clients]).astype(np.float64), axis=0, weights=sizes
        )
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-6)


def test_apply_delta_keeps_tensors_without_delta() -> None:
    g = make(0, SHAPES)
    d = {"a.lora_B.weight": np.ones((8, 4), np.float32)}
    out = apply_delta(g, d)
    np.testing.assert_array_equal(out["a.lora_A.weight"], g["a.lora_A.weight"])
    np.testing.assert_array_equal(out["a.lora_B.weight"], g["a.lora_B.weight"] + 1)
    with pytest.raises(ValueError, match="not in the adapter"):
        apply_delta(g, {"zzz": np.ones(1, np.float32)})


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([], "no updates"),
        ([({"x": np.ones(2, np.float32)}, 0)], "weights must be positive"),
        (
            [({"x": np.ones(2, np.float32)}, 1), ({"y": np.ones(2, np.float32)}, 1)],
            "different tensors",
        ),
    ],
)
def test_weighted_mean_rejects(updates, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        weighted_mean(updates)


@settings(max_examples=50, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_weighted_mean_lies_within_client_range(weights: list[int], seed: int) -> None:
    deltas = [make(seed + i, {"t": (5,)}) for i in range(len(weights))]
    got = weighted_mean(list(zip(deltas, weights, strict=True)))["t"]
    stacked = np.stack([d["t"] for d in deltas])
    assert np.all(got <= stacked.max(axis=0) + 1e-5)
    assert np.all(got >= stacked.min(axis=0) - 1e-5)
