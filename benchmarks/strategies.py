"""Federated optimizers against a centralized run, on the real model (SmolLM2-135M, NF4 base).

Dolly-15k split Dirichlet(alpha) over ``category`` into ``--clients`` clients (32 by default) after
a fixed held-out set (``--heldout-per-category`` rows per category) is removed. Every strategy runs
the same rounds, clients per round (seeded samples), local steps and seed, through the library's
own pieces in one process: ``client.train.train_round`` with the strategy's gradient corrections
(FedProx, SCAFFOLD with per-client control variates), the wire encode/decode, the pipeline's
running sum and ``coordinator.strategies.Strategy`` for the server step. The **centralized** run
trains one LoRA adapter on the pooled training rows of the clients with the same total number of
examples seen (rounds x clients per round x local steps x batch size), at each learning rate of
``--central-lr`` (default: the clients' ``--lr``); the one with the lowest held-out loss is the
ceiling, so tuning the clients' learning rate never compares them with an untuned ceiling.

For each strategy: held-out loss after every round, and the share of the centralized run's loss
gain over the base model it recovers, (base - federated) / (base - centralized). Prints a table,
writes ``strategies.json``, ``strategies.png`` and every final adapter (``adapters/*.safetensors``)
to ``--out``. ``--server-lr NAME=LR,LR,...`` sets or sweeps a strategy's server learning rate
(each value is its own run, labelled ``NAME@LR``). ``--reuse`` keeps the runs already in ``--out``
(same data and training settings, adapter file present) and trains only the missing ones, so a
long benchmark can be stopped and continued. ``--ceiling-from DIR`` takes the centralized runs
from another ``--out`` instead (one trained at the same time in a second process with
``--strategies ''``), so the ceiling and the federation use two cores. Dolly-15k: Databricks,
CC BY-SA 3.0.

    python benchmarks/strategies.py --rounds 3 --local-steps 3
    python benchmarks/strategies.py --strategies fedadam --server-lr fedadam=0.01,0.03,0.1 --reuse
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.logs import quiet_libraries  # noqa: E402

quiet_libraries()  # before torchao and transformers are imported: their chatter is not ours

import torch  # noqa: E402

from benchmarks._common import load_average, run_values  # noqa: E402
from benchmarks.privacy_utility import heldout_and_clients  # noqa: E402
from client.corrections import ProximalTerm, Scaffold  # noqa: E402
from client.data import load_records, to_conversations, tokenize_all  # noqa: E402
from client.durable import write_bytes_atomic  # noqa: E402
from client.model import (  # noqa: E402
    ComputeDtype,
    Quantization,
    attach_lora,
    compute_precision,
    default_cache_dir,
    get_adapter,
    load_base,
    pick_device,
    resolve_compute_dtype,
    resolve_model,
    set_adapter,
)
from client.tasks import Task, TaskKind, TaskSpec, evaluate_task, load_task  # noqa: E402
from client.train import Correction, PlainSteps, evaluate, train_round  # noqa: E402
from coordinator.aggregators import Accumulator  # noqa: E402
from coordinator.config import RunConfig  # noqa: E402
from coordinator.pipeline import Contribution, NoPrivacy  # noqa: E402
from coordinator.schedules import LrSchedule, round_learning_rate  # noqa: E402
from coordinator.strategies import STRATEGIES, Strategy, StrategySettings  # noqa: E402
from protocol.adapter import AdapterSpec, instruction_keys, trained_tensors  # noqa: E402
from protocol.messages import decode_update, encode_update  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "data" / "dolly15k" / "by_category")
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--quantization", default="nf4")
    p.add_argument(
        "--compute-dtype",
        default="fp32",
        choices=["fp32", "bf16", "auto"],
        help="precision of the training steps' matrix products (held-out losses are always "
        "computed in fp32)",
    )
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet alpha over category")
    p.add_argument("--natural", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clients-per-round", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="the clients' AdamW learning rate")
    p.add_argument(
        "--lr-schedule",
        default="constant",
        choices=[m.value for m in LrSchedule],
        help="cosine: the clients' rate decays over the rounds (the run option --lr-schedule) "
        "and the centralized run's over its steps, by the same formula",
    )
    p.add_argument("--min-lr", type=float, default=0.0, help="cosine: the rate it decays toward")
    p.add_argument(
        "--central-lr",
        default="",
        help="LR[,LR...]: the centralized run's learning rate(s) (default: --lr); with several, "
        "each is a run and the one with the lowest held-out loss is the ceiling",
    )
    p.add_argument("--heldout-per-category", type=int, default=8)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument(
        "--server-lr",
        action="append",
        default=[],
        help="NAME=LR[,LR...]: server learning rate(s) for a strategy (default: the strategy's "
        "default); several values sweep it, one run each, labelled NAME@LR",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the runs already in --out whose settings match and whose adapter is saved",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="KEY=VALUE: a run option for every strategy run, as `fedtune simulate` spells it "
        "(e.g. proximal-mu=0.1, server-momentum=0.5)",
    )
    p.add_argument(
        "--ceiling-from",
        type=Path,
        default=None,
        help="DIR: take the centralized run at each --central-lr from DIR (the --out of a run "
        "of this benchmark with the same data and centralized settings, e.g. `--strategies ''` "
        "in a second process at the same time) instead of training it here",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--task",
        action="append",
        default=[],
        help="KIND=FILE[@N]: after training, score the base model, the centralized adapter and "
        "every strategy's final adapter on this task (a seeded subset of N rows); "
        "benchmarks/tasks.py writes label and choice tasks from Dolly's held-out rows",
    )
    p.add_argument(
        "--top-task",
        action="append",
        default=[],
        help="KIND=FILE[@N]: like --task, but only for the base model, the centralized adapter, "
        "fedavg and the strategy with the lowest final held-out loss",
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


# Settings that change what a run trains: a saved run is reused only if all of them match.
SAME_RUN = ("data", "model", "quantization", "clients", "alpha", "natural", "clients_per_round",
            "rounds", "local_steps", "batch_size", "seq_len", "eval_seq_len", "lr",
            "heldout_per_category", "seed", "compute_dtype", "lr_schedule", "min_lr",
            "option")  # fmt: skip
# Settings added later, with the value every run made before them used.
SAME_RUN_DEFAULTS = {"compute_dtype": "fp32", "lr_schedule": "constant", "min_lr": 0.0,
                     "option": []}  # fmt: skip
# Run options only the federated runs read (the server optimizer's, FedProx's mu, FFA-LoRA: the
# ceiling stays a centralized run of the whole adapter): like the clients' --lr, a change to them
# keeps the centralized runs and retrains the strategy runs.
STRATEGY_ONLY = frozenset(
    f.name.replace("_", "-") for f in dataclasses.fields(StrategySettings) if f.name != "name"
) | {"ffa-lora"}


def option_key(item: str) -> str:
    """The KEY of an ``--option KEY=VALUE`` item."""
    return item.partition("=")[0].strip()


def central_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What a centralized run depends on: ``SAME_RUN`` but the clients' lr, and the options but
    ``STRATEGY_ONLY``'s."""
    out = {k: config.get(k) for k in SAME_RUN if k not in ("lr", "option")}
    return out | {"option": [i for i in config["option"] if option_key(i) not in STRATEGY_ONLY]}


def made_with(result: dict[str, Any]) -> dict[str, Any]:
    """The settings a saved ``strategies.json`` was made with (later settings at their old
    values)."""
    return {**SAME_RUN_DEFAULTS, **result.get("config", {})}


def central_differences(made: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The centralized settings in which ``made`` differs from this invocation's."""
    ours, theirs = central_settings(saved_config(args)), central_settings(made)
    return sorted(k for k in ours if ours[k] != theirs.get(k))


def saved_config(args: argparse.Namespace) -> dict[str, Any]:
    """``args`` as ``strategies.json`` records them (what ``--reuse`` compares)."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return config | {"out": None, "reuse": None}


def plan_runs(strategies: str, server_lr: list[str]) -> list[tuple[str, str, float]]:
    """(label, strategy, server lr or 0 for the strategy's default) for every run to do."""
    lrs: dict[str, list[float]] = {}
    for item in server_lr:
        name, _, raw = item.partition("=")
        if name not in STRATEGIES or not raw:
            raise SystemExit(f"--server-lr {item!r}: expected NAME=LR[,LR...] with NAME one of "
                             f"{', '.join(STRATEGIES)}")  # fmt: skip
        lrs[name] = [float(v) for v in raw.split(",")]
    runs: list[tuple[str, str, float]] = []
    for name in [s for s in strategies.split(",") if s]:
        values = lrs.get(name, [0.0])
        for lr in values:
            runs.append((f"{name}@{lr:g}" if name in lrs else name, name, lr))
    return runs


def run_options(items: list[str]) -> dict[str, str]:
    """``--option KEY=VALUE`` pairs; ``RunConfig`` checks and converts the values."""
    known = RunConfig.keys()
    out: dict[str, str] = {}
    for item in items:
        key = option_key(item)
        _, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--option {item!r}: expected KEY=VALUE with KEY a run option")
        out[key] = value.strip()
    return out


def central_lrs(args: argparse.Namespace) -> list[float]:
    """The centralized run's learning rates (``--central-lr``, default ``--lr``)."""
    try:
        values = [float(v) for v in args.central_lr.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--central-lr {args.central_lr!r}: expected LR[,LR...]") from None
    return values or [args.lr]


def previous(args: argparse.Namespace) -> dict[str, Any]:
    """The results in --out that --reuse may keep (empty if the settings differ)."""
    path = args.out / "strategies.json"
    if not args.reuse or not path.exists():
        return {}
    old: dict[str, Any] = json.loads(path.read_text())
    made = made_with(old)
    now = saved_config(args)
    if central_differences(made, args):
        print(f"--reuse: {path} was made with other settings; training everything", flush=True)
        return {}
    central = old.get("centralized")
    if isinstance(central, dict) and "lr" not in central:  # from before --central-lr: at its --lr
        lr = float(old["config"]["lr"])
        old["centralized_by_lr"] = {f"{lr:g}": {**central, "lr": lr}}
        adapter = load_adapter(args.out, "centralized")
        if adapter is not None:
            save_adapter(args.out, f"centralized@{lr:g}", adapter)
    # The centralized runs (each has its lr) still count for other clients' or server settings.
    if any(made.get(k) != now[k] for k in ("lr", "option")):
        print(f"--reuse: {path} was made with clients' lr {old['config'].get('lr')} and options "
              f"{made['option']}; keeping its centralized runs only", flush=True)  # fmt: skip
        old = centralized_only(old)
    return old


def ceiling_from(args: argparse.Namespace) -> dict[str, Any]:
    """The centralized runs (by lr) that ``--ceiling-from`` names, checked: made with the same
    centralized settings as this invocation, one per ``--central-lr``, each adapter saved."""
    src: Path = args.ceiling_from
    path = src / "strategies.json"
    if not path.is_file():
        raise SystemExit(f"--ceiling-from {src}: no strategies.json there (has its run finished? "
                         "the runs trained here are saved: rerun with --reuse)")  # fmt: skip
    try:
        made: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"--ceiling-from {path}: not JSON ({e})") from None
    config = made_with(made)
    differ = central_differences(config, args)
    if differ:
        theirs = central_settings(config)
        raise SystemExit(f"--ceiling-from {path}: made with other centralized settings "
                         f"({', '.join(f'{k}={theirs.get(k)!r}' for k in differ)})")  # fmt: skip
    runs: dict[str, Any] = made.get("centralized_by_lr", {})
    keys = [f"{lr:g}" for lr in central_lrs(args)]
    for key in keys:
        if key not in runs:
            raise SystemExit(f"--ceiling-from {path}: no centralized run at lr {key}")
        if not (src / "adapters" / f"centralized@{key}.safetensors").is_file():
            raise SystemExit(f"--ceiling-from {src}: adapters/centralized@{key}.safetensors "
                             "is missing")  # fmt: skip
    return {key: runs[key] for key in keys}


def centralized_only(old: dict[str, Any]) -> dict[str, Any]:
    """A previous result without its strategy runs (its centralized runs each have their lr)."""
    return {k: v for k, v in old.items() if not (isinstance(v, dict) and "losses" in v)}


def save_adapter(out: Path, label: str, adapter: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    (out / "adapters").mkdir(parents=True, exist_ok=True)
    blob = save({k: np.ascontiguousarray(v) for k, v in adapter.items()})
    write_bytes_atomic(out / "adapters" / f"{label}.safetensors", blob)


def load_adapter(out: Path, label: str) -> dict[str, np.ndarray] | None:
    from safetensors.numpy import load_file

    path = out / "adapters" / f"{label}.safetensors"
    return dict(load_file(str(path))) if path.exists() else None


@dataclasses.dataclass
class Bench:
    """What every run of one invocation shares: the model with its LoRA adapter, the clients'
    rows (tokenized on first use), the held-out rows and the run options."""

    args: argparse.Namespace
    device: torch.device
    precision: ComputeDtype
    model: Any
    tok: Any
    pad: int
    cfg0: RunConfig
    initial: dict[str, np.ndarray]
    heldout: list[Any]
    convs: list[Any]
    shards: dict[int, list[int]]
    cache: dict[int, list[Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, args: argparse.Namespace) -> Bench:
        # The training steps' precision (held-out losses are fp32); a client computing in bf16
        # holds an unquantized base's weights in bf16, and so does this benchmark.
        device = pick_device()  # a CUDA GPU where there is one
        precision = resolve_compute_dtype(ComputeDtype(args.compute_dtype), device)
        records = load_records(args.data)
        base = load_base(
            resolve_model(args.model),
            Quantization.parse(args.quantization),
            default_cache_dir(),
            device,
            compute=precision,
        )
        tok = base.tokenizer
        cfg0 = RunConfig.from_mapping(
            run_values(args)
            | {"lr-schedule": args.lr_schedule, "min-learning-rate": args.min_lr}
            | run_options(args.option)
        )
        model = attach_lora(base.model, cfg0.lora, seed=args.seed)
        held, shards = heldout_and_clients(records, args)
        convs = to_conversations(records, args.data)
        heldout = [
            e
            for idx in held.values()
            for e in tokenize_all(tok, [convs[i] for i in idx], args.eval_seq_len)
        ]
        return cls(args, device, precision, model, tok, int(tok.pad_token_id), cfg0,
                   get_adapter(model), heldout, convs, shards)  # fmt: skip

    def data(self, cid: int) -> list[Any]:
        if cid not in self.cache:
            rows = [self.convs[i] for i in self.shards[cid]]
            self.cache[cid] = tokenize_all(self.tok, rows, self.args.seq_len)
        return self.cache[cid]

    @functools.cached_property
    def pooled(self) -> list[Any]:
        """Every client's training rows, in client order: the centralized run's data."""
        return [e for cid in range(self.args.clients) for e in self.data(cid)]

    def held_loss(self, adapter: dict[str, np.ndarray]) -> float:
        return evaluate(
            self.model, self.heldout, batch_size=8, pad_id=self.pad, global_adapter=adapter
        ).loss

    def federated(
        self, label: str, name: str, lr: float | None, base_loss: float
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One strategy's run through the library's pieces: its record and final adapter."""
        args, initial = self.args, self.initial
        cfg = RunConfig.from_mapping(
            {**self.cfg0.to_mapping(), "strategy": name, "server-learning-rate": lr}
        )
        strategy = Strategy.create(cfg.strategy_settings(), args.clients, args.clients_per_round)
        spec = AdapterSpec.of(initial)
        trained = trained_tensors(spec, cfg.ffa_lora)
        trainable_keys = instruction_keys(trained, spec.names)
        expected = strategy.update_spec(trained)
        privacy = NoPrivacy(args.clients_per_round, args.seed)
        controls: dict[int, dict[str, np.ndarray]] = {}
        adapter = dict(initial)
        losses = [base_loss]
        population = list(range(args.clients))
        t0 = time.perf_counter()
        for rnd in range(1, args.rounds + 1):
            instr = strategy.instruction(cfg.train_instruction(rnd))
            instr = dataclasses.replace(instr, trainable_keys=trainable_keys)
            acc = Accumulator(expected)
            cohort = privacy.sample(population, rnd)
            for cid in cohort:
                corrections: list[Correction] = []
                if instr.proximal_mu > 0:
                    corrections.append(ProximalTerm(instr.proximal_mu, adapter))
                scaffold = None
                if strategy.scaffold:
                    c = {k: strategy.control.get(k, np.zeros(adapter[k].shape)).astype(np.float32)
                         for k in trained.names}  # fmt: skip
                    scaffold = Scaffold(c, controls.get(cid, {}))
                    corrections.append(scaffold)
                with compute_precision(self.precision, self.device):
                    up = train_round(self.model, self.data(cid), instr, adapter, pad_id=self.pad,
                                     client_seed=cid, corrections=corrections)  # fmt: skip
                delta = dict(up.delta)
                if scaffold is not None:
                    new_c = scaffold.new_client_control()
                    delta.update(scaffold.control_delta(new_c))
                    controls[cid] = new_c
                wire = encode_update(dataclasses.replace(up, delta=delta), rnd=rnd)
                decoded = decode_update(wire, expected, rnd=rnd)  # what crosses the wire
                acc.add(decoded.delta, float(decoded.num_examples))
            mean, _ = privacy.release(Contribution(acc.sum, acc.weight, list(cohort)))
            adapter = strategy.apply(adapter, mean)
            losses.append(self.held_loss(adapter))
            print(f"{label} round {rnd}: {losses[-1]:.4f}", flush=True)
        record = {
            "strategy": name,
            "losses": losses,
            "server_learning_rate": strategy.record()["server_learning_rate"],
            "seconds": time.perf_counter() - t0,
            "load_average": load_average(),
        }
        return record, adapter

    def centralized(self, lr: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One adapter on the pooled rows, the same examples seen as the federation, annealed
        as the clients are: its record and adapter."""
        args, initial = self.args, self.initial
        steps = args.rounds * args.clients_per_round * args.local_steps
        t0 = time.perf_counter()
        instr = dataclasses.replace(
            self.cfg0.train_instruction(1), local_steps=steps, learning_rate=lr
        )
        engine = scheduled_steps(LrSchedule(args.lr_schedule), lr, min(args.min_lr, lr))
        with compute_precision(self.precision, self.device):
            up = train_round(self.model, self.pooled, instr, initial, pad_id=self.pad,
                             client_seed=args.seed, engine=engine)  # fmt: skip
        adapter = {k: initial[k] + up.delta[k] for k in initial}
        record = {"loss": self.held_loss(adapter), "steps": steps, "lr": lr,
                  "seconds": time.perf_counter() - t0}  # fmt: skip
        return record, adapter

    def score(self, task: Task, adapter: dict[str, np.ndarray]) -> dict[str, Any]:
        """``task``'s metrics for ``adapter`` (for a label or choice task also how often each
        class is answered) and the seconds scoring took."""
        set_adapter(self.model, adapter)
        t0 = time.perf_counter()
        result = evaluate_task(self.model, self.tok, task)
        row: dict[str, Any] = result.metrics | {"seconds": time.perf_counter() - t0}
        if result.confusion is not None:
            answered = np.asarray(result.confusion).sum(axis=0).tolist()
            row["predicted"] = dict(zip(result.classes, answered, strict=True))
        return row


def main() -> None:
    args = parse_args()
    runs = plan_runs(args.strategies, args.server_lr)
    old = previous(args)
    if args.ceiling_from is not None and (args.ceiling_from / "strategies.json").exists():
        ceiling_from(args)  # a finished ceiling made with other settings fails now, not at the end
    bench = Bench.load(args)
    tasks = {
        **read_tasks(args.task, args.seed, top=False),
        **read_tasks(args.top_task, args.seed, top=True),
    }
    finals: dict[str, dict[str, np.ndarray]] = {"base model": bench.initial}
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": saved_config(args)}
    # Runs kept from --out stay in the JSON even if this invocation does not list them.
    results |= {k: v for k, v in old.items() if isinstance(v, dict) and "losses" in v}

    def write() -> None:
        # Atomic: a --ceiling-from reader in another process never sees half a file.
        text = json.dumps(results, indent=2, default=str)
        write_bytes_atomic(args.out / "strategies.json", text.encode())

    if "base_loss" in old:
        base_loss = float(old["base_loss"])
        print(f"base model loss {base_loss:.4f} (kept)", flush=True)
    else:
        base_loss = bench.held_loss(bench.initial)
        print(f"held-out rows {len(bench.heldout)}; base model loss {base_loss:.4f}", flush=True)
    results["base_loss"] = base_loss

    for label, name, lr in runs:
        kept = load_adapter(args.out, label) if label in old else None
        if kept is not None:
            results[label] = old[label]
            finals[label] = kept
            print(f"{label}: {old[label]['losses'][-1]:.4f} (kept)", flush=True)
        else:
            results[label], finals[label] = bench.federated(label, name, lr, base_loss)
            save_adapter(args.out, label, finals[label])
        write()

    # Centralized: one adapter on the pooled rows at each --central-lr; the lowest held-out loss
    # is the ceiling the strategies are held to. After the strategies, so that a ceiling
    # --ceiling-from names may still be training meanwhile.
    ceiling = ceiling_from(args) if args.ceiling_from is not None else {}
    central_runs: dict[str, Any] = dict(old.get("centralized_by_lr", {}))
    lrs = central_lrs(args)
    for lr in lrs:
        key = f"{lr:g}"
        label = f"centralized@{key}"
        if args.ceiling_from is not None:
            how = f"from {args.ceiling_from}"
            central_runs[key] = ceiling[key]
            kept = load_adapter(args.ceiling_from, label)
            assert kept is not None  # ceiling_from checked the file
            save_adapter(args.out, label, kept)  # --out holds every adapter its JSON names
        else:
            how = "kept"
            kept = load_adapter(args.out, label) if key in central_runs else None
        if kept is not None:
            finals[label] = kept
            print(f"{label}: {float(central_runs[key]['loss']):.4f} ({how})", flush=True)
            continue
        central_runs[key], finals[label] = bench.centralized(lr)
        save_adapter(args.out, label, finals[label])
        print(f"{label} ({central_runs[key]['steps']} steps): {central_runs[key]['loss']:.4f}",
              flush=True)  # fmt: skip
    tried = {f"{lr:g}": central_runs[f"{lr:g}"] for lr in lrs}
    best_lr = min(tried, key=lambda k: float(tried[k]["loss"]))
    results["centralized"] = tried[best_lr]
    results["centralized_by_lr"] = central_runs
    central_loss = float(results["centralized"]["loss"])
    print(f"centralized, best of lr {', '.join(tried)}: lr {best_lr}, {central_loss:.4f}",
          flush=True)  # fmt: skip
    finals["centralized"] = finals[f"centralized@{best_lr}"]
    finals = {k: v for k, v in finals.items() if not k.startswith("centralized@")}
    save_adapter(args.out, "centralized", finals["centralized"])  # the ceiling, by its old name
    # Every run's share is of this invocation's ceiling (a new --central-lr may have moved it
    # since a kept run was trained).
    gain = base_loss - central_loss
    for run in (r for r in results.values() if isinstance(r, dict) and "losses" in r):
        run["recovered"] = (base_loss - float(run["losses"][-1])) / gain if gain > 0 else None
    write()

    labels = [label for label, _, _ in runs]
    print("\n| strategy | server lr | held-out loss by round | recovered of centralized gain |")
    print("|---|---|---|---|")
    print(f"| centralized | - | {base_loss:.4f} -> {central_loss:.4f} | 100% |")
    for label in labels:
        r = results[label]
        rec = f"{100 * r['recovered']:.0f}%" if r["recovered"] is not None else "n/a"
        path = " -> ".join(f"{x:.4f}" for x in r["losses"])
        print(f"| {label} | {r['server_learning_rate']:g} | {path} | {rec} |", flush=True)
    plot(results, args)

    best = min(labels, key=lambda n: results[n]["losses"][-1]) if labels else None
    fedavg = next((n for n in labels if results[n].get("strategy", n) == "fedavg"), None)
    results["best_by_loss"] = best
    results["tasks"] = {}
    for task_name, (task, top) in tasks.items():
        scored = [n for n in finals if not top or n in ("base model", "centralized", fedavg, best)]
        rows: dict[str, dict[str, Any]] = {}
        for n in scored:
            rows[n] = bench.score(task, finals[n])
            print(f"{task_name} {n}: accuracy {rows[n]['accuracy']:.3f}", flush=True)
        results["tasks"][task_name] = rows
        write()
        print_task_table(task_name, rows)
    write()


def scheduled_steps(schedule: LrSchedule, lr: float, min_lr: float) -> Any:
    """The centralized run's trainer: plain AdamW steps whose rate follows ``schedule`` over the
    run's steps (the federation's clients follow it over rounds)."""

    class Scheduled(PlainSteps):
        done = 0

        def step(self, params: Any, corrections: Any) -> None:
            self.done += 1
            rate = round_learning_rate(schedule, self.done, self.instr.local_steps, lr, min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = rate
            super().step(params, corrections)

    return lambda optimizer, instr, _model: Scheduled(optimizer, instr)


def read_tasks(items: list[str], seed: int, top: bool) -> dict[str, tuple[Task, bool]]:
    """``KIND=FILE[@N]`` -> the loaded task (a seeded subset of N rows) and whether it is scored
    only for the top adapters."""
    out: dict[str, tuple[Task, bool]] = {}
    for item in items:
        kind, _, rest = item.partition("=")
        path, _, limit = rest.partition("@")
        spec = TaskSpec(kind=TaskKind.parse(kind), limit=int(limit or 0), seed=seed)
        out[f"{kind}:{Path(path).stem}"] = (load_task(path, spec), top)
    return out


def recovered(base: float, central: float, federated: float) -> float | None:
    """Share of the centralized run's gain over the base that a federated run recovers
    ((federated - base) / (central - base) for a higher-is-better metric); None without a gain."""
    gain = central - base
    return (federated - base) / gain if gain > 0 else None


def print_task_table(task: str, rows: dict[str, dict[str, Any]]) -> None:
    base, central = rows["base model"], rows["centralized"]
    print(f"\n{task} ({int(base['rows_scored'])} rows): majority-class baseline "
          f"{base['majority_baseline']:.3f}, chance {base['chance_baseline']:.3f}")  # fmt: skip
    print("| adapter | accuracy | macro-F1 | mean one-vs-rest AUC | recovered of centralized "
          "accuracy gain |\n|---|---|---|---|---|")  # fmt: skip
    for label, m in rows.items():
        rec = recovered(base["accuracy"], central["accuracy"], m["accuracy"])
        top = label in ("base model", "centralized")
        cell = "-" if top else ("n/a (no centralized gain)" if rec is None else f"{rec:.0%}")
        f1, auc = m.get("macro_f1", float("nan")), m.get("mean_ovr_auc", float("nan"))
        print(f"| {label} | {m['accuracy']:.3f} | {f1:.3f} | {auc:.3f} | {cell} |")


def plot(results: dict[str, Any], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One line per strategy: its best server learning rate by final loss (a sweep's other
    # rates, a diverged one included, are in the table and the JSON).
    best: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, r in results.items():
        if isinstance(r, dict) and "losses" in r and name != "centralized":
            strategy = name.split("@")[0]
            if strategy not in best or r["losses"][-1] < best[strategy][1]["losses"][-1]:
                best[strategy] = (name, r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in sorted(best.values(), key=lambda nr: nr[1]["losses"][-1]):
        lr = r.get("server_learning_rate")
        label = f"{name.split('@')[0]} (server lr {lr:g})" if lr is not None else name
        ax.plot(range(len(r["losses"])), r["losses"], marker="o", label=label)
    ax.axhline(results["centralized"]["loss"], color="k", ls="--", label="centralized")
    ax.set_xlabel("round")
    ax.set_xticks(range(args.rounds + 1))
    ax.set_ylabel("held-out loss per response token")
    ax.set_title(f"Dolly-15k, {args.clients} clients Dirichlet({args.alpha}), "
                 f"{args.clients_per_round}/round; best server lr of each")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "strategies.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
