"""Strategies through the whole round loop (FakeGrid, virtual time): resume equality for the
stateful ones, SCAFFOLD's control variates on the wire, FedProx on the wire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MessageType

from coordinator.progress import Progress
from coordinator.rundir import RunDirError
from protocol import keys
from protocol.messages import (
    ClientUpdate,
    EvalResult,
    decode_eval_instruction,
    decode_server_control,
    decode_train_instruction,
    encode_eval_result,
    encode_update,
)
from tests.fakegrid import FakeGrid, run_virtual
from tests.unit.coordinator.test_rounds import NODES, cfg_for


class Fleet:
    """Synthetic clients whose update depends on the global adapter (a step towards their own
    target), with SCAFFOLD's client control variate kept per client across runs, as a device's
    state directory would."""

    def __init__(self) -> None:
        self.client_control: dict[int, dict[str, np.ndarray]] = {}
        self.mu_seen: list[float] = []

    def handler(self, i: int, node: int):  # type: ignore[no-untyped-def]
        def handle(msg: Message) -> Message | None:
            if msg.metadata.message_type == MessageType.EVALUATE:
                ei, adapter = decode_eval_instruction(msg.content)
                loss = float(sum(np.sum((v - (i + 1)) ** 2) for v in adapter.values()))
                res = EvalResult(loss, 10, 1)
                return Message(encode_eval_result(res, rnd=ei.round), reply_to=msg)
            instr, adapter = decode_train_instruction(msg.content)
            self.mu_seen.append(instr.proximal_mu)
            delta = {k: (0.1 * ((i + 1) - v)).astype(np.float32) for k, v in adapter.items()}
            c = decode_server_control(msg.content, instr, adapter)
            if c is not None:
                old = self.client_control.get(node, {k: np.zeros_like(v) for k, v in c.items()})
                new = {k: (v - (i + 1)).astype(np.float32) for k, v in adapter.items()}
                self.client_control[node] = new
                delta.update({keys.CONTROL_PREFIX + k: new[k] - old[k] for k in new})
            up = ClientUpdate(delta, 10 * (i + 1), {"train-loss": 1.0})
            return Message(encode_update(up, rnd=instr.round), reply_to=msg)

        return handle

    def grid(self) -> FakeGrid:
        return FakeGrid({n: self.handler(i, n) for i, n in enumerate(NODES)})


def run(tiny: Path, cache: Path, out: Path, fleet: Fleet, rounds: int, **kw: Any) -> list[dict]:  # type: ignore[type-arg]
    """``rounds`` rounds in ``out``, resuming the run already there."""
    cfg = cfg_for(tiny, cache, out, rounds=rounds, **{"clients-per-round": 2, **kw})
    resume = (out / "state.json").exists()
    return run_virtual(fleet.grid(), cfg, out, resume=resume, progress=Progress(rounds, live=False))


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold", "fedavgm"])
def test_resume_after_a_kill_ends_with_the_same_adapter_bytes(
    strategy: str, tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """Uninterrupted 4 rounds == 2 rounds, a coordinator restart, then --resume to 4: the
    optimizer moments / server control variate come back from the round state."""
    kw = {"strategy": strategy}
    full = run(tiny_model_dir, model_cache, tmp_path / "a", Fleet(), 4, **kw)
    fleet = Fleet()
    run(tiny_model_dir, model_cache, tmp_path / "b", fleet, 2, **kw)
    resumed = run(tiny_model_dir, model_cache, tmp_path / "b", fleet, 4, **kw)
    assert [r["status"] for r in full[1:]] == ["ok"] * 4
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    assert adapter_bytes(tmp_path / "a") == adapter_bytes(tmp_path / "b")
    for ra, rb in zip(full, resumed, strict=True):
        assert ra["eval_loss"] == rb["eval_loss"] and ra.get("update_norm") == rb.get("update_norm")
    # The state is needed and checked: a run directory that lost it does not resume.
    fleet = Fleet()
    run(tiny_model_dir, model_cache, tmp_path / "c", fleet, 2, **kw)
    (tmp_path / "c" / "server-state.safetensors").unlink()
    with pytest.raises(RunDirError, match=r"server-state\.safetensors is missing"):
        run(tiny_model_dir, model_cache, tmp_path / "c", fleet, 4, **kw)


def test_fedprox_mu_reaches_clients_only_under_fedprox(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    fleet = Fleet()
    run(tiny_model_dir, model_cache, tmp_path / "a", fleet, 1, strategy="fedprox",
        **{"proximal-mu": 0.3})  # fmt: skip
    assert fleet.mu_seen == [0.3, 0.3]
    plain = Fleet()
    run(tiny_model_dir, model_cache, tmp_path / "b", plain, 1, **{"proximal-mu": 0.3})
    assert plain.mu_seen == [0.0, 0.0]
