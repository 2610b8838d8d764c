"""The per-round communication graph of SecAgg+ (Bell et al., CCS 2020).

Each client exchanges keys and shares only with its k neighbours in a random k-regular graph: a
Harary graph (clients on a ring, each joined to the k/2 nearest on either side) laid over a
uniformly random ordering of the round's clients. k grows like log n, so a client's work and
traffic grow like log n instead of n. With k >= n - 1 the graph is complete (the original SecAgg).
A client's secrets are split into k + 1 Shamir shares: one per neighbour and one it keeps.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class GraphError(ValueError):
    pass


def default_degree(n: int) -> int:
    """k = the even number at or above 3*log2(n), capped at n - 1 (complete graph)."""
    if n < 2:
        raise GraphError(f"secure aggregation needs at least 2 clients, got {n}")
    k = math.ceil(3 * math.log2(n))
    k += k % 2
    return min(k, n - 1)


def default_threshold(k: int) -> int:
    """A strict majority of the k + 1 holders of a client's shares (its k neighbours and itself),
    at least 2.

    Each holder reveals at most one share of a given client (of its self-mask seed b if it is
    told the client survived, of its masking key if told it dropped; the client itself only ever
    reveals its own b-share). Unmasking one client's input needs t shares of b *and* t of the key,
    from 2t distinct holders; t > (k + 1) / 2 makes that impossible with k + 1 holders that each
    answer one unmask request per round.
    """
    return max(2, (k + 1) // 2 + 1)


@dataclass(frozen=True)
class Graph:
    """Neighbour sets of a round. ``neighbours[u]`` never contains u."""

    neighbours: Mapping[int, frozenset[int]]

    @property
    def nodes(self) -> list[int]:
        return sorted(self.neighbours)

    def degree(self) -> int:
        return min(len(v) for v in self.neighbours.values())


def harary(order: Sequence[int], k: int) -> Graph:
    """The k-regular Harary graph on ``order`` (k even, or k = n - 1 for the complete graph)."""
    n = len(order)
    if len(set(order)) != n:
        raise GraphError("node ids must be distinct")
    if not 1 <= k <= n - 1:
        raise GraphError(f"degree k must be in [1, {n - 1}] for {n} clients, got {k}")
    if k == n - 1:
        return Graph({u: frozenset(set(order) - {u}) for u in order})
    if k % 2:
        raise GraphError(f"degree k must be even below n - 1, got {k}")
    half = k // 2
    nbrs = {
        u: frozenset(order[(i + d) % n] for d in range(-half, half + 1) if d != 0)
        for i, u in enumerate(order)
    }
    return Graph(nbrs)


def random_graph(nodes: Sequence[int], k: int) -> Graph:
    """A Harary graph over a uniformly random ordering of ``nodes`` (OS randomness)."""
    order = list(nodes)
    for i in range(len(order) - 1, 0, -1):  # Fisher-Yates with the OS CSPRNG
        j = secrets.randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return harary(order, k)
