"""Bounded influence in plaintext rounds (issue 12, item 2): one hostile client among honest ones
over the real round loop (FakeGrid, virtual time), and the robust aggregators as options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MessageType
from safetensors.numpy import load_file

from coordinator.aggregators import Bounds, UpdateOutOfBounds, default_norm_bound
from coordinator.config import ConfigError, RunConfig
from coordinator.progress import Progress
from protocol.messages import (
    ClientUpdate,
    EvalResult,
    decode_eval_instruction,
    decode_train_instruction,
    encode_eval_result,
    encode_update,
)
from tests.fakegrid import FakeGrid, run_virtual
from tests.unit.coordinator.test_rounds import NODES, cfg_for


def node(i: int, *, value: Any = None, examples: int | None = None):  # type: ignore[no-untyped-def]
    """Honest: delta 1e-3 * (i + 1) everywhere, 10 examples. Hostile: ``value`` and/or
    ``examples`` instead."""

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            ei, _ = decode_eval_instruction(msg.content)
            return Message(encode_eval_result(EvalResult(1.0, 10, 1), rnd=ei.round), reply_to=msg)
        instr, adapter = decode_train_instruction(msg.content)
        v = 1e-3 * (i + 1) if value is None else value
        delta = {k: np.full_like(a, v) for k, a in adapter.items()}
        up = ClientUpdate(delta, examples or 10, {"train-loss": 1.0})
        return Message(encode_update(up, rnd=instr.round), reply_to=msg)

    return handle


def run(tiny: Path, cache: Path, out: Path, hostile: Any, rounds: int = 1, **kw: Any) -> list[dict]:  # type: ignore[type-arg]
    handlers = {n: node(i) for i, n in enumerate(NODES[:3])}
    handlers[NODES[3]] = hostile
    # max-update-norm 0: the automatic bound (4 x lr x local steps x sqrt(trained values)).
    values = {"clients-per-round": 4, "max-update-norm": 0.0, **kw}
    cfg = cfg_for(tiny, cache, out, rounds=rounds, **values)
    return run_virtual(FakeGrid(handlers), cfg, out, progress=Progress(rounds, live=False))


def deltas(out: Path, tiny: Path, cache: Path) -> np.ndarray:
    from client.model import Quantization, attach_lora, get_adapter, load_base, resolve_model

    base = load_base(resolve_model(str(tiny)), Quantization.NONE, cache)
    g = get_adapter(attach_lora(base.model, RunConfig.from_mapping({"lora-rank": 2}).lora, seed=0))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return np.concatenate([(saved[k] - g[k]).ravel() for k in g])


@pytest.mark.parametrize("value", [1e30, float(np.finfo(np.float32).max), 1e3, 1e37])
def test_a_huge_update_is_rejected_and_the_round_goes_on(
    value: float, tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    rows = run(tiny_model_dir, model_cache, tmp_path / "r", node(3, value=value), rounds=2)
    for r in rows[1:]:
        assert r["status"] == "ok" and r["clients_ok"] == 3
        (f,) = r["failures"]
        assert f["client"] == str(NODES[3]) and "exceeds max-update-norm" in f["reason"]
    d = deltas(tmp_path / "r", tiny_model_dir, model_cache)
    assert np.isfinite(d).all()
    # Two rounds of the honest mean: (1 + 2 + 3) / 3 * 1e-3 each.
    np.testing.assert_allclose(d, 2 * 2e-3, rtol=1e-4)


def test_a_huge_example_count_is_capped(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """2^63 - 1 examples would make the attacker's delta the aggregate; capped at 40 (the
    run's max-client-weight) it weighs 40 against 3 x 10."""
    hostile = node(3, value=-5e-3, examples=2**63 - 1)
    rows = run(tiny_model_dir, model_cache, tmp_path / "r", hostile, **{"max-client-weight": 40})
    r = rows[1]
    assert r["status"] == "ok" and r["clients_ok"] == 4 and r["weights_capped"] == [str(NODES[3])]
    d = deltas(tmp_path / "r", tiny_model_dir, model_cache)
    want = (10 * 1e-3 + 10 * 2e-3 + 10 * 3e-3 + 40 * -5e-3) / 70
    np.testing.assert_allclose(d, want, rtol=1e-4)


@pytest.mark.parametrize(
    ("aggregator", "extra", "want"),
    [
        ("median", {}, np.median([1e-3, 2e-3, 3e-3, 0.9e-2])),
        ("trimmed-mean", {"trim-fraction": 0.25}, (2e-3 + 3e-3) / 2),
        ("krum", {"krum-byzantine": 0}, 2e-3),  # the update closest to its neighbours
        # the 3 best scored are the honest ones: their mean
        ("multi-krum", {"krum-byzantine": 0, "krum-select": 3}, 2e-3),
    ],
)
def test_robust_aggregators_through_the_round(
    aggregator: str,
    extra: dict[str, Any],
    want: float,
    tiny_model_dir: Path,
    model_cache: Path,
    tmp_path: Path,
) -> None:
    hostile = node(3, value=0.9e-2)  # within the norm bound, far from the others
    rows = run(tiny_model_dir, model_cache, tmp_path / "r", hostile, aggregator=aggregator,
               **extra)  # fmt: skip
    assert rows[1]["status"] == "ok" and rows[1]["clients_ok"] == 4
    d = deltas(tmp_path / "r", tiny_model_dir, model_cache)
    np.testing.assert_allclose(d, want, rtol=1e-4)


def test_a_robust_rule_that_cannot_run_fails_the_round_cleanly(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    rows = run(tiny_model_dir, model_cache, tmp_path / "r", node(3), aggregator="krum",
               **{"krum-byzantine": 1})  # fmt: skip
    r = rows[1]
    assert r["status"] == "failed" and "needs at least 2f + 3 = 5 updates, got 4" in r["reason"]
    assert np.abs(deltas(tmp_path / "r", tiny_model_dir, model_cache)).max() == 0.0


def test_bounds_unit() -> None:
    b = Bounds(max_weight=5, max_norm=1.0)
    up, w = b.apply({"a": np.full(4, 0.5, np.float32)}, 9.0)  # norm exactly 1: kept
    assert w == 5.0 and up["a"].tolist() == [0.5] * 4
    with pytest.raises(UpdateOutOfBounds, match="exceeds max-update-norm 1"):
        b.apply({"a": np.full(4, 0.51, np.float32)}, 1.0)
    assert default_norm_bound(1e-3, 6, 460_800) == pytest.approx(4 * 1e-3 * 6 * 460_800**0.5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"aggregator": "median", "secagg": True}, "aggregator: 'median' needs each client's"),
        (
            {"aggregator": "krum", "dp": "client", "noise-multiplier": 1.0},
            "aggregator: 'krum' is not a clipped sum",
        ),
        ({"aggregator": "mode"}, "aggregator: 'mode' is not one of mean, median"),
        ({"max-update-norm": -1}, "max-update-norm: must be >= 0"),
        ({"trim-fraction": 0.5}, "trim-fraction: must be in [0, 0.5)"),
    ],
)
def test_robust_options_refused_where_they_cannot_work(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert str(err.value).startswith(message), str(err.value)
