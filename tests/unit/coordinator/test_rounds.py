from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType, RecordDict
from peft import PeftModel
from safetensors.numpy import load_file

from client.model import Quantization, load_base, resolve_model
from coordinator.config import RunConfig
from coordinator.progress import Progress
from coordinator.rounds import FederationError, sample_nodes
from coordinator.rundir import RunDirError
from protocol.messages import (
    ClientUpdate,
    EvalResult,
    decode_eval_instruction,
    decode_train_instruction,
    encode_eval_result,
    encode_update,
)
from tests.fakegrid import FakeGrid, run_virtual

NODES = [101, 2**63 + 5, 303, 404]  # ids are unsigned 64-bit in Flower


def client(node_index: int, *, bad: str | None = None):  # type: ignore[no-untyped-def]
    """A synthetic client: delta = (index + 1) everywhere, num-examples = 10 * (index + 1)."""

    def handle(msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.EVALUATE:
            ev_instr, _ = decode_eval_instruction(msg.content)
            res = EvalResult(
                loss=1.0 + node_index, num_tokens=100 * (node_index + 1), num_examples=5
            )
            return Message(encode_eval_result(res, rnd=ev_instr.round), reply_to=msg)
        instr, adapter = decode_train_instruction(msg.content)
        if bad == "silent":
            return None
        if bad == "error":
            return Message(Error(code=1, reason="CUDA out of memory"), reply_to=msg)
        if bad == "garbage":
            return Message(RecordDict(), reply_to=msg)
        value = np.nan if bad == "nan" else float(node_index + 1)
        delta = {k: np.full_like(v, value) for k, v in adapter.items()}
        up = ClientUpdate(
            delta=delta, num_examples=10 * (node_index + 1), metrics={"train-loss": 2.0}
        )
        return Message(encode_update(up, rnd=instr.round), reply_to=msg)

    return handle


def cfg_for(tiny_model_dir: Path, cache: Path, out: Path, **kw) -> RunConfig:  # type: ignore[no-untyped-def]
    values = {
        "model": str(tiny_model_dir),
        "quantization": "none",
        "cache-dir": str(cache),
        "output-dir": str(out),
        "rounds": 2,
        "clients-per-round": 4,
        "min-clients": 2,
        "round-timeout": 1.0,
        # The synthetic clients send deltas of 1..4 per value, far above the automatic
        # max-update-norm; these tests are about the round loop (tests/unit/coordinator/
        # test_bounds.py tests the bound).
        "max-update-norm": 1e6,
        "node-wait-timeout": 1.0,
        "lora-rank": 2,
        **kw,
    }
    return RunConfig.from_mapping(values)


def test_round_loop_aggregates_rejects_and_records(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    handlers = {
        NODES[0]: client(0),
        NODES[1]: client(1),
        NODES[2]: client(2, bad="nan"),
        NODES[3]: client(3, bad="silent"),
    }
    grid = FakeGrid(handlers)
    cfg = cfg_for(tiny_model_dir, model_cache, tmp_path / "run")
    rows = run_virtual(grid, cfg, tmp_path / "run", progress=Progress(2, live=False))

    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        for key in (
            "round",
            "train_loss",
            "eval_loss",
            "clients_sampled",
            "clients_ok",
            "bytes_down",
            "bytes_up",
            "seconds",
        ):
            assert key in r, key
    assert rows[0]["train_loss"] is None and rows[0]["clients_sampled"] == 0
    r1 = rows[1]
    assert r1["clients_sampled"] == 4 and r1["clients_ok"] == 2 and r1["status"] == "ok"
    # These clients do not answer the identity query: they are named by node id.
    reasons = {f["client"]: f["reason"] for f in r1["failures"]}
    assert "NaN or infinite" in reasons[str(NODES[2])]
    assert reasons[str(NODES[3])] == "no reply within 1s"
    # eval: token-weighted mean of the losses 1,2,3,4 with weights 100..400
    assert r1["eval_loss"] == pytest.approx((1 * 100 + 2 * 200 + 3 * 300 + 4 * 400) / 1000)
    assert r1["bytes_down"] > 0 and r1["bytes_up"] > 0

    # Two rounds of FedAvg over clients 0 and 1: each adds (1*10 + 2*20) / 30 = 5/3.
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    from client.model import attach_lora, get_adapter

    initial = get_adapter(attach_lora(base.model, cfg.lora, seed=cfg.seed))
    for k in initial:
        np.testing.assert_allclose(saved[k], initial[k] + 2 * 5 / 3, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["round"] == 2
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["rounds"] == 2


def test_round_fails_below_min_clients_and_keeps_the_adapter(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    grid = FakeGrid(
        {NODES[0]: client(0), NODES[1]: client(1, bad="error"), NODES[2]: client(2, bad="garbage")}
    )
    cfg = cfg_for(
        tiny_model_dir, model_cache, tmp_path / "run", rounds=1, **{"clients-per-round": 3}
    )
    rows = run_virtual(grid, cfg, tmp_path / "run", progress=Progress(1, live=False))
    r1 = rows[1]
    assert r1["status"] == "failed" and "1 usable update(s), min-clients is 2" in r1["reason"]
    reasons = {f["client"]: f["reason"] for f in r1["failures"]}
    assert reasons[str(NODES[1])] == "CUDA out of memory"
    assert "record 'reply-meta' is missing" in reasons[str(NODES[2])]
    # The failed round kept the adapter: the saved one is the untrained initialisation.
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    from client.model import attach_lora, get_adapter

    initial = get_adapter(attach_lora(base.model, cfg.lora, seed=cfg.seed))
    assert set(saved) == set(initial) and initial
    for k in initial:
        np.testing.assert_array_equal(saved[k], initial[k])


def test_resume_continues_after_the_last_saved_round(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES[:2])})
    cfg = cfg_for(tiny_model_dir, model_cache, out, rounds=1, **{"clients-per-round": 2})
    run_virtual(grid, cfg, out, progress=Progress(1, live=False))
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        run_virtual(grid, cfg, out, progress=Progress(1, live=False))
    changed = cfg_for(
        tiny_model_dir, model_cache, out, rounds=3, **{"clients-per-round": 2, "lora-rank": 4}
    )
    with pytest.raises(RunDirError, match="setting 'lora-rank' was 2, now 4"):
        run_virtual(grid, changed, out, resume=True)
    more = cfg_for(tiny_model_dir, model_cache, out, rounds=3, **{"clients-per-round": 2})
    rows = run_virtual(grid, more, out, resume=True, progress=Progress(3, live=False))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    train_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert sorted({m.metadata.group_id for m in train_msgs}) == ["1", "2", "3"]
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    from client.model import attach_lora, get_adapter

    initial = get_adapter(attach_lora(base.model, more.lora, seed=0))
    k = next(iter(initial))
    np.testing.assert_allclose(saved[k], initial[k] + 3 * 5 / 3, rtol=1e-5, atol=1e-5)


def test_each_round_sends_its_scheduled_learning_rate(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES[:2])})
    sched = {"clients-per-round": 2, "learning-rate": 8e-3, "lr-schedule": "cosine",
             "min-learning-rate": 1e-3}  # fmt: skip
    cfg = cfg_for(tiny_model_dir, model_cache, tmp_path / "run", rounds=3, **sched)
    run_virtual(grid, cfg, tmp_path / "run", progress=Progress(3, live=False))
    sent: dict[int, set[float]] = {}
    for m in grid.sent:
        if m.metadata.message_type == MessageType.TRAIN:
            instr, _ = decode_train_instruction(m.content)
            sent.setdefault(instr.round, set()).add(instr.learning_rate)
    # Every client of a round gets the same rate: 8e-3, then 1e-3 + 7e-3 * (0.75, 0.25).
    assert sorted(sent) == [1, 2, 3] and all(len(rates) == 1 for rates in sent.values())
    got = [sent[r].pop() for r in (1, 2, 3)]
    assert got == pytest.approx([8e-3, 1e-3 + 7e-3 * 0.75, 1e-3 + 7e-3 * 0.25], abs=1e-15)


def test_not_enough_nodes_is_a_clear_error(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    grid = FakeGrid({NODES[0]: client(0)})
    cfg = cfg_for(tiny_model_dir, model_cache, tmp_path / "run")
    with pytest.raises(FederationError, match="only 1 client node"):
        run_virtual(grid, cfg, tmp_path / "run", progress=Progress(2, live=False))


def test_saved_adapter_loads_with_peft(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES[:2])})
    cfg = cfg_for(
        tiny_model_dir, model_cache, tmp_path / "run", rounds=1, **{"clients-per-round": 2}
    )
    run_virtual(grid, cfg, tmp_path / "run", progress=Progress(1, live=False))
    from client.model import attach_lora, get_adapter

    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    initial = get_adapter(attach_lora(base.model, cfg.lora, seed=cfg.seed))
    fresh = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = PeftModel.from_pretrained(fresh.model, str(tmp_path / "run" / "adapter"))
    got = get_adapter(model)
    # What PEFT loads is the round's FedAvg result: the initial adapter + (1*10 + 2*20) / 30.
    assert set(got) == set(initial) and initial
    for k in initial:
        np.testing.assert_allclose(got[k], initial[k] + 5 / 3, rtol=1e-6, atol=1e-6)


def test_sampling_is_seeded_and_handles_large_ids() -> None:
    a = sample_nodes(NODES, 2, seed=1, stream=5)
    # Indices into the given (stable) order are drawn: the same positions whatever the ids.
    positions = [NODES.index(n) for n in a]
    rev = list(reversed(NODES))
    assert [rev.index(n) for n in sample_nodes(rev, 2, seed=1, stream=5)] == positions
    assert positions == sorted(positions)  # the picks keep the given order
    assert len(set(a)) == 2 and set(a) <= set(NODES)
    picks = {tuple(sample_nodes(NODES, 2, seed=1, stream=r)) for r in range(20)}
    assert len(picks) > 1
    assert sample_nodes(NODES, 10, seed=0, stream=1) == NODES


def test_client_memory_rows_name_each_clients_plan_and_peak() -> None:
    from coordinator.pipeline import client_memory

    planned = {"peak-rss-mb": 690.5, "max-memory-mb": 1024.0, "weight-bits": 4.0,
               "compute-bits": 16.0, "plan-micro-batch": 2.0, "plan-accumulation": 2.0,
               "plan-checkpointing": 1.0, "plan-estimated-mb": 700.0,
               "train-loss": 1.0}  # fmt: skip
    rows = client_memory({9: {"peak-rss-mb": 2000.0}, 4: planned})
    assert rows == [
        {"node": 4, "peak_rss_mb": 690.5, "max_memory_mb": 1024.0, "weight_bits": 4.0,
         "compute_bits": 16.0, "micro_batch": 2.0, "accumulation": 2.0, "checkpointing": True,
         "estimated_mb": 700.0},
        {"node": 9, "peak_rss_mb": 2000.0},
    ]  # fmt: skip
