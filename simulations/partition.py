"""Split one dataset into client shards: IID, Dirichlet over a label column, or natural.

All partitioners are pure functions of (rows or labels, number of clients, seed) returning one
sorted index array per client; shards are disjoint and together cover every row.

Spec strings (``--partition``):

* ``iid``                      -- shuffle, then equal-size shards;
* ``dirichlet:COLUMN:ALPHA``   -- for each value of COLUMN, split its rows over clients with
  proportions drawn from Dirichlet(ALPHA) (small ALPHA = more skew; Hsu et al. 2019);
* ``natural:COLUMN``           -- one client per distinct value of COLUMN (num-clients follows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Kind = Literal["iid", "dirichlet", "natural"]


@dataclass(frozen=True)
class PartitionSpec:
    kind: Kind
    column: str | None = None
    alpha: float | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        parts = text.split(":")
        kind = parts[0]
        if kind == "iid" and len(parts) == 1:
            return cls("iid")
        if kind == "natural" and len(parts) == 2 and parts[1]:
            return cls("natural", column=parts[1])
        if kind == "dirichlet" and len(parts) == 3 and parts[1]:
            try:
                alpha = float(parts[2])
            except ValueError:
                raise ValueError(
                    f"partition: alpha {parts[2]!r} in {text!r} is not a number"
                ) from None
            if not alpha > 0:
                raise ValueError(f"partition: alpha must be > 0, got {alpha} in {text!r}")
            return cls("dirichlet", column=parts[1], alpha=alpha)
        raise ValueError(
            f"partition: {text!r} is not one of 'iid', 'dirichlet:COLUMN:ALPHA', 'natural:COLUMN'"
        )

    def __str__(self) -> str:
        if self.kind == "iid":
            return "iid"
        if self.kind == "natural":
            return f"natural:{self.column}"
        return f"dirichlet:{self.column}:{self.alpha}"


def iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    _check_clients(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(s) for s in np.array_split(perm, num_clients)]


def natural(labels: Sequence[Any]) -> tuple[list[str], list[np.ndarray]]:
    """One shard per distinct label, in sorted label order. Returns (label names, shards)."""
    arr = np.asarray([str(x) for x in labels])
    names = sorted(set(arr.tolist()))
    return names, [np.flatnonzero(arr == name) for name in names]


def dirichlet(
    labels: Sequence[Any], num_clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label-skewed shards. Redraws (up to 100 times) until every client has ``min_size`` rows."""
    n = len(labels)
    _check_clients(n, num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    arr = np.asarray([str(x) for x in labels])
    classes = sorted(set(arr.tolist()))
    rng = np.random.default_rng(seed)
    for _ in range(100):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(arr == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise ValueError(
        f"partition: Dirichlet(alpha={alpha}) could not give each of {num_clients} clients "
        f"{min_size} row(s) from {n} rows; use fewer clients or a larger alpha"
    )


def _check_clients(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients: must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"num_clients: {num_clients} clients but only {n} rows to share")


def partition(
    records: Sequence[dict[str, Any]], spec: PartitionSpec, num_clients: int | None, seed: int
) -> tuple[list[str], list[np.ndarray]]:
    """Apply ``spec`` to ``records``. Returns (client names, index shards)."""
    if spec.kind == "iid":
        if num_clients is None:
            raise ValueError("num_clients: required with partition 'iid'")
        shards = iid(len(records), num_clients, seed)
        return [f"client-{i:03d}" for i in range(num_clients)], shards
    assert spec.column is not None
    labels = []
    for i, r in enumerate(records):
        if spec.column not in r:
            columns = ", ".join(sorted(r))
            raise ValueError(
                f"partition: row {i + 1} has no column {spec.column!r} (columns: {columns})"
            )
        labels.append(r[spec.column])
    if spec.kind == "natural":
        names, shards = natural(labels)
        if num_clients is not None and num_clients != len(names):
            raise ValueError(
                f"num_clients: partition {spec} gives {len(names)} clients (one per "
                f"{spec.column}), but --num-clients is {num_clients}"
            )
        return names, shards
    if num_clients is None:
        raise ValueError(f"num_clients: required with partition {spec}")
    assert spec.alpha is not None
    shards = dirichlet(labels, num_clients, spec.alpha, seed)
    return [f"client-{i:03d}" for i in range(num_clients)], shards
