"""Fuzz the wire at scale (issue 12): generated malformed and hostile client replies and SecAgg+
messages through the real decoders, the coordinator's round code and SecAgg+ state machine, and
honest clients fed tampered coordinator messages. Prints, per family and in total:

- accepted-when-invalid: a message the protocol requires to be refused was used (decoded into an
  update, summed, or acted on by an honest client without refusing or complaining), a SecAgg
  client sending one was not refused (dropped, excluded, or named as the culprit of an aborted
  round), or a secure sum came out different from the plaintext sum of the clients it names;
- crashes: any exception other than the typed rejection the code promises (UpdateRejected,
  SecAggError, a clean SecAggAborted), from the coordinator or from an honest client;
- hangs: a case still running after ``--timeout`` seconds (each case runs in a worker process
  that the parent kills and replaces when its watchdog expires);
- honest clients excluded: over runs of rounds with one hostile client, any other client that
  ended up excluded.

Also shown: valid messages (honest controls and hostile-but-well-formed moves) that were refused,
and honest clients that left a round because of a complaint (the complaint rule's price).

    python -m benchmarks.fuzz                 # 10,000 cases, seed 0
    python -m benchmarks.fuzz --cases 2000 --seed 7

The generators are tests/wire_fuzz.py (shared with the Hypothesis suites). Results are written to
benchmarks/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

FAMILIES = {
    # family: (share of the cases, what it drives)
    "train replies -> decode_update": (0.22, "real decoder"),
    "eval replies -> decode_eval_result": (0.10, "real decoder"),
    "train replies -> the round pipeline": (0.05, "round loop over FakeGrid"),
    "eval replies -> rounds.federated_evaluate": (0.03, "round loop over FakeGrid"),
    "secagg replies -> ServerSession": (0.35, "state machine, runs of 4 rounds"),
    "secagg messages -> from_bytes": (0.05, "every message type, damaged"),
    "coordinator messages -> honest client": (0.15, "privacy/secagg/client.py steps"),
    "garbled stage messages -> ClientApp": (0.05, "client/secagg.py handlers"),
}
RUN_ROUNDS = 4
CONTROL_EVERY = 50  # every 50th case of a family is an honest control


def outcome(
    kind: str, invalid: bool, *, accepted: bool, crash: str = "", **extra: Any
) -> dict[str, Any]:
    return {"kind": kind, "invalid": invalid, "accepted": accepted, "crash": crash, **extra}


# -- cases (run inside the worker) ----------------------------------------------------------------


class Cases:
    """Everything a worker needs, built once per worker process."""

    def __init__(self) -> None:
        import numpy as np

        from tests import wire_fuzz as W

        self.W = W
        self.np = np
        self.adapter = {
            "m.lora_A": np.zeros((2, 8), np.float32),
            "m.lora_B": np.zeros((8, 2), np.float32),
        }
        from protocol.adapter import AdapterSpec

        self.spec = AdapterSpec.of(self.adapter)
        self.enc, self.plan = W.fleet(5, 17, seed=11)
        self.enc4, self.plan4 = W.fleet(4, 9, seed=12)
        self.honest = W.honest_messages(self.enc4, self.plan4)

    # plain replies ------------------------------------------------------------------------------

    def _plain(self, seed: int, evaluation: bool) -> tuple[Any, Any, Any]:
        from protocol.errors import UpdateRejected  # noqa: F401

        rng = random.Random(seed)
        rnd = 2 + seed % 7
        honest = (
            self.W.honest_eval(rnd) if evaluation else self.W.honest_update(rnd, self.adapter, seed)
        )
        if seed % CONTROL_EVERY == 0:
            return rnd, honest, None
        return rnd, honest, self.W.tamper_plain_reply(honest, rnd, rng)

    def decode_reply(self, seed: int, evaluation: bool) -> list[dict[str, Any]]:
        from protocol.errors import UpdateRejected
        from protocol.messages import decode_eval_result, decode_update

        rnd, honest, t = self._plain(seed, evaluation)
        content = honest if t is None else t.payload
        kind, invalid = ("honest control", False) if t is None else (t.kind, t.invalid)
        try:
            if evaluation:
                decode_eval_result(content, rnd=rnd)
            else:
                decode_update(content, self.spec, rnd=rnd)
        except UpdateRejected:
            return [outcome(kind, invalid, accepted=False)]
        except Exception as exc:
            return [outcome(kind, invalid, accepted=False, crash=f"{type(exc).__name__}: {exc}")]
        return [outcome(kind, invalid, accepted=True)]

    def round_reply(self, seed: int, evaluation: bool) -> list[dict[str, Any]]:
        from flwr.app import Message

        from coordinator.clock import VirtualClock
        from coordinator.config import RunConfig
        from coordinator.pipeline import NoPrivacy
        from coordinator.progress import Progress
        from coordinator.rounds import Pipeline, _transport, federated_evaluate
        from coordinator.strategies import Strategy
        from tests.fakegrid import FakeGrid

        rnd, honest_hostile, t = self._plain(seed, evaluation)
        kind, invalid = ("honest control", False) if t is None else (t.kind, t.invalid)
        nodes = [101, 202, 303, 404]
        hostile = nodes[seed % 4]

        def handler(node: int) -> Callable[[Message], Message]:
            def handle(msg: Message) -> Message:
                if node == hostile:
                    content = honest_hostile if t is None else t.payload
                elif evaluation:
                    content = self.W.honest_eval(rnd)
                else:
                    content = self.W.honest_update(rnd, self.adapter, node)
                return Message(content, reply_to=msg)

            return handle

        grid = FakeGrid({n: handler(n) for n in nodes})
        cfg = RunConfig.from_mapping(
            {"min-clients": 2, "clients-per-round": 4, "round-timeout": 300.0}
        )
        try:
            if evaluation:
                row, _d, _u = federated_evaluate(
                    grid, cfg, nodes, self.adapter, rnd, Progress(10, live=False)
                )
                failed = {f["node"] for f in row["eval_failures"]}
            else:
                # The round's training pipeline as run_federation composes it for this config.
                privacy = NoPrivacy(cfg.clients_per_round, cfg.seed)
                pipeline = Pipeline(
                    privacy,
                    _transport(cfg, privacy, VirtualClock(), self.spec.numel),
                    Strategy.create(cfg.strategy_settings(), 4, 4),
                    self.spec,
                    cfg.min_clients,
                )
                _new, result = pipeline.train(
                    grid, cfg, nodes, self.adapter, rnd, Progress(10, live=False)
                )
                failed = {f["node"] for f in result.failures}
        except Exception as exc:
            return [outcome(kind, invalid, accepted=False, crash=f"{type(exc).__name__}: {exc}")]
        honest_failed = len(failed - {hostile})
        return [
            outcome(kind, invalid, accepted=hostile not in failed, honest_rejected=honest_failed)
        ]

    # SecAgg -------------------------------------------------------------------------------------

    def secagg_run(self, seed: int) -> list[dict[str, Any]]:
        """RUN_ROUNDS rounds with one hostile client, tampering at a random stage each round; the
        dispute ledger, the keys seen and the exclusions carry over as in SecureAggregation."""
        from privacy.secagg.server import STAGES, ComplaintLedger

        W = self.W
        rng = random.Random(seed)
        nodes = sorted(self.enc)
        hostile = rng.choice(nodes)
        ledger, known, excluded = ComplaintLedger(), set(), set()
        out = []
        for r in range(1, RUN_ROUNDS + 1):
            if hostile in excluded:  # excluded: the run goes on without it (a control round)
                mutate: random.Random | None = None
            else:
                mutate = None if (seed * RUN_ROUNDS + r) % CONTROL_EVERY == 0 else rng
            stage = rng.choice(STAGES)
            try:
                o = W.hostile_round(
                    self.enc,
                    self.plan,
                    r,
                    hostile,
                    stage,
                    mutate,
                    ledger=ledger,
                    known_keys=known,
                    excluded=excluded,
                )
            except Exception as exc:
                who = "honest client" if isinstance(exc, W.HonestClientCrash) else "coordinator"
                out.append(
                    outcome("?", True, accepted=False, crash=f"{who}: {type(exc).__name__}: {exc}")
                )
                break
            known |= o.advertised
            newly = {d.node for d in o.excluded} - excluded
            excluded |= newly
            kind = o.kind or ("honest control" if mutate is None else "?")
            # An invalid message must get its sender refused (dropped, excluded or named as the
            # culprit of an abort), whether or not the round still completes.
            # Nor may it cost an honest client its round beyond the dispute rule.
            accepted = (o.invalid and not o.hostile_rejected) or not o.sum_exact
            accepted = accepted or (o.invalid and o.honest_harmed > 0)
            hostile_refused = hostile not in excluded and o.hostile_rejected
            valid_refused = (mutate is None and (not o.completed or hostile_refused)) or (
                not o.invalid and o.honest_harmed > 0
            )
            out.append(
                outcome(
                    kind,
                    o.invalid,
                    accepted=accepted,
                    honest_excluded=len(newly - {hostile}),
                    honest_dropped=o.honest_left_by_rule,
                    valid_refused=valid_refused,
                    stage=stage,
                )
            )
        return out

    def secagg_decode(self, seed: int) -> list[dict[str, Any]]:
        from privacy.secagg.messages import SecAggError, from_bytes

        rng = random.Random(seed)
        cls = rng.choice(sorted(self.honest, key=lambda c: c.__name__))
        honest = self.honest[cls]
        limit = 2 * len(honest) + 64
        if seed % CONTROL_EVERY == 0:
            kind, invalid, payload = "honest control", False, honest
        else:
            t = self.W.structural(honest, rng, limit)
            kind, invalid, payload = t.kind, t.invalid, t.payload
        kind = f"{cls.__name__}: {kind}"
        try:
            from_bytes(cls, payload, max_bytes=limit)
        except SecAggError:
            return [outcome(kind, invalid, accepted=False)]
        except Exception as exc:
            return [outcome(kind, invalid, accepted=False, crash=f"{type(exc).__name__}: {exc}")]
        return [outcome(kind, invalid, accepted=True)]

    def honest_client(self, seed: int) -> list[dict[str, Any]]:
        W = self.W
        rng = random.Random(seed)
        kind = W.DOWN_KINDS[seed % len(W.DOWN_KINDS)]
        try:
            o = W.honest_client_case(self.enc4, self.plan4, kind, rng)
        except W.HonestClientCrash as exc:
            return [outcome(kind.__name__, True, accepted=False, crash=f"honest client: {exc}")]
        accepted = o.invalid and not (o.refused or o.complained)
        return [outcome(f"{kind.__name__}: {o.kind}", o.invalid, accepted=accepted)]

    def client_app(self, seed: int) -> list[dict[str, Any]]:
        from flwr.app import ConfigRecord, Message, RecordDict

        from protocol import keys
        from tests.fakegrid import FakeGrid
        from tests.secagg_fleet import Fleet

        rng = random.Random(seed)
        action = keys.SECAGG_ACTIONS[seed % 4]
        down = [self.W.Setup, self.W.KeyDirectory, self.W.ShareDelivery, self.W.UnmaskRequest]
        cls = down[seed % 4]
        t = self.W.structural(self.honest[cls], rng, self.W.MAX_MESSAGE_BYTES)
        FakeGrid({})  # sets the task identity Message() needs
        fleet = Fleet([7], {7: 1})
        msg = Message(
            RecordDict({keys.SECAGG: ConfigRecord({keys.SECAGG_PAYLOAD: t.payload})}),
            dst_node_id=7,
            message_type=f"train.{action}",
        )
        msg.metadata.__dict__["_message_id"] = f"m{seed}"
        kind = f"{action}: {t.kind}"
        try:
            reply = fleet.app(msg, fleet.contexts[7])
        except Exception as exc:
            return [
                outcome(
                    kind, True, accepted=False, crash=f"client app: {type(exc).__name__}: {exc}"
                )
            ]
        refused = reply.has_error() and "rejected" in (reply.error.reason or "")
        return [outcome(kind, True, accepted=not refused)]

    def run(self, family: str, seed: int) -> list[dict[str, Any]]:
        if family == "train replies -> decode_update":
            return self.decode_reply(seed, evaluation=False)
        if family == "eval replies -> decode_eval_result":
            return self.decode_reply(seed, evaluation=True)
        if family == "train replies -> the round pipeline":
            return self.round_reply(seed, evaluation=False)
        if family == "eval replies -> rounds.federated_evaluate":
            return self.round_reply(seed, evaluation=True)
        if family == "secagg replies -> ServerSession":
            return self.secagg_run(seed)
        if family == "secagg messages -> from_bytes":
            return self.secagg_decode(seed)
        if family == "coordinator messages -> honest client":
            return self.honest_client(seed)
        return self.client_app(seed)


def worker(conn: Connection) -> None:
    import logging

    logging.disable(logging.WARNING)  # the round code logs every rejected client
    cases = Cases()
    conn.send("ready")
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(cases.run(*task))


# -- the parent: watchdog and figures -------------------------------------------------------------


class Pool:
    """One worker process; a task that outlives its watchdog kills it and a fresh one starts."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker, args=(child,), daemon=True)
        self.proc.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("fuzz worker did not start within 300 s")

    def run(self, task: tuple[str, int], timeout: float) -> list[dict[str, Any]] | None:
        self.conn.send(task)
        if self.conn.poll(timeout):
            try:
                result: list[dict[str, Any]] = self.conn.recv()
                return result
            except EOFError:  # the worker died (e.g. killed for memory): a crash
                self._restart()
                return [outcome("worker died", True, accepted=False, crash="worker process died")]
        self._restart()
        return None

    def _restart(self) -> None:
        self.proc.kill()
        self.proc.join(30)
        self._start()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(30)


def plan_tasks(cases: int, seed: int) -> list[tuple[str, int]]:
    tasks = []
    for i, (family, (share, _what)) in enumerate(FAMILIES.items()):
        n = round(cases * share)
        if family == "secagg replies -> ServerSession":
            n = -(-n // RUN_ROUNDS)  # runs of RUN_ROUNDS rounds
        tasks += [(family, seed * 1_000_003 + i * 100_000 + k) for k in range(n)]
    random.Random(seed).shuffle(tasks)
    return tasks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="generated cases (default 10,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="watchdog per case, seconds")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz.json")
    args = ap.parse_args(argv)

    tasks = plan_tasks(args.cases, args.seed)
    stats: dict[str, Counter[str]] = defaultdict(Counter)
    examples: dict[str, list[str]] = defaultdict(list)
    kinds: Counter[str] = Counter()
    t0 = time.perf_counter()
    pool = Pool()
    try:
        for done, (family, seed) in enumerate(tasks, 1):
            rounds = RUN_ROUNDS if family.startswith("secagg replies") else 1
            results = pool.run((family, seed), args.timeout * rounds)
            s = stats[family]
            if results is None:
                s["cases"] += rounds
                s["hangs"] += 1
                examples["hangs"].append(f"{family} seed {seed}")
                continue
            for r in results:
                s["cases"] += 1
                s["invalid"] += r["invalid"]
                kinds[r["kind"]] += 1
                if r["crash"]:
                    s["crashes"] += 1
                    examples["crashes"].append(
                        f"{family} seed {seed}: {r['kind']}: {r['crash'][:300]}"
                    )
                elif r["invalid"] and r["accepted"]:
                    s["accepted-when-invalid"] += 1
                    examples["accepted"].append(f"{family} seed {seed}: {r['kind']}")
                elif not r["invalid"] and r["kind"] != "?":
                    s["valid"] += 1
                    control_refused = (
                        r["kind"] == "honest control"
                        and not r["accepted"]
                        and not family.startswith("secagg replies")
                    )
                    if r.get("valid_refused") or control_refused:
                        s["valid refused"] += 1
                        examples["valid refused"].append(f"{family} seed {seed}: {r['kind']}")
                s["honest excluded"] += r.get("honest_excluded", 0)
                s["honest left a round"] += r.get("honest_dropped", 0)
                s["honest replies rejected"] += r.get("honest_rejected", 0)
            if done % 500 == 0:
                print(f"  {done}/{len(tasks)} tasks, {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        pool.close()
    seconds = time.perf_counter() - t0

    cols = [
        "cases",
        "invalid",
        "accepted-when-invalid",
        "crashes",
        "hangs",
        "honest excluded",
        "valid",
        "valid refused",
        "honest left a round",
    ]
    total: Counter[str] = Counter()
    width = max(len(f) for f in FAMILIES) + 2
    print(
        f"\nfuzz: seed {args.seed}, {sum(s['cases'] for s in stats.values())} cases in "
        f"{seconds:.0f} s (watchdog {args.timeout:g} s per case)\n"
    )
    print("family".ljust(width) + " ".join(f"{c:>10.10}" for c in cols))
    for family in FAMILIES:
        s = stats[family]
        total.update(s)
        print(family.ljust(width) + " ".join(f"{s[c]:>10}" for c in cols))
    print("total".ljust(width) + " ".join(f"{total[c]:>10}" for c in cols))
    print(
        f"\naccepted-when-invalid {total['accepted-when-invalid']}, crashes {total['crashes']}, "
        f"hangs {total['hangs']}, honest clients excluded {total['honest excluded']} "
        "(target 0, 0, 0, 0)"
    )
    print(f"honest replies rejected in plain rounds: {total['honest replies rejected']}")
    for what, lines in examples.items():
        print(f"\n{what} ({len(lines)}), first ones:")
        for line in lines[:10]:
            print("  " + line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "seed": args.seed,
                "cases": total["cases"],
                "seconds": round(seconds, 1),
                "watchdog_seconds": args.timeout,
                "totals": {c: total[c] for c in cols},
                "families": {f: dict(stats[f]) for f in FAMILIES},
                "kinds": dict(kinds.most_common()),
                "examples": {k: v[:20] for k, v in examples.items()},
            },
            indent=1,
        )
    )
    print(f"\nwritten to {args.out}")
    bad = (
        total["accepted-when-invalid"]
        + total["crashes"]
        + total["hangs"]
        + total["honest excluded"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
