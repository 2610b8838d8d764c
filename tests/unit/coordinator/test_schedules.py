from __future__ import annotations

import itertools
import math

import pytest

from coordinator.config import RunConfig
from coordinator.schedules import LrSchedule, round_learning_rate


def test_constant_is_the_rate_every_round() -> None:
    rates = [round_learning_rate(LrSchedule.CONSTANT, r, 4, 3e-3, 1e-4) for r in range(1, 5)]
    assert rates == [3e-3] * 4


def test_cosine_values() -> None:
    # Over 3 rounds: cos(0), cos(pi/3), cos(2pi/3) -> weights 1, 0.75, 0.25 of (lr - min).
    rates = [round_learning_rate(LrSchedule.COSINE, r, 3, 8e-3, 1e-3) for r in (1, 2, 3)]
    assert rates == pytest.approx([8e-3, 1e-3 + 7e-3 * 0.75, 1e-3 + 7e-3 * 0.25], abs=1e-15)
    # The last of 10 rounds still trains: above the minimum of 0.
    last = round_learning_rate(LrSchedule.COSINE, 10, 10, 8e-3, 0.0)
    assert last == pytest.approx(0.5 * 8e-3 * (1 + math.cos(0.9 * math.pi)), rel=1e-12)
    assert last > 0
    # One round: the full rate; a round past the planned ones stays at the minimum.
    assert round_learning_rate(LrSchedule.COSINE, 1, 1, 8e-3, 0.0) == 8e-3
    assert round_learning_rate(LrSchedule.COSINE, 7, 5, 8e-3, 1e-4) == pytest.approx(1e-4)


def test_cosine_decreases_monotonically() -> None:
    rates = [round_learning_rate(LrSchedule.COSINE, r, 20, 1e-2, 1e-3) for r in range(1, 21)]
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert rates[0] == 1e-2 and rates[-1] > 1e-3


def test_the_train_instruction_carries_the_round_s_rate() -> None:
    cfg = RunConfig.from_mapping(
        {"rounds": 3, "learning-rate": 8e-3, "lr-schedule": "cosine", "min-learning-rate": 1e-3}
    )
    sent = [cfg.train_instruction(r).learning_rate for r in (1, 2, 3)]
    assert sent == [round_learning_rate(LrSchedule.COSINE, r, 3, 8e-3, 1e-3) for r in (1, 2, 3)]
    assert sent[0] > sent[1] > sent[2]
    assert RunConfig().train_instruction(2).learning_rate == 1e-3  # constant by default
