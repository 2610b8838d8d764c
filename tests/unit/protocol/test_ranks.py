"""Per-client LoRA ranks: slicing, the alpha convention (checked through PEFT), the linear
per-component mean against numpy and FedAvg, and the FlexLoRA SVD redistribution."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import weighted_mean
from protocol.messages import LoraSpec
from protocol.ranks import (
    HOLDERS,
    RankError,
    adapter_rank,
    client_lora,
    flexlora,
    mixed_rank_mean,
    pad_to_rank,
    parse_client_ranks,
    rank_of_client,
    ranked_mean,
    slice_adapter,
    truncated_product_factors,
    weighted_sum,
)

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"
SHAPES = {Q: (12, 10), V: (6, 10)}  # module -> (out, in)


def adapter(rank: int, seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for m, (o, i) in SHAPES.items():
        out[f"{m}.lora_A.weight"] = (scale * rng.standard_normal((rank, i))).astype(np.float32)
        out[f"{m}.lora_B.weight"] = (scale * rng.standard_normal((o, rank))).astype(np.float32)
    return out


# ------------------------------------------------------------------------------ slicing, alpha


def test_slice_takes_the_first_components_of_a_and_b() -> None:
    g = adapter(8, 0)
    s = slice_adapter(g, 3)
    for m in SHAPES:
        np.testing.assert_array_equal(s[f"{m}.lora_A.weight"], g[f"{m}.lora_A.weight"][:3])
        np.testing.assert_array_equal(s[f"{m}.lora_B.weight"], g[f"{m}.lora_B.weight"][:, :3])
    assert adapter_rank(s) == 3
    s[f"{Q}.lora_A.weight"][0, 0] = 99.0  # a copy: the global adapter is untouched
    assert g[f"{Q}.lora_A.weight"][0, 0] != 99.0


def test_rank_errors_name_what_is_wrong() -> None:
    with pytest.raises(RankError, match=r"client rank 9 must be in \[1, 8\]"):
        slice_adapter(adapter(8, 0), 9)
    mixed = {**adapter(8, 0), f"{V}.lora_A.weight": np.zeros((4, 10), np.float32)}
    with pytest.raises(RankError, match="adapter mixes ranks"):
        adapter_rank(mixed)
    with pytest.raises(RankError, match="client-ranks: every rank must be >= 1"):
        parse_client_ranks("4,0")
    with pytest.raises(RankError, match="client-ranks: expected comma-separated integers"):
        parse_client_ranks("4,eight")
    with pytest.raises(RankError, match="exceeds the global rank"):
        pad_to_rank(adapter(16, 0), 8)


def test_client_ranks_round_robin() -> None:
    ranks = parse_client_ranks("4,8,16")
    assert ranks == (4, 8, 16)
    assert [rank_of_client(ranks, i) for i in range(5)] == [4, 8, 16, 4, 8]


def test_client_alpha_keeps_the_global_scale() -> None:
    spec = client_lora(LoraSpec(rank=16, alpha=32.0), 4)
    assert (spec.rank, spec.alpha) == (4, 8.0)
    assert spec.alpha / spec.rank == 32.0 / 16


def test_a_sliced_client_model_computes_the_truncated_global_model_in_peft() -> None:
    """PEFT with rank r and alpha * r / R on the first r components gives the same output as the
    rank-R model whose components from r on are zero; the global alpha would not."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from peft import set_peft_model_state_dict as load

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(10, 12, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q_proj(x)

    big, small, alpha = 8, 3, 16.0

    def build(rank: int, a: float) -> torch.nn.Module:
        torch.manual_seed(0)  # same base weight in both
        cfg = LoraConfig(r=rank, lora_alpha=a, target_modules=["q_proj"])  # type: ignore[arg-type]
        return get_peft_model(Tiny(), cfg)  # type: ignore[return-value]

    g = {k: v.numpy().copy() for k, v in get_peft_model_state_dict(build(big, alpha)).items()}
    rng = np.random.default_rng(1)
    g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()}
    truncated = {k: v.copy() for k, v in g.items()}
    for k, v in truncated.items():
        if k.endswith("lora_A.weight"):
            v[small:] = 0
        else:
            v[:, small:] = 0
    x = torch.from_numpy(rng.standard_normal((5, 10)).astype(np.float32))

    ref = build(big, alpha)
    load(ref, {k: torch.from_numpy(v) for k, v in truncated.items()})
    spec = client_lora(LoraSpec(rank=big, alpha=alpha, target_modules=("q_proj",)), small)
    client = build(small, spec.alpha)
    load(client, {k: torch.from_numpy(v) for k, v in slice_adapter(g, small).items()})
    with torch.no_grad():
        torch.testing.assert_close(client(x), ref(x), rtol=1e-5, atol=1e-5)
        wrong = build(small, alpha)  # the global alpha at rank r: scale R / r too large
        load(wrong, {k: torch.from_numpy(v) for k, v in slice_adapter(g, small).items()})
        assert not torch.allclose(wrong(x), ref(x), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------ linear mean


def test_hand_computed_mixed_rank_mean() -> None:
    """R = 2; client 1 (rank 1, weight 1) and client 2 (rank 2, weight 3)."""
    a = "m.lora_A.weight"  # (r, in=1)
    b = "m.lora_B.weight"  # (out=1, r)
    c1 = {a: np.array([[2.0]], np.float32), b: np.array([[10.0]], np.float32)}
    c2 = {a: np.array([[4.0], [8.0]], np.float32), b: np.array([[6.0, -1.0]], np.float32)}
    out = mixed_rank_mean([(c1, 1), (c2, 3)], global_rank=2)
    # component 0: both hold it, (1*2 + 3*4) / 4 = 3.5 and (1*10 + 3*6) / 4 = 7
    # component 1: only client 2, 8 and -1
    np.testing.assert_array_equal(out[a], np.array([[3.5], [8.0]], np.float32))
    np.testing.assert_array_equal(out[b], np.array([[7.0, -1.0]], np.float32))


def test_padding_adds_zero_components_and_the_holder_vector() -> None:
    d = adapter(3, 2)
    p = pad_to_rank(d, 8)
    np.testing.assert_array_equal(p[HOLDERS], np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float32))
    assert p[f"{Q}.lora_A.weight"].shape == (8, 10) and p[f"{Q}.lora_B.weight"].shape == (12, 8)
    np.testing.assert_array_equal(p[f"{Q}.lora_A.weight"][:3], d[f"{Q}.lora_A.weight"])
    assert not p[f"{Q}.lora_A.weight"][3:].any() and not p[f"{Q}.lora_B.weight"][:, 3:].any()


def numpy_reference(
    updates: list[tuple[dict[str, np.ndarray], float]], big: int
) -> dict[str, np.ndarray]:
    """Component by component: mean over the clients holding it, written out directly."""
    out: dict[str, np.ndarray] = {}
    for m, (o, i) in SHAPES.items():
        a = np.zeros((big, i))
        b = np.zeros((o, big))
        for j in range(big):
            holders = [(d, w) for d, w in updates if d[f"{m}.lora_A.weight"].shape[0] > j]
            if not holders:
                continue
            tw = sum(w for _, w in holders)
            a[j] = sum(w * d[f"{m}.lora_A.weight"][j].astype(np.float64) for d, w in holders) / tw
            b[:, j] = (
                sum(w * d[f"{m}.lora_B.weight"][:, j].astype(np.float64) for d, w in holders) / tw
            )
        out[f"{m}.lora_A.weight"] = a
        out[f"{m}.lora_B.weight"] = b
    return out


def test_mixed_rank_mean_matches_the_numpy_reference() -> None:
    ranks = [4, 8, 16, 4, 8]
    weights = [120.0, 40.0, 300.0, 75.0, 9.0]
    updates = [(adapter(r, 10 + i), w) for i, (r, w) in enumerate(zip(ranks, weights, strict=True))]
    got = mixed_rank_mean(updates, global_rank=16)
    want = numpy_reference(updates, 16)
    for k in want:
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_components_nobody_holds_stay_zero() -> None:
    got = mixed_rank_mean([(adapter(2, 0), 1.0), (adapter(4, 1), 2.0)], global_rank=8)
    assert not got[f"{Q}.lora_A.weight"][4:].any() and not got[f"{V}.lora_B.weight"][:, 4:].any()


def test_equal_ranks_give_fedavg_exactly() -> None:
    updates = [(adapter(8, i), float(w)) for i, w in enumerate([10, 250, 3, 77])]
    got = mixed_rank_mean(updates, global_rank=8)
    want = weighted_mean(updates)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_the_rule_is_linear_a_transport_sum_in_any_grouping_gives_the_same_mean() -> None:
    """What a secure transport does: sum w_i * (padded delta, holders) in groups, then divide."""
    ranks = [4, 16, 8, 4]
    weights = [3.0, 5.0, 11.0, 2.0]
    padded = [
        (pad_to_rank(adapter(r, 20 + i), 16), w)
        for i, (r, w) in enumerate(zip(ranks, weights, strict=True))
    ]
    halves = [weighted_sum(padded[:2]), weighted_sum(padded[2:])]
    total = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    np.testing.assert_allclose(total[HOLDERS], [21.0] * 4 + [16.0] * 4 + [5.0] * 8)
    direct = mixed_rank_mean(
        [(adapter(r, 20 + i), w) for i, (r, w) in enumerate(zip(ranks, weights, strict=True))], 16
    )
    grouped = ranked_mean(total, sum(weights))
    # a transport that delivers the weighted *mean* (sum / total weight) works the same way
    as_mean = ranked_mean(weighted_mean(padded), 1.0)
    for k in direct:
        np.testing.assert_allclose(grouped[k], direct[k], rtol=1e-6)
        np.testing.assert_allclose(as_mean[k], direct[k], rtol=1e-6, atol=1e-7)


def test_ranked_mean_refuses_inconsistent_holders() -> None:
    padded = pad_to_rank(adapter(4, 0), 8)
    with pytest.raises(RankError, match="holder weights"):
        ranked_mean({**padded, HOLDERS: padded[HOLDERS] * 5}, 1.0)
    del padded[HOLDERS]
    with pytest.raises(RankError, match=r"no 'fedtune\.rank-holders'"):
        ranked_mean(padded, 1.0)


# ------------------------------------------------------------------------------ FlexLoRA


def best_rank(m: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    k = min(k, s.size)
    return (u[:, :k] * s[:k]) @ vt[:k]


def test_truncated_factors_equal_the_svd_truncation_of_the_summed_product() -> None:
    rng = np.random.default_rng(0)
    bs = [rng.standard_normal((12, r)) for r in (2, 5, 3)]
    as_ = [rng.standard_normal((r, 10)) for r in (2, 5, 3)]
    full = sum(b @ a for b, a in zip(bs, as_, strict=True))
    nb, na = truncated_product_factors(bs, as_, 4)
    np.testing.assert_allclose(nb @ na, best_rank(np.asarray(full), 4), atol=1e-10)
    # balanced split: B^T B = A A^T = diag(S)
    np.testing.assert_allclose(nb.T @ nb, na @ na.T, atol=1e-10)
    # the product has rank 10 here; asking for rank 12 pads with zero components
    nb, na = truncated_product_factors(bs, as_, 12)
    np.testing.assert_allclose(nb @ na, full, atol=1e-10)
    assert not nb[:, 10:].any() and not na[10:].any()


def test_flexlora_against_numpy() -> None:
    big = 8
    g = adapter(big, 0, scale=0.5)
    ranks, weights = [4, 8, 2], [50.0, 20.0, 30.0]
    deltas = [adapter(r, 30 + i, scale=0.1) for i, r in enumerate(ranks)]
    new = flexlora(g, list(zip(deltas, weights, strict=True)))
    p = np.asarray(weights) / sum(weights)
    for m in SHAPES:
        ka, kb = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        mean = sum(
            pk
            * ((g[kb][:, :r] + d[kb]).astype(np.float64) @ (g[ka][:r] + d[ka]).astype(np.float64))
            for pk, r, d in zip(p, ranks, deltas, strict=True)
        )
        want = best_rank(np.asarray(mean), big)
        assert new[ka].shape == g[ka].shape and new[kb].dtype == np.float32
        np.testing.assert_allclose(new[kb].astype(np.float64) @ new[ka], want, atol=1e-5)
        # a rank-r client later receives the r strongest directions of the mean product
        np.testing.assert_allclose(
            new[kb][:, :2].astype(np.float64) @ new[ka][:2],
            best_rank(np.asarray(mean), 2),
            atol=1e-5,
        )


def test_flexlora_with_one_client_of_full_rank_keeps_its_product() -> None:
    g = adapter(4, 0)
    d = adapter(4, 1, scale=0.1)
    new = flexlora(g, [(d, 7.0)])
    for m in SHAPES:
        ka, kb = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        want = (g[kb] + d[kb]).astype(np.float64) @ (g[ka] + d[ka]).astype(np.float64)
        np.testing.assert_allclose(new[kb].astype(np.float64) @ new[ka], want, atol=1e-5)
