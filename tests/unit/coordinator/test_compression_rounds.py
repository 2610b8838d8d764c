"""Update codecs and per-client ranks through the real round loop (``run_virtual``): real
ClientApps training the tiny model behind ``FakeGrid``, plaintext and under secure aggregation.

- secagg + sketch gives the adapter plaintext sketch gives, within the fixed-point error;
- error feedback: the residual a client stores after round 1 is the one it adds in round 2,
  across a restart of the coordinator and the client processes;
- mixed ranks: each client is sent and trains its rank's slice; the new adapter is the
  per-component weighted mean of the clients' decoded updates (numpy reference), and secagg
  gives the same within the fixed-point error;
- bytes are measured: metrics rows carry bytes_up_ratio against fp32 at the global rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from safetensors.numpy import load_file

from client import app as client_app
from client import error_feedback
from coordinator.config import RunConfig
from coordinator.progress import Progress
from protocol import keys
from protocol.adapter import AdapterSpec
from protocol.codecs import CompressionConfig
from protocol.messages import decode_train_instruction, decode_update
from protocol.ranks import flexlora, mixed_rank_mean
from tests.fakegrid import FakeGrid, run_virtual

NODES = [2**63 + 7, 101, 5003]  # partition-0, -1, -2 (clients are ordered by name)


@pytest.fixture(autouse=True)
def _fresh_client_processes() -> None:
    client_app.load_resident.cache_clear()
    client_app._LOADED.clear()


class RealFleet:
    """One real ClientApp per node (own data shard, own state directory), recording every
    message in both directions."""

    def __init__(self, root: Path, tiny_model_dir: Path, model_cache: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.app = client_app.make_client_app()
        self.contexts: dict[int, Context] = {}
        self.log: list[tuple[int, Message, Message]] = []
        for i, node in enumerate(NODES):
            data = root / f"shard{i}.jsonl"
            rows = [
                {"instruction": f"What is {i} times {j}?", "response": f"It is {i * j} today."}
                for j in range(24)
            ]
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            self.contexts[node] = Context(
                run_id=1,
                node_id=node,
                node_config={
                    "data-path": str(data),
                    "state-dir": str(root / f"state{i}"),
                    "partition-id": i,
                },
                state=RecordDict(),
                run_config={
                    "model": str(tiny_model_dir),
                    "quantization": "none",
                    "cache-dir": str(model_cache),
                },
            )

    def restart(self) -> None:
        """New client processes: no cached model, a new app; the state directories stay."""
        client_app.load_resident.cache_clear()
        self.app = client_app.make_client_app()
        for ctx in self.contexts.values():
            ctx.state = RecordDict()

    def grid(self) -> FakeGrid:
        def handler(node: int):  # type: ignore[no-untyped-def]
            def handle(msg: Message) -> Message:
                reply = self.app(msg, self.contexts[node])
                self.log.append((node, msg, reply))
                return reply

            return handle

        return FakeGrid({n: handler(n) for n in NODES})

    def trains(self, rnd: int) -> list[tuple[int, Message, Message]]:
        """Round ``rnd``'s train messages (plain, or the first secure-aggregation stage)."""
        kinds = (MessageType.TRAIN, f"{MessageType.TRAIN}.{keys.SECAGG_ACTIONS[0]}")
        return [
            (n, m, r)
            for n, m, r in self.log
            if m.metadata.message_type in kinds and m.metadata.group_id == str(rnd)
        ]

    def start_adapter(self, rnd: int) -> dict[str, np.ndarray]:
        """The global adapter round ``rnd`` started from (the largest slice sent)."""
        sent = [decode_train_instruction(m.content)[1] for _n, m, _r in self.trains(rnd)]
        return max(sent, key=lambda a: sum(v.size for v in a.values()))


def config(tiny_model_dir: Path, model_cache: Path, out: Path, **kw: Any) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "model": str(tiny_model_dir),
            "quantization": "none",
            "cache-dir": str(model_cache),
            "output-dir": str(out),
            "rounds": 1,
            "clients-per-round": 3,
            "min-clients": 3,
            "eval-clients": 1,
            "local-steps": 2,
            "batch-size": 4,
            "seq-len": 48,
            "lora-rank": 2,
            "learning-rate": 0.01,
            "round-timeout": 10.0,
            "node-wait-timeout": 1.0,
            **kw,
        }
    )


def run(fleet: RealFleet, cfg: RunConfig, out: Path, **kw: Any) -> list[dict[str, Any]]:
    return run_virtual(fleet.grid(), cfg, out, progress=Progress(cfg.rounds, live=False), **kw)


def adapter_of(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------ sketch


@pytest.mark.parametrize(
    "ring",
    [{}, {"secagg-ring-bits": 16, "secagg-weight-cap": 32}],
    ids=["32-bit", "16-bit"],
)
def test_secagg_sketch_equals_plaintext_sketch_within_encoding_error(
    ring: dict[str, int], tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    sketch = {"compress": "sketch", "sketch-ratio": 0.5}
    plain_out, secure_out = tmp_path / "plain", tmp_path / "secure"
    plain = RealFleet(tmp_path / "p", tiny_model_dir, model_cache)
    rows = run(plain, config(tiny_model_dir, model_cache, plain_out, **sketch), plain_out)
    secure = RealFleet(tmp_path / "s", tiny_model_dir, model_cache)
    cfg = config(tiny_model_dir, model_cache, secure_out, secagg=True, **sketch, **ring)
    srows = run(secure, cfg, secure_out)

    r, s = rows[1], srows[1]
    assert r["status"] == s["status"] == "ok" and r["clients_ok"] == s["clients_ok"] == 3
    assert r["compress"] == s["compress"] == "sketch"
    # plaintext: each reply is a float32 sketch of half the values (+ npy headers and meta)
    assert 0.45 < r["bytes_up_ratio"] < 0.75, r["bytes_up_ratio"]
    step, bits = s["secagg"]["step"], s["secagg"]["ring_bits"]
    assert bits == (cfg.secagg_ring_bits or 32)
    masked = [
        reply.content[keys.SECAGG_MASKED]["masked"]
        for _n, msg, reply in secure.log
        if msg.metadata.message_type.endswith(keys.SECAGG_ACTIONS[2])
    ]
    assert len(masked) == 3 and all(m.dtype == f"uint{bits}" for m in masked)
    a, b = adapter_of(plain_out), adapter_of(secure_out)
    init = plain.start_adapter(1)
    moved = max(float(np.abs(a[k] - init[k]).max()) for k in a)
    assert moved > 1e-3  # the clients did train
    # Each decoded value reads one cell (rows 1): the sum of 3 clients' cells is off by < 3
    # steps, divided by the total weight fraction (examples / weight-cap).
    total = r["num_examples"]
    bound = 3 * step * cfg.secagg_weight_cap / total
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=bound + 1e-6, rtol=0)
    # and the plaintext run is a sketch, not the exact mean: decoding error is visible
    exact = RealFleet(tmp_path / "e", tiny_model_dir, model_cache)
    exact_out = tmp_path / "exact"
    run(exact, config(tiny_model_dir, model_cache, exact_out), exact_out)
    c = adapter_of(exact_out)
    assert max(float(np.abs(c[k] - a[k]).max()) for k in a) > 10 * bound


# ---------------------------------------------------------------------------- error feedback


def test_error_feedback_carries_the_residual_across_rounds_and_a_restart(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    real = error_feedback.encode_delta

    def spy(codec, delta, rng, *, state_dir=None):  # type: ignore[no-untyped-def]
        assert state_dir is not None, "error feedback is on: the state directory is passed"
        path = error_feedback.residual_path(state_dir)
        before = error_feedback.load_residual(path, AdapterSpec.of(delta))
        payload = real(codec, delta, rng, state_dir=state_dir)
        after = error_feedback.load_residual(path, AdapterSpec.of(delta))
        seen.append(
            {"dir": state_dir, "delta": delta, "before": before, "after": after, "codec": codec,
             "payload": payload}
        )  # fmt: skip
        return payload

    monkeypatch.setattr(client_app, "encode_delta", spy)
    out = tmp_path / "run"
    fleet = RealFleet(tmp_path / "f", tiny_model_dir, model_cache)
    opts = {"compress": "int4", "error-feedback": True}
    rows = run(fleet, config(tiny_model_dir, model_cache, out, **opts), out)
    assert rows[1]["status"] == "ok" and rows[1]["compress"] == "int4"
    assert rows[1]["bytes_up_ratio"] < 0.3
    first = {str(e["dir"]): e for e in seen}
    assert len(first) == 3 and all(e["before"] is None for e in first.values())

    fleet.restart()  # coordinator and client processes start again; state dirs remain
    seen.clear()
    more = config(tiny_model_dir, model_cache, out, rounds=2, **opts)
    rows = run(fleet, more, out, resume=True)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["status"] == "ok"
    assert len(seen) == 3
    for e in seen:
        prev = first[str(e["dir"])]
        spec = AdapterSpec.of(e["delta"])
        # the residual added in round 2 is exactly the one stored after round 1 ...
        assert e["before"] is not None
        for k in spec.names:
            np.testing.assert_array_equal(e["before"][k], prev["after"][k])
        assert max(float(np.abs(v).max()) for v in e["before"].values()) > 0
        # ... and the new residual is (delta + old residual) - what was sent
        sent = e["codec"].decode(e["payload"], spec)
        for k in spec.names:
            want = e["delta"][k].astype(np.float64) + e["before"][k] - sent[k]
            np.testing.assert_allclose(e["after"][k], want, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------- mixed ranks


def _replies_reference(
    fleet: RealFleet, out: Path, rnd: int, cfg: RunConfig
) -> dict[str, np.ndarray]:
    """The numpy reference: the clients' replies decoded, per-component weighted mean,
    applied to the adapter the round started from."""
    init = fleet.start_adapter(rnd)
    updates = []
    for _node, msg, reply in fleet.trains(rnd):
        _instr, sent = decode_train_instruction(msg.content)
        codec = CompressionConfig(cfg.compress).build(seed=cfg.seed, rnd=rnd)
        update = decode_update(reply.content, AdapterSpec.of(sent), rnd=rnd, codec=codec)
        updates.append((update.delta, float(update.num_examples)))
    mean = mixed_rank_mean(updates, cfg.lora_rank)
    return {k: init[k] + mean[k] for k in init}


def test_mixed_ranks_train_their_slice_and_aggregate_per_component(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fleet = RealFleet(tmp_path / "f", tiny_model_dir, model_cache)
    cfg = config(tiny_model_dir, model_cache, out, **{"client-ranks": "1,2", "lora-rank": 2})
    rows = run(fleet, cfg, out)
    r = rows[1]
    assert r["status"] == "ok", r.get("reason")
    # round-robin over the clients by name (partition-0 = 2**63+7, partition-1 = 101,
    # partition-2 = 5003), not by node id
    assert r["client_ranks"] == {"101": 2, "5003": 1, str(2**63 + 7): 1}
    for node, msg, reply in fleet.trains(1):
        instr, sent = decode_train_instruction(msg.content)
        rank = r["client_ranks"][str(node)]
        assert instr.lora.rank == rank and instr.lora.alpha == pytest.approx(
            cfg.lora_alpha * rank / 2
        )
        assert all(v.shape[0 if "lora_A" in k else 1] == rank for k, v in sent.items())
        delta = reply.content[keys.UPDATE]
        assert all(delta[k].shape == sent[k].shape for k in sent)
    ref = _replies_reference(fleet, out, 1, cfg)
    new = adapter_of(out)
    init = fleet.start_adapter(1)
    for k in new:
        np.testing.assert_allclose(new[k], ref[k], rtol=0, atol=1e-6)
    # component 1 moved with the one rank-2 client only, component 0 with all three
    a = next(k for k in new if "lora_B" in k)
    assert np.abs(new[a][:, 1] - init[a][:, 1]).max() > 0
    # the rank-1 clients sent half the bytes of a full-rank update
    assert r["bytes_up_ratio"] < 0.85


def test_a_resumed_run_keeps_each_nodes_rank(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fleet = RealFleet(tmp_path / "f", tiny_model_dir, model_cache)
    ranks = {"client-ranks": "1,2", "min-clients": 2}
    first = run(fleet, config(tiny_model_dir, model_cache, out, **ranks), out)[1]
    assert first["client_ranks"] == {"101": 2, "5003": 1, str(2**63 + 7): 1}
    fleet.restart()
    grid = fleet.grid()
    del grid.handlers[101]  # node 101 is gone when the run resumes
    more = config(tiny_model_dir, model_cache, out, rounds=2, **ranks)
    rows = run_virtual(grid, more, out, resume=True, progress=Progress(2, live=False))
    # without the saved order, 5003 (partition-2) would now be second and get rank 2
    assert rows[2]["client_ranks"] == {"5003": 1, str(2**63 + 7): 1}
    assert rows[2]["status"] == "ok"


def test_equal_client_ranks_aggregate_per_component_to_fedavg(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """--client-ranks 2,2 takes the per-component route (padding, holder weights, division per
    component) and lands where plain FedAvg does."""
    ranked_out, plain_out = tmp_path / "ranked", tmp_path / "plain"
    ranked = RealFleet(tmp_path / "r", tiny_model_dir, model_cache)
    rows = run(ranked, config(tiny_model_dir, model_cache, ranked_out, **{"client-ranks": "2,2"}),
               ranked_out)  # fmt: skip
    assert rows[1]["status"] == "ok" and set(rows[1]["client_ranks"].values()) == {2}
    plain = RealFleet(tmp_path / "p", tiny_model_dir, model_cache)
    prow = run(plain, config(tiny_model_dir, model_cache, plain_out), plain_out)[1]
    assert "client_ranks" not in prow
    a, b = adapter_of(ranked_out), adapter_of(plain_out)
    init = plain.start_adapter(1)
    assert max(float(np.abs(b[k] - init[k]).max()) for k in b) > 1e-3
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-7)


def test_mixed_ranks_under_secagg_equal_plaintext_within_encoding_error(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    # (the global adapter goes down in fp16 in both runs: the same adapter reaches the clients)
    ranks = {"client-ranks": "1,2", "lora-rank": 2, "compress-down": "fp16"}
    plain_out, secure_out = tmp_path / "plain", tmp_path / "secure"
    plain = RealFleet(tmp_path / "p", tiny_model_dir, model_cache)
    run(plain, config(tiny_model_dir, model_cache, plain_out, **ranks), plain_out)
    secure = RealFleet(tmp_path / "s", tiny_model_dir, model_cache)
    rows = run(
        secure, config(tiny_model_dir, model_cache, secure_out, secagg=True, **ranks), secure_out
    )
    s = rows[1]
    assert s["status"] == "ok", s.get("reason")
    a, b = adapter_of(plain_out), adapter_of(secure_out)
    step = s["secagg"]["step"]
    # per component: (sum of < 3 steps) / holder weight fraction, the holders' own error is
    # of the same order; the rank-2 component has one holder (the smallest weight)
    bound = 50 * step * 65536 / 20
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=bound, rtol=0)
    assert max(float(np.abs(a[k] - plain.start_adapter(1)[k]).max()) for k in a) > 50 * bound


def test_flexlora_round_equals_the_svd_redistribution_of_the_replies(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fleet = RealFleet(tmp_path / "f", tiny_model_dir, model_cache)
    opts = {"client-ranks": "1,2", "rank-aggregation": "flexlora"}
    rows = run(fleet, config(tiny_model_dir, model_cache, out, **opts), out)
    assert rows[1]["status"] == "ok", rows[1].get("reason")
    init = fleet.start_adapter(1)
    updates = []
    for _node, msg, reply in fleet.trains(1):
        _instr, sent = decode_train_instruction(msg.content)
        update = decode_update(reply.content, AdapterSpec.of(sent), rnd=1)
        updates.append((update.delta, float(update.num_examples)))
    want = flexlora(init, updates)
    new = adapter_of(out)
    for k in new:
        np.testing.assert_allclose(new[k], want[k], rtol=0, atol=1e-6)


def test_downlink_int8_and_uplink_int8_measured_bytes(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fleet = RealFleet(tmp_path / "f", tiny_model_dir, model_cache)
    opts = {"compress": "int8", "compress-down": "int8", "compress-block-size": 32}
    rows = run(fleet, config(tiny_model_dir, model_cache, out, **opts), out)
    r = rows[1]
    assert r["status"] == "ok" and r["compress_down"] == "int8"
    # int8 codes plus a float32 scale per 32 values, npy headers and meta: well under 1/2
    assert r["bytes_up_ratio"] < 0.5 and r["bytes_down_ratio"] < 0.6
    for _node, msg, _reply in fleet.trains(1):
        assert keys.GLOBAL_ADAPTER_CODEC in msg.content
    evals = [m for _n, m, _r in fleet.log if m.metadata.message_type == MessageType.EVALUATE]
    assert evals and all(keys.GLOBAL_ADAPTER_CODEC in m.content for m in evals)
    assert rows[0]["eval_clients_ok"] == 1 and np.isfinite(rows[0]["eval_loss"])
    # the plain run's exchange of the same adapter, for comparison: ratio ~ 1
    plain_out = tmp_path / "plain"
    prow = run(fleet, config(tiny_model_dir, model_cache, plain_out), plain_out)[1]
    assert prow["compress"] == "none"
    assert 1.0 < prow["bytes_up_ratio"] < 1.1  # fp32 tensors plus metrics and reply meta
    assert 1.0 < prow["bytes_down_ratio"] < 1.25  # plus the instruction (tiny adapter)
    assert r["bytes_up"] < prow["bytes_up"] and r["bytes_down"] < prow["bytes_down"]


def test_secagg_sketch_with_distributed_dp_noises_the_sketch(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fleet = RealFleet(tmp_path / "f", tiny_model_dir, model_cache)
    opts = {"compress": "sketch", "secagg": True, "dp": "client", "noise-multiplier": 0.5,
            "clip-norm": 0.5, "sketch-ratio": 0.25, "population": 3, "delta": 1e-2}  # fmt: skip
    rows = run(fleet, config(tiny_model_dir, model_cache, out, **opts), out)
    r = rows[1]
    assert r["status"] == "ok", r.get("reason")
    sketch = CompressionConfig("sketch", sketch_ratio=0.25).build()
    spec = AdapterSpec.of(fleet.start_adapter(1))
    cells = sketch.operator(spec).size  # type: ignore[attr-defined]
    recorded = json.loads((out / "config.json").read_text())["privacy"]
    assert recorded["numel"] == cells < spec.numel  # the noised vector is the sketch
    assert r["epsilon"] > 0


def test_codecs_compose_with_plaintext_client_dp(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """--dp client in plaintext: the coordinator clips what it decoded, then noises the sum."""
    out = tmp_path / "run"
    fleet = RealFleet(tmp_path / "f", tiny_model_dir, model_cache)
    opts = {"compress": "int4", "error-feedback": True, "dp": "client", "noise-multiplier": 0.5,
            "clip-norm": 0.05, "population": 3, "delta": 1e-2}  # fmt: skip
    rows = run(fleet, config(tiny_model_dir, model_cache, out, **opts), out)
    r = rows[1]
    assert r["status"] == "ok" and r["clients_ok"] == 3, r.get("reason")
    assert r["compress"] == "int4" and r["bytes_up_ratio"] < 0.3 and r["epsilon"] > 0
