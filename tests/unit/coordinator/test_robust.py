"""coordinator/robust.py against hand-computed values and direct numpy computations."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.robust import (
    NonFiniteError,
    RobustAggregationError,
    cap_weight,
    clip_to_norm,
    coordinate_median,
    krum_scores,
    multi_krum,
    require_finite,
    trimmed_mean,
    update_norm,
)

F32_MAX = float(np.finfo(np.float32).max)


def upd(a: list[float], b: list[float] | None = None, dtype: type = np.float32):  # type: ignore[no-untyped-def]
    """An update of two tensors: 'a' (a vector) and 'b' (a 1 x k matrix)."""
    out = {"a": np.asarray(a, dtype=dtype)}
    out["b"] = np.asarray([b if b is not None else [0.0]], dtype=dtype)
    return out


def random_updates(n: int, seed: int, dtype: type = np.float32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.normal(size=(3, 4)).astype(dtype), "y": rng.normal(size=5).astype(dtype)}
        for _ in range(n)
    ]


# ------------------------------------------------------------------------------- cap_weight


@pytest.mark.parametrize(
    ("num_examples", "cap", "want"),
    [(1, 100, 1), (99, 100, 99), (100, 100, 100), (101, 100, 100), (2**63 - 1, 500, 500),
     (2**64 - 1, 500, 500)],
)  # fmt: skip
def test_cap_weight(num_examples: int, cap: int, want: int) -> None:
    assert cap_weight(num_examples, cap) == want


@pytest.mark.parametrize(
    ("num_examples", "cap", "match"),
    [(0, 10, "num-examples"), (True, 10, "num-examples"), (2.0, 10, "num-examples"),
     (5, 0, "max-client-weight"), (5, True, "max-client-weight"), (5, 10.0, "max-client-weight")],
)  # fmt: skip
def test_cap_weight_refuses_bad_values(num_examples: object, cap: object, match: str) -> None:
    with pytest.raises(RobustAggregationError, match=match):
        cap_weight(num_examples, cap)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- clip_to_norm


def test_clip_to_norm_scales_over_all_tensors_exactly() -> None:
    # ||(3, 0) ++ (4)|| = 5: scaled by 1/5 to (0.6, 0) and (0.8)
    got, clipped = clip_to_norm(upd([3.0, 0.0], [4.0]), 1.0)
    assert clipped
    np.testing.assert_array_equal(got["a"], np.asarray([0.6, 0.0], np.float32))
    np.testing.assert_array_equal(got["b"], np.asarray([[0.8]], np.float32))
    assert got["a"].dtype == got["b"].dtype == np.float32


def test_clip_to_norm_leaves_a_small_update_unchanged_as_a_copy() -> None:
    u = upd([3.0, 0.0], [4.0])
    got, clipped = clip_to_norm(u, 5.0)
    assert not clipped
    for k in u:
        np.testing.assert_array_equal(got[k], u[k])
        assert got[k] is not u[k]


def test_clip_to_norm_matches_numpy_on_random_updates() -> None:
    for seed, bound in [(0, 0.5), (1, 2.0), (2, 100.0)]:
        (u,) = random_updates(1, seed, np.float64)
        flat = np.concatenate([u["x"].ravel(), u["y"]])
        norm = np.linalg.norm(flat)
        got, clipped = clip_to_norm(u, bound)
        assert update_norm(u) == pytest.approx(norm, rel=1e-14)
        assert clipped == (norm > bound)
        scale = min(1.0, bound / norm)
        for k in u:
            np.testing.assert_allclose(got[k], u[k] * scale, rtol=1e-14, atol=0)
        assert update_norm(got) == pytest.approx(min(norm, bound), rel=1e-14)


def test_clip_to_norm_handles_float32_max_without_overflow() -> None:
    # Four values of float32 max: the norm is 2 * max (finite in float64); clipped to 1 each is 0.5
    u = {"a": np.full(4, F32_MAX, np.float32)}
    assert update_norm(u) == pytest.approx(2 * F32_MAX, rel=1e-15)
    got, clipped = clip_to_norm(u, 1.0)
    assert clipped
    np.testing.assert_array_equal(got["a"], np.full(4, 0.5, np.float32))
    big = {"a": np.asarray([1e200, 1e200], np.float64)}  # squares overflow float64
    assert update_norm(big) == pytest.approx(np.sqrt(2) * 1e200, rel=1e-15)


def test_clip_to_norm_refuses_non_finite_updates_and_bounds() -> None:
    with pytest.raises(NonFiniteError, match="tensor 'a' holds 1 NaN or infinite"):
        clip_to_norm(upd([np.nan, 1.0]), 1.0)
    for bound in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(RobustAggregationError, match="max-update-norm"):
            clip_to_norm(upd([1.0]), bound)


# ------------------------------------------------------------------------ coordinate_median


def test_coordinate_median_exact_values() -> None:
    odd = [upd([1.0, 5.0], [7.0]), upd([5.0, 2.0], [-1.0]), upd([2.0, 1e30], [3.0])]
    got = coordinate_median(odd)
    np.testing.assert_array_equal(got["a"], np.asarray([2.0, 5.0], np.float32))
    np.testing.assert_array_equal(got["b"], np.asarray([[3.0]], np.float32))
    even = [upd([1.0]), upd([2.0]), upd([3.0]), upd([10.0])]
    np.testing.assert_array_equal(coordinate_median(even)["a"], np.asarray([2.5], np.float32))


def test_coordinate_median_matches_numpy() -> None:
    ups = random_updates(7, 3)
    got = coordinate_median(ups)
    for k in ups[0]:
        want = np.median(np.stack([u[k].astype(np.float64) for u in ups]), axis=0)
        np.testing.assert_array_equal(got[k], want.astype(np.float32))
        assert got[k].dtype == np.float32


def test_one_huge_value_does_not_move_the_median() -> None:
    """The issue's case: 3 honest clients, one sends 1e30 in one coordinate."""
    honest = random_updates(3, 4)
    attacker = {k: v.copy() for k, v in honest[0].items()}
    attacker["x"][0, 0] = 1e30
    got = coordinate_median([*honest, attacker])
    assert np.abs(got["x"]).max() < 10
    require_finite(got)


# ----------------------------------------------------------------------------- trimmed_mean


def test_trimmed_mean_exact_values() -> None:
    ups = [upd([1.0]), upd([2.0]), upd([3.0]), upd([100.0]), upd([-50.0])]
    # beta 0.2 of 5: one dropped at each end -> mean(1, 2, 3) = 2
    np.testing.assert_array_equal(trimmed_mean(ups, 0.2)["a"], np.asarray([2.0], np.float32))
    # beta 0.1 of 5: floor(0.5) = 0 dropped -> the plain mean 56 / 5
    np.testing.assert_array_equal(trimmed_mean(ups, 0.1)["a"], np.asarray([11.2], np.float32))
    # beta 0.4 of 5: two dropped at each end -> the median 2
    np.testing.assert_array_equal(trimmed_mean(ups, 0.4)["a"], np.asarray([2.0], np.float32))


def test_trimmed_mean_matches_a_direct_computation() -> None:
    ups = random_updates(9, 5, np.float64)
    beta = 0.25  # floor(2.25) = 2 at each end
    got = trimmed_mean(ups, beta)
    for k in ups[0]:
        stacked = np.stack([u[k] for u in ups])
        want = np.empty(stacked.shape[1:])
        for idx in np.ndindex(*stacked.shape[1:]):
            values = sorted(float(stacked[(slice(None), *idx)][i]) for i in range(9))
            want[idx] = statistics.fmean(values[2:-2])
        np.testing.assert_allclose(got[k], want, rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, float("nan")])
def test_trimmed_mean_refuses_bad_beta(beta: float) -> None:
    with pytest.raises(RobustAggregationError, match="trim-beta"):
        trimmed_mean(random_updates(4, 0), beta)


@settings(max_examples=40, deadline=None)
@given(
    honest=st.lists(st.floats(-10, 10), min_size=5, max_size=9),
    attackers=st.lists(st.floats(-1e30, 1e30), min_size=0, max_size=2),
)
def test_trimmed_mean_stays_within_the_honest_range(
    honest: list[float], attackers: list[float]
) -> None:
    """With at most floor(beta n) hostile values per side, the result lies within the honest
    values' range, whatever the hostile values are."""
    values = honest + attackers
    n = len(values)
    beta = (len(attackers) + 0.5) / n if attackers else 0.0
    if beta >= 0.5:
        return
    got = trimmed_mean([{"a": np.asarray([v], np.float64)} for v in values], beta)["a"][0]
    assert min(honest) - 1e-9 <= got <= max(honest) + 1e-9


# -------------------------------------------------------------------------------- multi_krum

# Five one-coordinate points 0, 1, 2, 100, 110 (tensor 'a'), tensor 'b' all zero. f = 1, so each
# score sums the n - f - 2 = 2 smallest squared distances:
#   0: 1 + 4 = 5;  1: 1 + 1 = 2;  2: 1 + 4 = 5;  100: 100 + 98^2 = 9704;  110: 100 + 108^2 = 11764
POINTS = [0.0, 1.0, 2.0, 100.0, 110.0]


def krum_updates() -> list[dict[str, np.ndarray]]:
    return [upd([p], [0.0, 0.0]) for p in POINTS]


def test_krum_scores_exact() -> None:
    np.testing.assert_array_equal(krum_scores(krum_updates(), 1), [5.0, 2.0, 5.0, 9704.0, 11764.0])


def test_krum_and_multi_krum_exact() -> None:
    agg, chosen = multi_krum(krum_updates(), f=1, m=1)
    assert chosen == [1] and agg["a"][0] == 1.0 and agg["b"].shape == (1, 2)
    agg, chosen = multi_krum(krum_updates(), f=1, m=2)  # tie 0 vs 2: the lower index
    assert chosen == [0, 1] and agg["a"][0] == 0.5
    agg, chosen = multi_krum(krum_updates(), f=1, m=2, weights=[1.0, 3.0, 1.0, 1.0, 1.0])
    assert chosen == [0, 1] and agg["a"][0] == 0.75  # (0 * 1 + 1 * 3) / 4
    agg, chosen = multi_krum(krum_updates(), f=1, m=3)
    assert chosen == [0, 1, 2] and agg["a"][0] == 1.0


def test_krum_scores_match_numpy_over_all_tensors() -> None:
    ups = random_updates(8, 6, np.float64)
    f = 2
    flat = [np.concatenate([u["x"].ravel(), u["y"]]) for u in ups]
    want = []
    for i in range(8):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(8) if j != i)
        want.append(sum(d[: 8 - f - 2]))
    np.testing.assert_allclose(krum_scores(ups, f), want, rtol=1e-13)
    agg, chosen = multi_krum(ups, f=f, m=3)
    assert chosen == sorted(np.argsort(want, kind="stable")[:3].tolist())
    for k in ups[0]:
        np.testing.assert_allclose(agg[k], np.mean([ups[i][k] for i in chosen], axis=0), rtol=1e-13)


def test_krum_refuses_too_few_updates_and_bad_m() -> None:
    with pytest.raises(RobustAggregationError, match="needs at least 2f \\+ 3 = 5 updates, got 4"):
        multi_krum(krum_updates()[:4], f=1)
    with pytest.raises(RobustAggregationError, match="krum m"):
        multi_krum(krum_updates(), f=1, m=5)
    with pytest.raises(RobustAggregationError, match="krum m"):
        multi_krum(krum_updates(), f=1, m=0)
    with pytest.raises(RobustAggregationError, match="weights must be finite"):
        multi_krum(krum_updates(), f=1, weights=[1.0, 1.0, 1.0, 1.0, float("inf")])


def test_aggregators_refuse_mismatched_or_non_finite_updates() -> None:
    with pytest.raises(RobustAggregationError, match="no updates"):
        coordinate_median([])
    with pytest.raises(RobustAggregationError, match="has shape"):
        coordinate_median([upd([1.0, 2.0]), upd([1.0])])
    with pytest.raises(RobustAggregationError, match="other tensors"):
        trimmed_mean([upd([1.0]), {"a": np.zeros(1, np.float32)}], 0.0)
    with pytest.raises(NonFiniteError, match="update 1: tensor 'a'"):
        coordinate_median([upd([1.0]), upd([np.inf])])


# --------------------------------------------------------------------------- require_finite


def test_require_finite_names_the_tensor_and_counts() -> None:
    require_finite({"a": np.full(3, F32_MAX, np.float32)})  # large but finite: fine
    bad = {"ok": np.zeros(2, np.float32), "w": np.asarray([np.inf, np.nan, 1.0], np.float32)}
    with pytest.raises(NonFiniteError, match="aggregate: tensor 'w' holds 2 NaN or infinite"):
        require_finite(bad)
    # float32 max twice in a row is the case: the sum overflows to inf in float32
    twice = {"a": np.full(2, F32_MAX, np.float32) + np.full(2, F32_MAX, np.float32)}
    with pytest.raises(NonFiniteError):
        require_finite(twice, "global adapter")
