"""Secure-aggregation rounds over a Grid (FakeGrid + the real ClientApp stage handlers): the
result equals FedAvg within quantization error, survives injected dropouts at every stage, fails
cleanly below threshold, names and excludes misbehaving clients, and the coordinator's whole
transcript reveals no individual update."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message

from coordinator.aggregation import fedavg
from coordinator.clock import VirtualClock
from coordinator.config import RunConfig
from coordinator.pipeline import NoPrivacy, Privacy
from coordinator.progress import Progress
from coordinator.rounds import Pipeline
from coordinator.secagg_round import SecureTransport
from coordinator.strategies import Strategy, StrategySettings
from privacy.secagg import primitives as P
from privacy.secagg import shamir
from privacy.secagg.client import mask_key
from privacy.secagg.encoding import centred
from privacy.secagg.messages import Advertise, UnmaskResponse, from_bytes
from privacy.secagg.server import STAGES
from protocol import keys
from protocol.adapter import AdapterSpec
from tests.secagg_fleet import Fleet

NODES = [2**63 + 11 * i for i in range(10)]
ADAPTER = {
    "layers.0.q_proj.lora_A.weight": np.zeros((4, 512), np.float32),
    "layers.0.q_proj.lora_B.weight": np.zeros((512, 4), np.float32),
    "layers.1.v_proj.lora_A.weight": np.ones((4, 512), np.float32),
    "layers.1.v_proj.lora_B.weight": np.zeros((512, 4), np.float32),
}
SPEC = AdapterSpec.of(ADAPTER)


def config(**kw: Any) -> RunConfig:
    return RunConfig.from_mapping(
        {"secagg": True, "clients-per-round": 10, "min-clients": 3, "round-timeout": 1.0, **kw}
    )


def secure_round(  # type: ignore[no-untyped-def]
    secure: SecureTransport,
    fleet: Fleet,
    nodes: list[int],
    rnd: int,
    privacy: Privacy | None = None,
    adapter: dict[str, np.ndarray] | None = None,
):
    """One training round of the pipeline over the secure transport (FedAvg): (new adapter or
    None, the round's metrics row, bytes down, bytes up)."""
    privacy = privacy or NoPrivacy(len(nodes), 0)
    strategy = Strategy.create(StrategySettings(), len(nodes), len(nodes))
    pipeline = Pipeline(privacy, secure, strategy, SPEC, secure.cfg.min_clients)
    new, result = pipeline.train(
        fleet.grid(), secure.cfg, nodes, ADAPTER if adapter is None else adapter, rnd,
        Progress(1, live=False),
    )  # fmt: skip
    return new, result.to_row(), result.bytes_down, result.bytes_up


def run(fleet: Fleet, cfg: RunConfig, nodes: list[int] | None = None, rnd: int = 1):  # type: ignore[no-untyped-def]
    secure = SecureTransport(cfg, clock=VirtualClock())
    new, metrics, down, up = secure_round(secure, fleet, nodes or fleet.nodes, rnd)
    return secure, new, metrics, down, up


def fleet_of(n: int = 10, **kw: Any) -> Fleet:
    nodes = NODES[:n]
    return Fleet(nodes, {u: 20 * (i + 1) for i, u in enumerate(nodes)}, **kw)


def expected(fleet: Fleet, contributors: list[int]) -> tuple[dict[str, np.ndarray], float]:
    """Plaintext FedAvg of the contributors' deltas, and the quantization error bound: each
    client's coordinate moves by < one step, and the sum is divided by sum(w) / weight-cap."""
    weights = [fleet.examples[u] for u in contributors]
    want = fedavg(ADAPTER, [(fleet.deltas[u], fleet.examples[u]) for u in contributors])
    return want, len(contributors) * 65536 / sum(weights)


def assert_close(
    new: dict[str, np.ndarray], want: tuple[dict[str, np.ndarray], float], step: float
) -> None:
    ref, steps = want
    for k in ref:
        np.testing.assert_allclose(new[k], ref[k], atol=steps * step + 1e-7, rtol=0)
        assert np.abs(new[k] - ref[k]).max() < 1e-5


def test_secure_round_counts_each_clients_bytes_over_its_stages() -> None:
    """A simulated device is charged its own messages (simulations/fleet.py): the secure
    transport adds up each node's bytes over the four stages, and they sum to the round's."""
    fleet = fleet_of()
    secure = SecureTransport(config(), clock=VirtualClock())
    seen = []
    collect = secure.collect

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(collect(*args, **kw))
        return seen[-1]

    secure.collect = spy  # type: ignore[method-assign]
    _new, m, down, up = secure_round(secure, fleet, fleet.nodes, 1)
    assert m["clients_ok"] == 10
    (c,) = seen
    assert sorted(c.node_bytes) == sorted(fleet.nodes)
    assert sum(d for d, _ in c.node_bytes.values()) == c.bytes_down == down
    assert sum(u for _, u in c.node_bytes.values()) == c.bytes_up == up
    assert all(u >= 4 * (SPEC.numel + 1) for _, u in c.node_bytes.values())  # its masked vector


def test_secure_round_equals_fedavg_within_quantization_error() -> None:
    fleet = fleet_of()
    _s, new, m, down, up = run(fleet, config())
    assert m["status"] == "ok" and m["clients_ok"] == 10 and m["failures"] == []
    assert m["num_examples"] == sum(fleet.examples.values())
    assert new is not None
    assert_close(new, expected(fleet, fleet.nodes), m["secagg"]["step"])
    assert m["secagg"]["stage_counts"] == {"sampled": 10, **{s: 10 for s in STAGES}}
    assert m["train_loss"] == pytest.approx(np.mean([1.0 + i for i in range(10)]))
    assert set(m["secagg"]["client_cpu_seconds_max"]) == set(STAGES)
    numel = SPEC.numel
    assert up >= 10 * 4 * (numel + 1) and down > 0


@pytest.mark.parametrize("stage", STAGES)
def test_thirty_percent_injected_dropout_at_each_stage(stage: str) -> None:
    fleet = fleet_of()
    _s, new, m, _d, _u = run(fleet, config(**{"inject-dropout": 0.3, "dropout-stage": stage}))
    assert m["status"] == "ok", m.get("reason")
    dropped = {f["node"] for f in m["failures"]}
    assert len(dropped) == 3 and all(f["stage"] == stage for f in m["failures"])
    assert all(f["reason"] == f"injected dropout at stage {stage}" for f in m["failures"])
    contributors = (
        fleet.nodes if stage == "unmask" else [u for u in fleet.nodes if u not in dropped]
    )
    assert m["clients_ok"] == len(contributors)
    if stage == "masked-input":
        assert set(m["secagg"]["recovered"]) == dropped
    assert new is not None
    assert_close(new, expected(fleet, contributors), m["secagg"]["step"])


def test_below_threshold_fails_cleanly_and_keeps_no_result() -> None:
    fleet = fleet_of(6)
    cfg = config(**{"inject-dropout": 0.5, "dropout-stage": "unmask", "clients-per-round": 6})
    _s, new, m, _d, _u = run(fleet, cfg)
    assert new is None and m["status"] == "failed"
    # k = 5, t = 4 (a strict majority of 6 holders): 3 shares of a dropped client's seed remain
    assert m["secagg"]["degree"] == 5 and m["secagg"]["threshold"] == 4
    assert "3 share(s) of client" in m["reason"] and "threshold is 4" in m["reason"]


@pytest.mark.parametrize("stage", STAGES)
def test_default_three_client_round_survives_one_injected_dropout_at_each_stage(
    stage: str,
) -> None:
    """`fedtune simulate --secagg --inject-dropout 0.3` on the defaults: 3 clients per round,
    min-clients 2, complete graph k = 2, t = 2. One client crashes (round(0.3 * 3) = 1)."""
    fleet = fleet_of(3)
    cfg = RunConfig.from_mapping(
        {"secagg": True, "round-timeout": 1.0, "inject-dropout": 0.3, "dropout-stage": stage}
    )
    assert (cfg.clients_per_round, cfg.min_clients, cfg.secagg_threshold) == (3, 2, 0)
    _s, new, m, _d, _u = run(fleet, cfg)
    assert m["status"] == "ok", m.get("reason")
    assert (m["secagg"]["degree"], m["secagg"]["threshold"]) == (2, 2)
    ((dropped, f_stage),) = [(f["node"], f["stage"]) for f in m["failures"]]
    assert f_stage == stage
    contributors = fleet.nodes if stage == "unmask" else [u for u in fleet.nodes if u != dropped]
    assert m["clients_ok"] == len(contributors)
    assert m["secagg"]["recovered"] == ([dropped] if stage == "masked-input" else [])
    assert new is not None
    assert_close(new, expected(fleet, contributors), m["secagg"]["step"])


@pytest.mark.parametrize("stage", STAGES)
def test_default_three_client_round_with_two_dropped_fails_cleanly(stage: str) -> None:
    fleet = fleet_of(3)
    cfg = RunConfig.from_mapping(
        {"secagg": True, "round-timeout": 1.0, "inject-dropout": 0.67, "dropout-stage": stage}
    )
    _s, new, m, _d, _u = run(fleet, cfg)
    assert new is None and m["status"] == "failed"
    injected = [f for f in m["failures"] if f["reason"].startswith("injected dropout")]
    assert len(injected) == 2 and all(f["stage"] == stage for f in m["failures"])
    if stage in ("advertise", "share-keys"):  # the lone client left cannot meet t either
        (alone,) = [f for f in m["failures"] if f not in injected]
        assert "only 0 live neighbour(s): 1 share holder(s) with itself" in alone["reason"]
    else:
        assert len(m["failures"]) == 2
    want = {
        "advertise": "advertise: 0 client(s) left",
        "share-keys": "share-keys: 0 client(s) left",
        "masked-input": "masked-input: 1 client(s) left",
        "unmask": "unmask: 1 share(s) of client",
    }[stage]
    assert m["reason"].startswith(want), m["reason"]


def test_tampered_share_bundle_takes_both_out_and_a_second_counterpart_excludes() -> None:
    """The complaint rule (privacy/secagg/server.py): a client that cannot open a neighbour's
    bundle complains and both leave the round. The dealer that tampers again in round 2, with
    another neighbour, has been party to complaints with two different clients and is excluded;
    the two clients it dealt to have one counterpart each and stay."""
    victim = NODES[4]
    receivers: list[int] = []

    def hook(direction: str, node: int, msg: Message) -> Message | None:
        if (
            direction == "up"
            and node == victim
            and msg.metadata.message_type == "train.secagg_share"
        ):
            rec = msg.content[keys.SECAGG]
            raw = json.loads(rec[keys.SECAGG_PAYLOAD])
            item = raw["items"][len(receivers)]  # another neighbour each round
            receivers.append(item["dst"])
            ct = bytearray(bytes.fromhex(item["ciphertext"]))
            ct[30] ^= 0x01
            item["ciphertext"] = ct.hex()
            msg.content[keys.SECAGG] = ConfigRecord({keys.SECAGG_PAYLOAD: json.dumps(raw).encode()})
        return msg

    fleet = fleet_of(hook=hook)
    secure, new, m, _d, _u = run(fleet, config())
    assert m["status"] == "ok" and new is not None
    assert m["secagg"]["excluded"] == [] and secure.excluded == {}
    left = {f["node"]: f["reason"] for f in m["failures"]}
    assert set(left) == {victim, receivers[0]}
    assert "could not use its shares: authentication failed" in left[victim]
    assert f"complained about client {victim}" in left[receivers[0]]
    assert sorted(m["secagg"]["recovered"]) == sorted(left)
    contributors = [u for u in fleet.nodes if u not in left]
    assert_close(new, expected(fleet, contributors), m["secagg"]["step"])

    new2, m2, _d, _u = secure_round(secure, fleet, fleet.nodes, 2, adapter=new)
    assert m2["status"] == "ok" and new2 is not None and m2["clients_ok"] == 8
    (ex,) = m2["secagg"]["excluded"]
    assert ex["node"] == victim and "party to complaints with 2 different clients" in ex["reason"]
    assert set(secure.excluded) == {victim}  # its two accusers have one counterpart each
    fleet.hook = None
    _new3, m3, _d, _u = secure_round(secure, fleet, fleet.nodes, 3, adapter=new2)
    assert m3["clients_sampled"] == 10 and m3["clients_ok"] == 9
    assert m3["failures"][0]["node"] == victim and m3["failures"][0]["stage"] == "sampling"


def test_malformed_masked_vector_is_rejected_with_the_client_named() -> None:
    victim = NODES[2]

    def hook(direction: str, node: int, msg: Message) -> Message | None:
        if (
            direction == "up"
            and node == victim
            and msg.metadata.message_type == "train.secagg_mask"
        ):
            arr = msg.content[keys.SECAGG_MASKED]["masked"].numpy()
            msg.content[keys.SECAGG_MASKED] = ArrayRecord(
                {"masked": __import__("flwr.app", fromlist=["Array"]).Array(arr.astype(np.float32))}
            )
        return msg

    fleet = fleet_of(hook=hook)
    _s, new, m, _d, _u = run(fleet, config())
    (f,) = m["failures"]
    assert f["node"] == victim and f["stage"] == "masked-input" and "expected uint32" in f["reason"]
    assert new is not None and m["secagg"]["recovered"] == [victim]
    assert_close(new, expected(fleet, [u for u in fleet.nodes if u != victim]), m["secagg"]["step"])


def test_the_coordinator_transcript_reveals_no_individual_update() -> None:
    """Record every reply the coordinator receives (30% drop after sharing keys, so it also gets
    masking-key shares), then play the coordinator's best attack: rebuild every secret the
    revealed shares allow and strip every mask it can from each client's masked vector. What is
    left is uncorrelated with that client's update; and no client ever had both its self-mask
    seed and its masking key revealed."""
    fleet = fleet_of()
    cfg = config(**{"inject-dropout": 0.3, "dropout-stage": "masked-input"})
    _s, new, m, _d, _u = run(fleet, cfg)
    assert m["status"] == "ok" and new is not None
    t, bits = m["secagg"]["threshold"], m["secagg"]["ring_bits"]

    adverts: dict[int, Advertise] = {}
    masked: dict[int, np.ndarray] = {}
    revealed: dict[tuple[int, str], dict[int, int]] = {}
    x_of = {u: i + 1 for i, u in enumerate(sorted(fleet.nodes))}
    for direction, node, reply in fleet.record:
        assert direction == "up"
        if not reply.has_content():
            continue
        kind = reply.metadata.message_type
        payload = reply.content[keys.SECAGG][keys.SECAGG_PAYLOAD]
        # Nothing float-valued and update-sized ever reaches the coordinator.
        for rec in reply.content.values():
            if isinstance(rec, ArrayRecord):
                for arr in rec.values():
                    assert arr.numpy().dtype.kind == "u"
        if kind == "train.secagg_setup":
            adverts[node] = from_bytes(Advertise, payload)
        elif kind == "train.secagg_mask":
            masked[node] = reply.content[keys.SECAGG_MASKED]["masked"].numpy()
        elif kind == "train.secagg_unmask":
            for s in from_bytes(UnmaskResponse, payload).shares:
                revealed.setdefault((s.target, s.kind), {})[x_of[node]] = shamir.share_from_bytes(
                    s.y
                )

    survivors = set(masked)
    dropped = {f["node"] for f in m["failures"]}
    assert survivors.isdisjoint(dropped) and len(survivors) == 7
    for u in fleet.nodes:
        kinds = {k for (target, k) in revealed if target == u}
        assert kinds == ({"b"} if u in survivors else {"sk"})  # never both

    # The attack.
    seeds = {u: shamir.combine(sh, t) for (u, k), sh in revealed.items() if k == "b"}
    keys_ = {u: shamir.combine(sh, t) for (u, k), sh in revealed.items() if k == "sk"}
    session = next(iter(adverts.values())).session  # public: it is in every message
    n = len(next(iter(masked.values())))
    residuals = {}
    for u, y in masked.items():
        residual = y.astype(np.uint32) - P.expand(seeds[u], n, bits)
        for d, sk in keys_.items():  # pairwise masks with dropped clients are computable
            if u not in _neighbours_of(d, fleet, adverts):
                continue
            mask = P.expand(mask_key(sk, adverts[u].pk_mask, session, d, u), n, bits)
            residual = residual - mask if u < d else residual + mask
        residuals[u] = residual
        values = centred(residual, bits)[:-1].astype(np.float64)
        flat = np.concatenate([v.ravel() for v in fleet.deltas[u].values()]).astype(np.float64)
        corr = abs(np.corrcoef(values, flat)[0, 1])
        assert corr < 0.06, (u, corr)  # ~N(0, 1/sqrt(8192) = 0.011) for independent vectors
        step = m["secagg"]["step"]
        assert np.mean(np.abs(values * step - flat * fleet.examples[u] / 65536) < 10 * step) < 0.01

    # Control: the attack strips masks correctly. Summed over the survivors, the pairwise masks
    # left in each residual cancel and the weighted sum of their updates appears.
    total = sum(residuals.values(), np.zeros(n, np.uint32))
    got = centred(total, bits)[:-1] * m["secagg"]["step"]
    want = sum(
        np.concatenate([v.ravel() for v in fleet.deltas[u].values()]) * fleet.examples[u] / 65536
        for u in survivors
    )
    np.testing.assert_allclose(got, want, atol=len(survivors) * m["secagg"]["step"])


def _neighbours_of(d: int, fleet: Fleet, adverts: dict[int, Advertise]) -> set[int]:
    """With 10 clients the SecAgg+ graph is complete (k = 9): everyone is everyone's neighbour."""
    del d, adverts
    return set(fleet.nodes)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_distributed_dp_noise_in_the_secure_sum_has_the_target_std(dropout: float) -> None:
    """--dp client --secagg: clients L2-clip, add Skellam noise calibrated for the cohort of 10;
    the coordinator's mean = (sum of clipped updates + noise) / D. The noise left in the result
    has std z C sqrt(contributors / 10) / D, and the release recorded for the accountant carries
    exactly the contributors' noise (dropped clients' noise never arrived) and the pool size."""
    from coordinator.ddp import DistributedClientDP, DistributedDpSettings
    from coordinator.secagg_round import DistributedDp
    from privacy.distributed_dp import client_mu, sensitivities

    fleet = fleet_of()
    cfg = config(**{"inject-dropout": dropout, "dropout-stage": "masked-input"})
    ddp = DistributedDp(noise_multiplier=0.8, clip_norm=0.05, denominator=10.0, cohort=10)
    settings = DistributedDpSettings(
        noise_multiplier=0.8,
        clip_norm=0.05,
        cohort=10,
        min_clients=3,
        population=40,
        numel=SPEC.numel,
        precision=0.0,
        delta=1e-5,
    )
    assert settings.mechanism() == ddp
    privacy = DistributedClientDP(settings)
    assert privacy.stop_reason(40, 1) is None  # the cohort is drawn from a pool of 40
    secure = SecureTransport(cfg, ddp, clock=VirtualClock())
    new, m, _d, _u = secure_round(secure, fleet, fleet.nodes, 1, privacy)
    assert m["status"] == "ok" and new is not None
    contributors = [u for u in fleet.nodes if u not in {f["node"] for f in m["failures"]}]
    assert len(contributors) == (7 if dropout else 10)
    clipped = []
    for u in contributors:
        x = np.concatenate([v.ravel() for v in fleet.deltas[u].values()]).astype(np.float64)
        clipped.append(x * min(1.0, ddp.clip_norm / np.linalg.norm(x)))
    clean = sum(clipped) / ddp.denominator
    got = np.concatenate([(new[k] - ADAPTER[k]).ravel() for k in ADAPTER]).astype(np.float64)
    noise = got - clean
    want_std = ddp.noise_multiplier * ddp.clip_norm * np.sqrt(len(contributors) / 10) / 10.0
    assert abs(noise.mean()) < 5 * want_std / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(want_std, rel=0.04)  # 8192 samples: ~0.8% std error
    (release,) = privacy.ledger.events
    step = m["secagg"]["step"]
    assert step == pytest.approx(0.8 * 0.05 / 2**20)
    mu = client_mu(ddp.noise_multiplier, ddp.clip_norm, step, 10)
    assert release.mu_total == pytest.approx(mu * len(contributors))
    assert (release.contributors, release.population) == (len(contributors), 40)
    l1, l2 = sensitivities(0.05, step, SPEC.numel)
    assert (release.l1_sensitivity, release.l2_sensitivity) == (l1, l2)
    assert m["ddp_release"] == release.to_dict()
    assert m["ddp_noise_multiplier"] == pytest.approx(
        ddp.noise_multiplier * np.sqrt(len(contributors) / 10), rel=1e-3
    )


@pytest.mark.parametrize(
    "name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox"]
)
def test_each_server_optimizer_under_secagg_equals_its_plaintext_result(name: str) -> None:
    """The optimizer acts on the unmasked mean: the result is the plaintext optimizer step on
    the plaintext FedAvg mean, within the encoding error (amplified at most by the optimizer's
    sensitivity to its input, below 1 here)."""
    fleet = fleet_of()
    secure = SecureTransport(config(), clock=VirtualClock())
    settings = StrategySettings(name=name)
    strategy = Strategy.create(settings, 10, 10)
    pipeline = Pipeline(NoPrivacy(10, 0), secure, strategy, SPEC, 3)
    new, result = pipeline.train(
        fleet.grid(), secure.cfg, fleet.nodes, ADAPTER, 1, Progress(1, live=False)
    )
    assert new is not None and result.status == "ok"
    mean, steps = expected(fleet, fleet.nodes)
    plain_mean = {k: mean[k].astype(np.float64) - ADAPTER[k] for k in ADAPTER}
    want = Strategy.create(settings, 10, 10).apply(ADAPTER, plain_mean)
    step = result.extra["secagg"]["step"]
    for k in ADAPTER:
        np.testing.assert_allclose(new[k], want[k], atol=steps * step + 1e-6, rtol=0)
    assert any(np.abs(new[k] - ADAPTER[k]).max() > 1e-4 for k in ADAPTER)


# -- issue 12: hostile clients over the real round ------------------------------------------------


def _rewrite(stage_action: str, node: int, direction: str, fn):  # type: ignore[no-untyped-def]
    """A Fleet hook that rewrites the SecAgg payload of ``node``'s message of type
    ``train.<stage_action>`` going ``direction``."""

    def hook(d: str, n: int, msg: Message) -> Message | None:
        if (
            (d, n) == (direction, node)
            and msg.metadata.message_type == f"train.{stage_action}"
            and msg.has_content()
            and keys.SECAGG in msg.content
        ):
            rec = msg.content[keys.SECAGG]
            new = dict(rec)
            new[keys.SECAGG_PAYLOAD] = fn(rec[keys.SECAGG_PAYLOAD])
            msg.content[keys.SECAGG] = ConfigRecord(new)
        return msg

    return hook


ACTIONS = dict(zip(STAGES, keys.SECAGG_ACTIONS, strict=True))
# Every client answers (an error reply is an answer) and FakeGrid answers at once, so a long
# timeout costs nothing and keeps these tests independent of the machine's speed.
SLOW_OK = config(**{"round-timeout": 300.0})
ADVERTISE_, MASKED_ = STAGES[0], STAGES[2]


@pytest.mark.parametrize("stage", STAGES)
def test_deeply_nested_reply_is_a_rejection_and_the_round_goes_on(stage: str) -> None:
    """Issue 12: 5,000 nested [ from one client used to raise RecursionError out of the round."""
    bad = NODES[3]
    payload = b"[" * 5000 if stage in (ADVERTISE_, MASKED_) else b'{"a":' * 3000
    fleet = fleet_of(hook=_rewrite(ACTIONS[stage], bad, "up", lambda _p: payload))
    _s, new, m, _d, _u = run(fleet, SLOW_OK)
    assert m["status"] == "ok" and new is not None
    named = m["failures"] + m["secagg"]["excluded"]
    assert [f["node"] for f in named] == [bad] and "nested" in named[0]["reason"]


def test_an_all_zero_public_key_excludes_its_sender_and_the_round_goes_on() -> None:
    """Issue 12: an all-zero X25519 key made every honest client fail (share-keys: 0 left) and
    its sender stayed in the run."""
    bad = NODES[5]

    def zero(payload: bytes) -> bytes:
        raw = json.loads(payload)
        raw["pk_mask"] = "00" * 32
        return json.dumps(raw).encode()

    fleet = fleet_of(hook=_rewrite(ACTIONS[ADVERTISE_], bad, "up", zero))
    secure, new, m, _d, _u = run(fleet, SLOW_OK)
    assert m["status"] == "ok" and new is not None and m["clients_ok"] == 9
    (ex,) = m["secagg"]["excluded"]
    assert ex["node"] == bad and "low-order point" in ex["reason"]
    assert_close(new, expected(fleet, [u for u in fleet.nodes if u != bad]), m["secagg"]["step"])
    fleet.hook = None
    _n, m2, _d, _u = secure_round(secure, fleet, fleet.nodes, 2, adapter=ADAPTER)
    assert m2["clients_ok"] == 9 and m2["failures"][0]["stage"] == "sampling"


def test_false_complaints_never_exclude_an_honest_client() -> None:
    """Issue 12: one false complaint got an honest client excluded for the rest of the run. Now
    the accuser and the accused both leave the round; the liar accusing the same client round
    after round excludes nobody; accusing a second client excludes the liar alone."""
    liar, victims = NODES[7], [NODES[1], NODES[1], NODES[1], NODES[2]]
    rnd = [0]

    def accuse(payload: bytes) -> bytes:
        raw = json.loads(payload)
        raw["complaints"] = [{"node": victims[rnd[0]], "reason": "cannot open its shares"}]
        return json.dumps(raw).encode()

    fleet = fleet_of(hook=_rewrite(ACTIONS[MASKED_], liar, "up", accuse))
    secure = SecureTransport(SLOW_OK, clock=VirtualClock())
    adapter = ADAPTER
    for i in range(4):
        rnd[0] = i
        new, m, _d, _u = secure_round(secure, fleet, fleet.nodes, i + 1, adapter=adapter)
        assert m["status"] == "ok" and new is not None, m.get("reason")
        assert {f["node"] for f in m["failures"]} == {liar, victims[i]}
        assert m["clients_ok"] == 8
        adapter = new
        assert victims[i] not in secure.excluded
        assert (liar in secure.excluded) == (i == 3)
    assert set(secure.excluded) == {liar}
    assert "party to complaints with 2 different clients" in secure.excluded[liar]


@pytest.mark.parametrize("stage", STAGES)
def test_an_honest_client_rejects_and_reports_a_tampered_message(stage: str) -> None:
    """Issue 12: honest clients crashed on tampered inputs. A message to one client that fails
    its checks now gets an error reply saying why, and the round goes on without it."""
    victim = NODES[6]

    def tamper(payload: bytes) -> bytes:
        if stage == "share-keys":  # a directory naming an all-zero key
            raw = json.loads(payload)
            raw["entries"][0]["pk_enc"] = "00" * 32
            return json.dumps(raw).encode()
        return b"[" * 5000

    fleet = fleet_of(hook=_rewrite(ACTIONS[stage], victim, "down", tamper))
    _s, new, m, _d, _u = run(fleet, SLOW_OK)
    assert m["status"] == "ok" and new is not None
    (f,) = [f for f in m["failures"] if f["node"] == victim]
    assert f["stage"] == stage and "rejected" in f["reason"]
    want = "public key" if stage == "share-keys" else "nested"
    assert want in f["reason"]
    replies = [r for d, n, r in fleet.record if n == victim and r.has_error()]
    assert len(replies) == 1 and "rejected" in replies[0].error.reason
