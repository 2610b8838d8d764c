"""The clients' learning rate across rounds: a pure function of the round, so a resumed run
sends the rate an uninterrupted one would (no state to save)."""

from __future__ import annotations

import math

from client.defaults import Choice


class LrSchedule(Choice):
    """How the clients' AdamW learning rate changes from round to round.

    ``constant``: ``--learning-rate`` every round. ``cosine``: half a cosine from
    ``--learning-rate`` in round 1 toward ``--min-learning-rate`` after the last round (the
    annealing of FlowerTune's and OpenFedLLM's LLM recipes); the last round's rate stays above
    the minimum, so every round trains."""

    CONSTANT = "constant"
    COSINE = "cosine"


def round_learning_rate(
    schedule: LrSchedule, rnd: int, rounds: int, lr: float, min_lr: float
) -> float:
    """The clients' learning rate in round ``rnd`` (1-based) of ``rounds``."""
    if schedule is LrSchedule.CONSTANT:
        return lr
    progress = (rnd - 1) / max(1, rounds)
    return lr - (lr - min_lr) * 0.5 * (1.0 - math.cos(math.pi * min(progress, 1.0)))
