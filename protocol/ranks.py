"""Per-client LoRA ranks: slicing the global adapter, and two ways to aggregate mixed ranks.

The global adapter has rank R (the largest in the fleet). A LoRA module's ``lora_A.weight`` is
(R, in) and ``lora_B.weight`` is (out, R); rank component j is row j of A with column j of B. A
client of rank r receives and trains the first r components (``slice_adapter``).

Scaling. PEFT multiplies B A by alpha / r. A client of rank r therefore runs with
alpha_r = alpha * r / R (``client_lora``), so its scale equals the global alpha / R: its model
computes exactly the global model truncated to r components, and its deltas live on the global
scale (no rescaling at aggregation). A client built with the global alpha instead would apply
R / r times the global scale to the same factors.

Aggregation, linear (composes with secure aggregation and with DP on the sum): each component's
new value is the weighted mean over the clients that hold it. A client sends its delta padded to
rank R with zeros, plus a holder vector e (R,) with e[j] = 1 for j < r. The transport sums
w_i * padded_i and w_i * e_i like any other tensor, and component j of the result is
(sum_i w_i padded_i[j]) / (sum_i w_i e_i[j]); components nobody holds stay unchanged. With all
ranks equal this is FedAvg. Under secure aggregation the R holder coordinates must be summed
exactly, like the example-weight coordinate of ``privacy.secagg.encoding`` (integers, not
clipped float coordinates).

FlexLoRA-style redistribution (Bai et al. 2024), plaintext only (it needs every client's factors
in the clear): the weighted mean of the clients' products B_i A_i, truncated by SVD to rank R and
split as B = U sqrt(S), A = sqrt(S) V^T, so a client of rank r later receives the r strongest
directions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from protocol.codecs.secure import HOLDERS_KEY
from protocol.messages import LoraSpec

Arrays = Mapping[str, np.ndarray]
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
HOLDERS = HOLDERS_KEY  # (R,) holder vector riding along with a padded delta


class RankError(ValueError):
    """A rank or an adapter does not fit the global adapter; the message names it."""


def parse_client_ranks(text: str) -> tuple[int, ...]:
    """``--client-ranks 4,8,16`` -> (4, 8, 16); clients take them round-robin."""
    try:
        ranks = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise RankError(f"client-ranks: expected comma-separated integers, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise RankError(f"client-ranks: every rank must be >= 1, got {text!r}")
    return ranks


def rank_of_client(ranks: Sequence[int], index: int) -> int:
    """Round-robin assignment: client ``index`` (partition id) gets ``ranks[index % len]``."""
    return int(ranks[index % len(ranks)])


def is_lora(name: str) -> bool:
    return name.endswith((LORA_A, LORA_B))


def component_axis(name: str) -> int:
    """The axis of a LoRA tensor that indexes rank components (0 for A, 1 for B)."""
    if name.endswith(LORA_A):
        return 0
    if name.endswith(LORA_B):
        return 1
    raise RankError(f"tensor {name!r} is not a LoRA A or B matrix")


def adapter_rank(adapter: Arrays) -> int:
    """The rank shared by every LoRA tensor of ``adapter``."""
    ranks = {
        name: arr.shape[component_axis(name)] for name, arr in adapter.items() if is_lora(name)
    }
    if not ranks:
        raise RankError("adapter holds no lora_A/lora_B tensors")
    if len(set(ranks.values())) > 1:
        first = next(iter(ranks))
        other = next(n for n, r in ranks.items() if r != ranks[first])
        raise RankError(
            f"adapter mixes ranks: {first!r} has {ranks[first]}, {other!r} has {ranks[other]}"
        )
    return int(next(iter(ranks.values())))


def client_lora(global_lora: LoraSpec, rank: int) -> LoraSpec:
    """The LoRA spec of a rank-``rank`` client: alpha scaled so alpha / r is the global scale."""
    if not 1 <= rank <= global_lora.rank:
        raise RankError(f"client rank {rank} must be in [1, {global_lora.rank}] (the global rank)")
    return LoraSpec(
        rank=rank,
        alpha=global_lora.alpha * rank / global_lora.rank,
        dropout=global_lora.dropout,
        target_modules=global_lora.target_modules,
    )


def _take(arr: np.ndarray, name: str, rank: int) -> np.ndarray:
    return arr[:rank] if component_axis(name) == 0 else arr[:, :rank]


def slice_adapter(global_adapter: Arrays, rank: int) -> dict[str, np.ndarray]:
    """The first ``rank`` components of every LoRA tensor (copies); other tensors unchanged."""
    big = adapter_rank(global_adapter)
    if not 1 <= rank <= big:
        raise RankError(f"client rank {rank} must be in [1, {big}] (the global rank)")
    return {
        name: (_take(arr, name, rank) if is_lora(name) else arr).copy()
        for name, arr in global_adapter.items()
    }


def pad_to_rank(delta: Arrays, global_rank: int) -> dict[str, np.ndarray]:
    """A rank-r delta padded with zero components to ``global_rank``, plus its holder vector
    under ``HOLDERS`` (1 for the r components it holds, 0 after)."""
    rank = adapter_rank(delta)
    if rank > global_rank:
        raise RankError(f"update rank {rank} exceeds the global rank {global_rank}")
    out: dict[str, np.ndarray] = {}
    for name, arr in delta.items():
        if not is_lora(name):
            out[name] = np.array(arr, copy=True)
            continue
        axis = component_axis(name)
        shape = list(arr.shape)
        shape[axis] = global_rank
        padded = np.zeros(shape, dtype=arr.dtype)
        if axis == 0:
            padded[:rank] = arr
        else:
            padded[:, :rank] = arr
        out[name] = padded
    holders = np.zeros(global_rank, dtype=np.float32)
    holders[:rank] = 1.0
    out[HOLDERS] = holders
    return out


def weighted_sum(padded: Sequence[tuple[Arrays, float]]) -> dict[str, np.ndarray]:
    """sum_i w_i * padded_i, tensor by tensor in float64 (holders included): the one thing a
    transport must deliver. Plain sums, so any grouping of clients adds up to the same result."""
    if not padded:
        raise RankError("no updates to aggregate")
    names = list(padded[0][0])
    out = {n: np.zeros(padded[0][0][n].shape, dtype=np.float64) for n in names}
    for arrays, w in padded:
        if list(arrays) != names:
            raise RankError("padded updates hold different tensors")
        for n in names:
            out[n] += float(w) * np.asarray(arrays[n], dtype=np.float64)
    return out


def ranked_mean(summed: Arrays, total_weight: float) -> dict[str, np.ndarray]:
    """Per-component weighted mean from a weighted sum of padded deltas with holders.

    ``summed`` is sum_i w_i padded_i (``HOLDERS`` included) and ``total_weight`` sum_i w_i;
    a weighted *mean* from the transport works too, with ``total_weight`` 1. Component j of each
    LoRA tensor is divided by the summed holder weight of j (0 where nobody holds it); other
    tensors by ``total_weight``. Returns float32 deltas at the global rank."""
    if HOLDERS not in summed:
        raise RankError(f"summed update has no {HOLDERS!r} vector")
    holders = np.asarray(summed[HOLDERS], dtype=np.float64)
    if not (total_weight > 0 and np.isfinite(total_weight)):
        raise RankError(f"total weight must be positive, got {total_weight}")
    if (holders < 0).any() or (holders > total_weight * (1 + 1e-9)).any():
        raise RankError(f"holder weights {holders.tolist()} outside [0, {total_weight}]")
    held = holders > 0
    out: dict[str, np.ndarray] = {}
    for name, arr in summed.items():
        if name == HOLDERS:
            continue
        acc = np.asarray(arr, dtype=np.float64)
        if not is_lora(name):
            out[name] = (acc / total_weight).astype(np.float32)
        else:
            shape = (-1, 1) if component_axis(name) == 0 else (1, -1)
            h, mask = holders.reshape(shape), held.reshape(shape)
            mean = np.divide(acc, h, out=np.zeros_like(acc), where=mask)
            out[name] = mean.astype(np.float32)
    return out


def mixed_rank_mean(
    updates: Sequence[tuple[Arrays, float]], global_rank: int
) -> dict[str, np.ndarray]:
    """Per-component weighted mean of deltas of any ranks <= ``global_rank`` (plaintext entry
    point: pad, sum, divide)."""
    padded = [(pad_to_rank(delta, global_rank), float(w)) for delta, w in updates]
    weights = [w for _, w in padded]
    if min(weights) <= 0 or not np.isfinite(weights).all():
        raise RankError(f"weights must be positive and finite, got {weights}")
    return ranked_mean(weighted_sum(padded), float(sum(weights)))


# -- FlexLoRA ------------------------------------------------------------------------------------


def _modules(adapter: Arrays) -> list[str]:
    prefixes = [n[: -len(LORA_A)] for n in adapter if n.endswith(LORA_A)]
    for p in prefixes:
        if p + LORA_B not in adapter:
            raise RankError(f"{p + LORA_A!r} has no matching {p + LORA_B!r}")
    return prefixes


def truncated_product_factors(
    b_blocks: Sequence[np.ndarray], a_blocks: Sequence[np.ndarray], rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """(B', A') of rank ``rank`` with B' A' the best rank-``rank`` approximation of
    sum_k B_k A_k, split evenly: B' = U sqrt(S), A' = sqrt(S) V^T (zero-padded if the sum has
    lower rank). Computed from QR factors of [B_1 .. B_K] and [A_1; ..; A_K], never the full
    (out, in) matrix's SVD."""
    b = np.concatenate([np.asarray(x, dtype=np.float64) for x in b_blocks], axis=1)  # (out, K)
    a = np.concatenate([np.asarray(x, dtype=np.float64) for x in a_blocks], axis=0)  # (K, in)
    qb, rb = np.linalg.qr(b)  # b = qb rb
    qa, ra = np.linalg.qr(a.T)  # a = ra^T qa^T
    u, s, vt = np.linalg.svd(rb @ ra.T)  # sum_k B_k A_k = qb u diag(s) vt qa^T
    k = min(rank, s.size)
    root = np.sqrt(s[:k])
    out_b = np.zeros((b.shape[0], rank))
    out_a = np.zeros((rank, a.shape[1]))
    out_b[:, :k] = (qb @ u[:, :k]) * root[None, :]
    out_a[:k] = root[:, None] * (vt[:k] @ qa.T)
    return out_b, out_a


def flexlora(
    global_adapter: Arrays, updates: Sequence[tuple[Arrays, float]]
) -> dict[str, np.ndarray]:
    """The next global adapter (rank R) from deltas of mixed ranks, FlexLoRA-style.

    Client i's adapter is its slice of the global adapter plus its delta; per module the
    weighted mean of the clients' products B_i A_i is truncated to rank R by SVD. Tensors that
    are not LoRA factors get FedAvg. All clients share the scale alpha / R (``client_lora``), so
    products are comparable as they are."""
    big = adapter_rank(global_adapter)
    if not updates:
        raise RankError("no updates to aggregate")
    weights = np.asarray([float(w) for _, w in updates], dtype=np.float64)
    if (weights <= 0).any() or not np.isfinite(weights).all():
        raise RankError(f"weights must be positive and finite, got {weights.tolist()}")
    p = weights / weights.sum()
    clients: list[dict[str, np.ndarray]] = []
    for delta, _ in updates:
        r = adapter_rank(delta)
        base = slice_adapter(global_adapter, r)
        if set(delta) != set(base):
            raise RankError("an update holds other tensors than the global adapter")
        clients.append(
            {k: base[k].astype(np.float64) + np.asarray(delta[k], np.float64) for k in base}
        )
    out: dict[str, np.ndarray] = {}
    for prefix in _modules(global_adapter):
        b_blocks = [np.sqrt(pk) * c[prefix + LORA_B] for pk, c in zip(p, clients, strict=True)]
        a_blocks = [np.sqrt(pk) * c[prefix + LORA_A] for pk, c in zip(p, clients, strict=True)]
        new_b, new_a = truncated_product_factors(b_blocks, a_blocks, big)
        out[prefix + LORA_B] = new_b.astype(global_adapter[prefix + LORA_B].dtype)
        out[prefix + LORA_A] = new_a.astype(global_adapter[prefix + LORA_A].dtype)
    for name, arr in global_adapter.items():
        if not is_lora(name):
            mean = sum(pk * c[name] for pk, c in zip(p, clients, strict=True))
            out[name] = np.asarray(mean).astype(arr.dtype)
    return {name: out[name] for name in global_adapter}
