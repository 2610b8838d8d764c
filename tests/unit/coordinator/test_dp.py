"""Client-level DP in the round loop: the wrapper's clipping and noise, the ledger in state.json
and config.json, resume, max-epsilon, errors before training, FFA-LoRA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Message, MessageType
from safetensors.numpy import load_file

from client.data import load_records, to_conversations, tokenize_all
from client.model import Quantization, attach_lora, get_adapter, load_base, resolve_model
from client.train import evaluate, train_round
from coordinator.config import ConfigError, RunConfig
from coordinator.dp import ClientDPSettings, ClientLevelDP, resolve_client_dp
from coordinator.pipeline import Contribution
from coordinator.progress import Progress
from privacy.accounting import AccountantKind
from protocol import keys
from protocol.messages import (
    decode_eval_instruction,
    decode_train_instruction,
    encode_eval_result,
    encode_update,
)
from tests.fakegrid import FakeGrid, run_virtual
from tests.unit.coordinator.test_rounds import NODES, cfg_for, client

DP = {"dp": "client", "clients-per-round": 2, "min-clients": 1, "delta": 1e-3, "clip-norm": 0.5}


def _settings(**kw: Any) -> ClientDPSettings:
    base = {
        "noise_multiplier": 1.0,
        "clip_norm": 0.5,
        "sampling_rate": 0.5,
        "denominator": 2.0,
        "population": 4,
        "delta": 1e-3,
        "accountant": AccountantKind.RDP,
    }
    return ClientDPSettings(**{**base, **kw})


def _seeded(seed: int):  # type: ignore[no-untyped-def]
    return lambda: np.random.default_rng(seed)


def test_each_client_moves_the_release_by_at_most_c_over_d() -> None:
    g = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
    rng = np.random.default_rng(0)
    updates = [({k: rng.normal(0, s, v.shape).astype(np.float32) for k, v in g.items()}, 10.0)
               for s in (0.01, 1.0, 50.0)]  # fmt: skip
    dp = ClientLevelDP(_settings(denominator=3.0), ["a", "b"], rng_factory=_seeded(7))
    full, metrics = dp(g, updates)
    assert metrics["dp_clip_norm"] == 0.5
    assert metrics["dp_noise_std"] == pytest.approx(1.0 * 0.5 / 3.0)
    for i in range(3):
        # Same seed -> same noise draw, so the difference is the client's clipped contribution.
        rest = ClientLevelDP(_settings(denominator=3.0), ["a", "b"], rng_factory=_seeded(7))
        without, _ = rest(g, updates[:i] + updates[i + 1 :])
        diff = np.sqrt(sum(float(np.sum((full[k] - without[k]) ** 2.0)) for k in g))
        assert diff <= 0.5 / 3.0 + 1e-6
    assert dp.ledger.releases == 1


def test_noise_on_the_global_adapter_has_std_z_c_over_d() -> None:
    g = {"w": np.zeros(100_000, np.float32)}
    dp = ClientLevelDP(
        _settings(noise_multiplier=2.0, clip_norm=0.3), ["w"], rng_factory=_seeded(1)
    )
    new, _ = dp(g, [({"w": np.zeros(100_000, np.float32)}, 1.0)] * 2)
    assert new["w"].std() == pytest.approx(2.0 * 0.3 / 2.0, rel=0.01)  # ~0.22% s.e.


def test_adaptive_clipping_moves_the_clip_norm_and_charges_the_count() -> None:
    s = _settings(noise_multiplier=0.5, clip_norm=1.0)
    from privacy.mechanisms import AdaptiveClipping

    s = ClientDPSettings(**{**s.__dict__, "adaptive": AdaptiveClipping(0.5, 0.2, 2.0)})
    assert s.sum_noise_multiplier == pytest.approx((0.5**-2 - 4.0**-2) ** -0.5)
    dp = ClientLevelDP(s, ["w"], rng_factory=_seeded(2))
    tiny = {"w": np.full(4, 1e-3, np.float32)}
    _, m = dp({"w": np.zeros(4, np.float32)}, [(tiny, 1.0), (tiny, 1.0)])
    # Both unclipped: the noisy fraction is 1 + N(0, (2/2)^2) and C moves by exp(-0.2 (f - 0.5)).
    assert m["dp_next_clip_norm"] == pytest.approx(
        np.exp(-0.2 * (m["dp_unclipped_fraction_noisy"] - 0.5))
    )
    assert dp.clip_norm == m["dp_next_clip_norm"]
    # The ledger holds the combined multiplier, not the sum's.
    assert dp.ledger.events[0].noise_multiplier == 0.5


def _recompute(run: Path) -> float:
    """Epsilon from the run directory alone, with dp-accounting called directly."""
    privacy = json.loads((run / "config.json").read_text())["privacy"]
    ledger = json.loads((run / "state.json").read_text())["privacy"]["ledger"]
    events = [
        dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(
                e["sampling_rate"], dpa.GaussianDpEvent(e["noise_multiplier"])
            ),
            e["count"],
        )
        for e in ledger["events"]
    ]
    assert privacy["accountant"] == "rdp"
    return float(
        rdp.RdpAccountant().compose(dpa.ComposedDpEvent(events)).get_epsilon(privacy["delta"])
    )


def test_round_loop_records_epsilon_ledger_and_settings(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES)})
    cfg = cfg_for(tiny_model_dir, model_cache, out, rounds=3, **DP, **{"noise-multiplier": 1.2})
    rows = run_virtual(grid, cfg, out, progress=Progress(3, live=False))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["epsilon"] == 0.0
    eps = [r["epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[0] > 0 and all(r["delta"] == 1e-3 for r in rows)
    for r in rows[1:]:
        assert r["status"] == "ok" and r["dp_clip_norm"] == 0.5
        assert r["dp_noise_std"] == pytest.approx(1.2 * 0.5 / 2)
    privacy = json.loads((out / "config.json").read_text())["privacy"]
    assert privacy == privacy | {
        "unit": "client",
        "noise_multiplier": 1.2,
        "clip_norm": 0.5,
        "sampling_rate": 0.5,  # 2 per round of 4 clients
        "denominator": 2.0,
        "population": 4,
        "delta": 1e-3,
        "accountant": "rdp",
    }
    assert privacy["accountant_library"].startswith("dp-accounting ")
    state = json.loads((out / "state.json").read_text())
    assert state["privacy"]["ledger"]["events"] == [
        {"mechanism": "poisson-gaussian", "noise_multiplier": 1.2, "sampling_rate": 0.5, "count": 3}
    ]
    assert _recompute(out) == pytest.approx(rows[-1]["epsilon"], abs=1e-6)
    # Cohorts are Poisson samples: sizes vary, and each sampled client got one train message.
    train_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert sum(r["clients_sampled"] for r in rows[1:]) == len(train_msgs)


def test_resume_continues_the_ledger(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES)})
    kw = {**DP, "noise-multiplier": 0.9}
    run_virtual(grid, cfg_for(tiny_model_dir, model_cache, out, rounds=1, **kw), out,
                   progress=Progress(1, live=False))  # fmt: skip
    rows = run_virtual(grid, cfg_for(tiny_model_dir, model_cache, out, rounds=3, **kw), out,
                          resume=True, progress=Progress(3, live=False))  # fmt: skip
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    ledger = json.loads((out / "state.json").read_text())["privacy"]["ledger"]
    assert sum(e["count"] for e in ledger["events"]) == 3
    want = (
        rdp.RdpAccountant()
        .compose(
            dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(0.9)), 3)
        )
        .get_epsilon(1e-3)
    )
    assert rows[-1]["epsilon"] == pytest.approx(want, abs=1e-9)


def test_max_epsilon_stops_the_run_cleanly(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"

    def eps(n: int) -> float:
        ev = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(1.0)), n)
        return float(rdp.RdpAccountant().compose(ev).get_epsilon(1e-3))

    limit = (eps(2) + eps(3)) / 2
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES)})
    cfg = cfg_for(tiny_model_dir, model_cache, out, rounds=5, **DP,
                  **{"noise-multiplier": 1.0, "max-epsilon": limit})  # fmt: skip
    rows = run_virtual(grid, cfg, out, progress=Progress(5, live=False))
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["epsilon"] == pytest.approx(eps(2)) and rows[-1]["epsilon"] <= limit
    state = json.loads((out / "state.json").read_text())
    assert state["round"] == 2 and "round 3 would take epsilon" in state["stopped"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"delta": 0.3}, "delta: 0.3 must be below 1/population = 1/4"),
        (
            {
                "noise-multiplier": 0.0,
                "target-epsilon": 1e-4,
                "clients-per-round": 4,
                "delta": 1e-6,
            },
            "target-epsilon: 0.0001 is unreachable in 2 release(s)",
        ),
        (
            {"noise-multiplier": 0.0, "target-epsilon": 0.5, "adaptive-clip": True},
            "adaptive clipping caps the noise multiplier",
        ),
        ({"population": 1, "clients-per-round": 2}, "clients-per-round: 2 exceeds the population"),
    ],
)
def test_bad_privacy_settings_fail_before_any_training(
    kw: dict,
    message: str,
    tiny_model_dir: Path,
    model_cache: Path,
    tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES)})
    values = {**DP, "noise-multiplier": 1.0, **kw}
    cfg = cfg_for(tiny_model_dir, model_cache, tmp_path / "run", **values)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_virtual(grid, cfg, tmp_path / "run", progress=Progress(2, live=False))
    assert grid.sent == []


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dp": "client", "noise-multiplier": -1.0}, "noise-multiplier: must be > 0"),
        ({"dp": "client"}, "dp 'client' needs a noise multiplier > 0 or a target-epsilon"),
        ({"dp": "client", "clip-norm": 0.0, "noise-multiplier": 1.0}, "clip-norm: must be > 0"),
        ({"dp": "client", "delta": 1.0, "noise-multiplier": 1.0}, "delta: must be in (0, 1)"),
        ({"dp": "client", "noise-multiplier": 1.0, "target-epsilon": 8}, "not both"),
        ({"noise-multiplier": 1.0}, "needs --dp client or --dp sample"),
        ({"target-epsilon": 8.0}, "needs --dp client or --dp sample"),
        ({"dp": "sample"}, "dp 'sample' needs a noise multiplier > 0"),
        ({"dp": "sample", "noise-multiplier": 1.0, "adaptive-clip": True}, "adaptive-clip: is for"),
        ({"dp": "maybe"}, "dp: 'maybe' is not one of none, client, sample"),
        ({"dp": "client", "target-epsilon": 1, "accountant": "moments"}, "accountant: 'moments'"),
    ],
)
def test_bad_dp_config_names_the_key(values: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert message in str(err.value)


def test_target_epsilon_calibrates_for_the_rounds() -> None:
    cfg = RunConfig.from_mapping(
        {"dp": "client", "target-epsilon": 4.0, "rounds": 10, "clients-per-round": 3, "delta": 1e-4}
    )
    s = resolve_client_dp(cfg, population=30)
    assert s.sampling_rate == pytest.approx(0.1) and s.calibrated_rounds == 10
    ev = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(s.noise_multiplier)), 10
    )
    eps = rdp.RdpAccountant().compose(ev).get_epsilon(1e-4)
    assert 3.99 < eps <= 4.0
    assert s.max_epsilon == 4.0  # the target is also the stop limit


# ---------------------------------------------------------------------------------- FFA-LoRA


def real_client(model: Any, examples: list[Any], pad: int, seed: int):  # type: ignore[no-untyped-def]
    """A node that trains the tiny model for real (what client.app does, without Flower)."""

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            instr, adapter = decode_eval_instruction(msg.content)
            res = evaluate(model, examples[:8], batch_size=8, pad_id=pad, global_adapter=adapter)
            return Message(encode_eval_result(res, rnd=instr.round), reply_to=msg)
        instr, adapter = decode_train_instruction(msg.content)
        up = train_round(model, examples, instr, adapter, pad_id=pad, client_seed=seed)
        return Message(encode_update(up, rnd=instr.round), reply_to=msg)

    return handle


@pytest.mark.parametrize("dp", ["none", "client"])
def test_ffa_lora_sends_only_b_and_keeps_a_bit_identical(
    dp: str, tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    cfg_kw: dict[str, Any] = {"lora-dropout": 0.0, "local-steps": 2, "seq-len": 64}
    model = attach_lora(base.model, RunConfig.from_mapping({"lora-rank": 2}).lora, seed=99)
    rows = load_records("builtin:chatterbot")[:24]
    examples = tokenize_all(base.tokenizer, to_conversations(rows, "b"), 64)
    pad = int(base.tokenizer.pad_token_id)
    # dp-rng seeded: a fixed Poisson draw (with the OS generator, round 1 drew nobody now and then)
    dpkw = {**DP, "noise-multiplier": 0.5, "dp-rng": "seeded"}
    extra = dpkw if dp == "client" else {"clients-per-round": 2}

    def run(ffa: bool) -> tuple[list[dict[str, Any]], FakeGrid, Path]:
        out = tmp_path / f"run-{ffa}"
        grid = FakeGrid({n: real_client(model, examples, pad, i) for i, n in enumerate(NODES[:3])})
        cfg = cfg_for(tiny_model_dir, model_cache, out, rounds=2, **extra, **cfg_kw,
                      **{"ffa-lora": ffa, "learning-rate": 0.01})  # fmt: skip
        return run_virtual(grid, cfg, out, progress=Progress(2, live=False)), grid, out

    rows, grid, out = run(True)
    assert [(r["status"], r.get("reason")) for r in rows[1:]] == [("ok", None)] * 2
    train_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    instr, initial = decode_train_instruction(train_msgs[0].content)
    b_keys = {k for k in initial if ".lora_B." in k}
    assert set(instr.trainable_keys) == b_keys and b_keys
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    server_init = get_adapter(attach_lora(base.model, RunConfig().lora.__class__(rank=2), seed=0))
    for k in initial:
        if ".lora_A." in k:
            np.testing.assert_array_equal(saved[k], initial[k])  # bit-identical after training
            np.testing.assert_array_equal(saved[k], server_init[k])  # the shared random init
    assert any(np.abs(saved[k] - initial[k]).max() > 0 for k in b_keys)

    # Every train reply carried B tensors only.
    assert rows[1]["clients_ok"] >= 1


def test_update_record_of_an_ffa_client_holds_only_b(
    tiny_model_dir: Path, model_cache: Path
) -> None:
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, RunConfig.from_mapping({"lora-rank": 2}).lora, seed=5)
    g = get_adapter(model)
    b_keys = tuple(k for k in g if ".lora_B." in k)
    cfg = RunConfig.from_mapping({"lora-rank": 2, "local-steps": 1, "seq-len": 64})
    import dataclasses

    instr = dataclasses.replace(cfg.train_instruction(1), trainable_keys=b_keys)
    rows = load_records("builtin:chatterbot")[:8]
    ex = tokenize_all(base.tokenizer, to_conversations(rows, "b"), 64)
    up = train_round(model, ex, instr, g, pad_id=int(base.tokenizer.pad_token_id), client_seed=0)
    record = encode_update(up, rnd=1)[keys.UPDATE]
    assert set(record.keys()) == set(b_keys)
    # The upload is B alone: (out x r) per module instead of (r x in) + (out x r). In this tiny
    # model B is the smaller half (v_proj's out is 32), so the upload is under half.
    full = encode_update(dataclasses.replace(up, delta=g), rnd=1)[keys.UPDATE].count_bytes()
    assert record.count_bytes() < 0.5 * full


def test_an_empty_poisson_cohort_still_releases_noise(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """Skipping a round whose cohort came out empty would reveal that nobody was sampled; the
    release (pure noise) happens and is recorded like any other."""
    from client.model import Quantization as Q
    from coordinator.clock import VirtualClock
    from coordinator.pipeline import PlainTransport
    from coordinator.rounds import Pipeline
    from coordinator.strategies import Strategy, StrategySettings
    from protocol.adapter import AdapterSpec

    base = load_base(resolve_model(str(tiny_model_dir)), Q.NONE, model_cache)
    g = get_adapter(attach_lora(base.model, RunConfig.from_mapping({"lora-rank": 2}).lora))
    cfg = cfg_for(tiny_model_dir, model_cache, tmp_path / "run", **DP, **{"noise-multiplier": 1.0})
    dp = ClientLevelDP(resolve_client_dp(cfg, 4), list(g), rng_factory=_seeded(3))
    dp.sample = lambda live, rnd=0: []  # type: ignore[method-assign]  # the cohort came out empty
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES)})
    pipeline = Pipeline(
        dp,
        PlainTransport(cfg.round_timeout, VirtualClock()),
        Strategy.create(StrategySettings(), 4, 3),
        AdapterSpec.of(g),
        0,  # DP releases every round
    )
    new, result = pipeline.train(grid, cfg, NODES, g, 1, Progress(1, live=False))
    assert new is not None and result.status == "ok" and result.clients_sampled == 0
    assert grid.sent == [] and result.bytes_down == 0 and result.bytes_up == 0
    noise = np.concatenate([(new[k] - g[k]).ravel() for k in g])
    assert noise.std() == pytest.approx(1.0 * 0.5 / 2.0, rel=0.1)
    assert dp.ledger.releases == 1


def test_adaptive_clip_norm_is_saved_with_the_round(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES)})
    extra = {"noise-multiplier": 0.5, "adaptive-clip": True, "clip-count-stddev": 1.0}
    cfg = cfg_for(tiny_model_dir, model_cache, out, rounds=2, **DP, **extra)
    rows = run_virtual(grid, cfg, out, progress=Progress(2, live=False))
    assert rows[1]["dp_clip_norm"] == 0.5  # the initial C
    assert rows[2]["dp_clip_norm"] == pytest.approx(rows[1]["dp_next_clip_norm"])
    state = json.loads((out / "state.json").read_text())["privacy"]
    assert state["clip_norm"] == pytest.approx(rows[2]["dp_next_clip_norm"])
    privacy = json.loads((out / "config.json").read_text())["privacy"]
    assert privacy["adaptive_clip"] == {
        "target_quantile": 0.5,
        "learning_rate": 0.2,
        "count_stddev": 1.0,
    }
    assert privacy["sum_noise_multiplier"] == pytest.approx((0.5**-2 - 2.0**-2) ** -0.5)


def test_seeded_dp_draws_cohort_and_noise_from_seed_and_round() -> None:
    """--dp-rng seeded: round r's cohort and noise are functions of (seed, r) and of the
    nodes' stable order (names), so a run reproduces and a resumed one continues as if never
    stopped; the cohort is drawn by position, whatever the node ids."""
    names = ["ai", "art", "law", "math", "music", "sport", "zoo", "bio"]

    def draw(seed: int, rnd: int, ids: list[int]) -> tuple[list[str], np.ndarray]:
        dp = ClientLevelDP(_settings(sampling_rate=0.5), ["w"], seed=seed)
        by_id = dict(zip(ids, names, strict=True))
        cohort = [by_id[n] for n in dp.sample(ids, rnd)]
        acc = {"w": np.zeros(4)}
        mean, _ = dp.release(Contribution(acc, 0.0))
        return cohort, mean["w"]

    a = draw(5, 3, list(range(100, 108)))
    b = draw(5, 3, [2**63 + 9, 7, 55, 1, 900, 3, 12, 4])  # other node ids, same names in order
    assert a[0] == b[0] and a[0]
    np.testing.assert_array_equal(a[1], b[1])
    other_rounds = [draw(5, r, list(range(8))) for r in range(4, 12)]
    assert any(c != a[0] for c, _ in other_rounds)
    assert all(not np.array_equal(n, a[1]) for _, n in other_rounds)
    secret = ClientLevelDP(_settings(), ["w"])  # the default: secret, from the OS
    assert secret.seed is None
