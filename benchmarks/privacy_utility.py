"""Privacy against utility, and the cost of DP-SGD, on the real model (SmolLM2-135M, NF4 base).

Part 1 (utility): federated LoRA fine-tuning on Dolly-15k, held-out loss per category after the
same number of rounds, for client-level epsilon in {1, 4, 8} and no DP, each with and without
FFA-LoRA. Clients are Dirichlet(alpha) splits over category (64 by default: with Dolly's 8
natural clients, client-level noise swamps any update; see the README). A fixed held-out set
(``--heldout-per-category`` rows of each category) is removed before partitioning. The rounds run
in-process with the library's own pieces (client.train.train_round, the wire encode/decode,
coordinator.dp.ClientLevelDP around FedAvg, Poisson cohorts), without Flower's engine.

Part 2 (cost): time per local step of DP-SGD (Opacus per-example gradients on the LoRA
parameters + clipping + noise) against plain LoRA training, same model, same process, same
expected batch size, interleaved to share the machine's load.

Prints a table and writes ``privacy_utility.png`` (and a JSON of the numbers) to ``--out``.
Dolly-15k: Databricks, CC BY-SA 3.0.

    python benchmarks/privacy_utility.py --data /work/shared/data/dolly15k/by_category
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import run_values  # noqa: E402
from client.data import load_records, to_conversations, tokenize_all  # noqa: E402
from client.dpsgd import dpsgd_round  # noqa: E402
from client.model import (  # noqa: E402
    Quantization,
    attach_lora,
    default_cache_dir,
    get_adapter,
    load_base,
    resolve_model,
)
from client.train import evaluate, train_round  # noqa: E402
from coordinator.aggregation import fedavg_aggregator  # noqa: E402
from coordinator.config import RunConfig  # noqa: E402
from coordinator.dp import ClientLevelDP, resolve_client_dp  # noqa: E402
from coordinator.rounds import sample_nodes  # noqa: E402
from protocol.adapter import AdapterSpec, instruction_keys, trained_tensors  # noqa: E402
from protocol.messages import SampleDP, decode_update, encode_update  # noqa: E402
from simulations.partition import PartitionSpec, partition  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "data" / "dolly15k" / "by_category")
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha over category")
    p.add_argument(
        "--natural",
        action="store_true",
        help="one client per category (Dolly: 8) instead of --clients Dirichlet splits",
    )
    p.add_argument("--clients-per-round", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--clip-norm", type=float, default=0.05)
    p.add_argument("--delta", type=float, default=1e-4)
    p.add_argument("--epsilons", default="1,4,8", help="client-level targets; no DP is added")
    p.add_argument("--heldout-per-category", type=int, default=12)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--cost-steps", type=int, default=6, help="steps per method in part 2")
    p.add_argument("--skip-utility", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-noise-table", action="store_true")
    p.add_argument("--cost-first", action="store_true", help="run part 2 before part 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args()


def heldout_and_clients(
    records: list[dict[str, Any]], args: argparse.Namespace
) -> tuple[dict[str, list[int]], list[np.ndarray]]:
    rng = np.random.default_rng(args.seed)
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_cat[str(r["category"])].append(i)
    held: dict[str, list[int]] = {}
    for cat, idx in sorted(by_cat.items()):
        held[cat] = sorted(rng.choice(idx, size=args.heldout_per_category, replace=False).tolist())
    taken = {i for v in held.values() for i in v}
    rest = [i for i in range(len(records)) if i not in taken]
    spec = PartitionSpec.parse(
        "natural:category" if args.natural else f"dirichlet:category:{args.alpha}"
    )
    _, shards = partition([records[i] for i in rest], spec, args.clients, args.seed)
    return held, [np.asarray([rest[int(j)] for j in s]) for s in shards]


def run_utility(
    args: argparse.Namespace, base: Any, model: Any, records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    tok = base.tokenizer
    pad = int(tok.pad_token_id)
    held, shards = heldout_and_clients(records, args)
    convs = to_conversations(records, args.data)
    # Held-out rows are tokenized at --eval-seq-len so that categories with long contexts
    # (closed_qa, summarization, information_extraction) keep their responses.
    heldout = {
        c: tokenize_all(tok, [convs[i] for i in idx], args.eval_seq_len) for c, idx in held.items()
    }
    for c, ex in heldout.items():
        if not ex:
            raise SystemExit(f"no held-out {c} example fits --eval-seq-len {args.eval_seq_len}")
    client_cache: dict[int, list[Any]] = {}

    def client_data(cid: int) -> list[Any]:
        if cid not in client_cache:
            client_cache[cid] = tokenize_all(tok, [convs[i] for i in shards[cid]], args.seq_len)
        return client_cache[cid]

    initial = get_adapter(model)
    results = []
    settings: list[tuple[str, float | None, bool]] = []
    # Most informative first (no DP, then the largest epsilon), each with and without FFA-LoRA,
    # so a run cut short on a busy machine still has matched pairs.
    targets: list[float | None] = [None]
    targets += sorted((float(x) for x in args.epsilons.split(",") if x), reverse=True)
    for e in targets:
        for ffa in (False, True):
            settings.append(("no DP" if e is None else f"eps={e:g}", e, ffa))
    for label, eps, ffa in settings:
        values = run_values(args) | {
            "lora-rank": args.lora_rank,
            "lora-alpha": 2.0 * args.lora_rank,
            "ffa-lora": ffa,
        }
        if eps is not None:
            values |= {
                "dp": "client",
                "target-epsilon": eps,
                "clip-norm": args.clip_norm,
                "delta": args.delta,
            }
        cfg = RunConfig.from_mapping(values)
        adapter = dict(initial)  # every setting starts from the same LoRA initialisation
        spec = AdapterSpec.of(adapter)
        expected = trained_tensors(spec, ffa)
        keys = expected.names
        trainable_keys = instruction_keys(expected, spec.names)
        dp = ClientLevelDP(resolve_client_dp(cfg, args.clients), keys) if eps else None
        t0 = time.perf_counter()
        norms: list[float] = []
        for rnd in range(1, cfg.rounds + 1):
            nodes = list(range(args.clients))
            cohort = (
                dp.sample(nodes)
                if dp
                else sample_nodes(nodes, cfg.clients_per_round, cfg.seed, rnd)
            )
            instr = dataclasses.replace(cfg.train_instruction(rnd), trainable_keys=trainable_keys)
            updates = []
            for cid in cohort:
                up = train_round(
                    model, client_data(cid), instr, adapter, pad_id=pad, client_seed=cid
                )
                up = decode_update(encode_update(up, rnd=rnd), expected, rnd=rnd)  # the wire
                norms.append(
                    float(
                        math.sqrt(
                            sum(float(np.sum(v.astype(np.float64) ** 2)) for v in up.delta.values())
                        )
                    )
                )
                updates.append((up.delta, float(up.num_examples)))
            aggregate = dp if dp is not None else fedavg_aggregator
            if updates or dp is not None:
                adapter, _ = aggregate(adapter, updates)
            print(f"  {label:>8} ffa={ffa!s:5} round {rnd}: cohort {len(cohort)}", flush=True)
        losses = {
            c: evaluate(model, ex, batch_size=8, pad_id=pad, global_adapter=adapter).loss
            for c, ex in heldout.items()
        }
        row = {
            "setting": label,
            "ffa_lora": ffa,
            "target_epsilon": eps,
            "epsilon": dp.epsilon() if dp else None,
            "noise_multiplier": dp.settings.noise_multiplier if dp else None,
            "loss_by_category": losses,
            "loss_mean": float(np.mean(list(losses.values()))),
            "client_update_norm_median": float(np.median(norms)) if norms else None,
            "seconds": time.perf_counter() - t0,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    # The untrained base on the same held-out rows (B = 0: the adapter is the identity).
    base_losses = {
        c: evaluate(model, ex, batch_size=8, pad_id=pad, global_adapter=initial).loss
        for c, ex in heldout.items()
    }
    results.insert(
        0,
        {
            "setting": "base (no fine-tuning)",
            "ffa_lora": False,
            "target_epsilon": None,
            "epsilon": None,
            "noise_multiplier": None,
            "loss_by_category": base_losses,
            "loss_mean": float(np.mean(list(base_losses.values()))),
        },
    )
    return results


def run_cost(
    args: argparse.Namespace, base: Any, model: Any, records: list[dict[str, Any]]
) -> dict[str, float]:
    tok = base.tokenizer
    pad = int(tok.pad_token_id)
    rows = [r for r in records if r["category"] == "open_qa"][:200]
    ex = tokenize_all(tok, to_conversations(rows, args.data), args.seq_len)
    cfg = RunConfig.from_mapping(
        {"lora-rank": args.lora_rank, "batch-size": args.batch_size, "seq-len": args.seq_len}
    )
    g = get_adapter(model)
    plain = dataclasses.replace(cfg.train_instruction(1), local_steps=1)
    private = dataclasses.replace(plain, sample_dp=SampleDP(noise_multiplier=1.0, clip_norm=1.0))
    # Warm up both paths once, then interleave single steps so both see the same machine load.
    train_round(model, ex, plain, g, pad_id=pad, client_seed=0)
    dpsgd_round(model, ex, private, g, pad_id=pad, client_seed=0)
    t_plain, t_dp, n_plain, n_dp = 0.0, 0.0, 0, 0
    for i in range(args.cost_steps):
        rnd = i + 1
        up = train_round(
            model, ex, dataclasses.replace(plain, round=rnd), g, pad_id=pad, client_seed=i
        )
        t_plain += up.metrics["train-seconds"]
        n_plain += args.batch_size
        up2, _ = dpsgd_round(
            model, ex, dataclasses.replace(private, round=rnd), g, pad_id=pad, client_seed=i
        )
        t_dp += up2.metrics["train-seconds"]
        n_dp += int(up2.metrics["dp-examples"])  # Poisson batch sizes vary around batch_size
    return {
        "plain_seconds_per_step": t_plain / args.cost_steps,
        "dpsgd_seconds_per_step": t_dp / args.cost_steps,
        "plain_seconds_per_example": t_plain / n_plain,
        "dpsgd_seconds_per_example": t_dp / max(n_dp, 1),
        "ratio_per_step": t_dp / t_plain,
        "ratio_per_example": (t_dp / max(n_dp, 1)) / (t_plain / n_plain),
        "steps": args.cost_steps,
        "batch_size": args.batch_size,
        "dpsgd_examples": n_dp,
        "seq_len": args.seq_len,
    }


def print_cost(cost: dict[str, Any]) -> None:
    print(
        f"\nDP-SGD cost (batch {cost['batch_size']}, seq-len {cost['seq_len']}, "
        f"{cost['steps']} interleaved steps each): per step plain "
        f"{cost['plain_seconds_per_step']:.2f} s, DP-SGD "
        f"{cost['dpsgd_seconds_per_step']:.2f} s (x{cost['ratio_per_step']:.2f}); "
        f"per example x{cost['ratio_per_example']:.2f}\n",
        flush=True,
    )


def noise_table(args: argparse.Namespace, numel: dict[str, int]) -> list[dict[str, Any]]:
    """Accounting only: the noise multiplier each target needs, and how the noise on the mean
    update compares with the largest possible signal (norm C): z * sqrt(d) / D."""
    from privacy.accounting import AccountantKind, calibrate_noise_multiplier

    rows = []
    for population, per_round in ((8, 3), (args.clients, args.clients_per_round), (1000, 100)):
        for e in [float(x) for x in args.epsilons.split(",") if x]:
            q = per_round / population
            delta = min(args.delta, 0.1 / population)
            z = calibrate_noise_multiplier(e, delta, q, args.rounds, AccountantKind.RDP)
            rows.append(
                {
                    "population": population,
                    "per_round": per_round,
                    "rounds": args.rounds,
                    "epsilon": e,
                    "delta": delta,
                    "z": z,
                    **{
                        f"noise_to_signal_{k}": z * np.sqrt(d) / per_round for k, d in numel.items()
                    },
                }
            )
    return rows


def plot(results: list[dict], out: Path, args: argparse.Namespace) -> Path:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = sorted(results[0]["loss_by_category"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    base = results[0]["loss_mean"]
    for ffa, marker in ((False, "o"), (True, "s")):
        pts = [r for r in results[1:] if r["ffa_lora"] == ffa]
        xs = [r["target_epsilon"] if r["target_epsilon"] else 16.0 for r in pts]
        axes[0].plot(xs, [r["loss_mean"] for r in pts], marker=marker,
                     label="FFA-LoRA (B only)" if ffa else "LoRA (A and B)")  # fmt: skip
    axes[0].axhline(base, color="grey", ls="--", label="base model")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks([1, 4, 8, 16], ["1", "4", "8", "no DP"])
    axes[0].set_xlabel(f"client-level epsilon (delta = {args.delta:g})")
    axes[0].set_ylabel("held-out loss per response token (mean over categories)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    width = 0.8 / (len(results))
    for j, r in enumerate(results):
        label = r["setting"] + (" FFA" if r["ffa_lora"] else "")
        axes[1].bar(np.arange(len(cats)) + j * width, [r["loss_by_category"][c] for c in cats],
                    width, label=label)  # fmt: skip
    axes[1].set_xticks(np.arange(len(cats)) + 0.4, [c.replace("_", "\n") for c in cats], fontsize=8)
    lo = min(min(r["loss_by_category"].values()) for r in results)
    axes[1].set_ylim(lo * 0.9)
    axes[1].set_ylabel("held-out loss")
    axes[1].legend(fontsize=7, ncol=2)
    split = "one per category" if args.natural else f"Dirichlet {args.alpha} over category"
    fig.suptitle(
        f"Dolly-15k, {args.clients} clients ({split}), "
        f"{args.clients_per_round}/round, {args.rounds} rounds x {args.local_steps} steps, "
        f"clip {args.clip_norm}"
    )
    fig.tight_layout()
    path = out / "privacy_utility.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    base = load_base(
        resolve_model(args.model), Quantization(args.quantization), default_cache_dir()
    )
    records = load_records(args.data)
    report: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    lora = RunConfig.from_mapping(
        {"lora-rank": args.lora_rank, "lora-alpha": 2.0 * args.lora_rank}
    ).lora
    model = attach_lora(base.model, lora, seed=args.seed)  # one model; settings reset it
    g = get_adapter(model)
    numel = {
        "lora": sum(v.size for v in g.values()),
        "ffa": sum(v.size for k, v in g.items() if ".lora_B." in k),
    }
    table = [] if args.skip_noise_table else noise_table(args, numel)
    report["noise"] = table
    print(f"{'population':>10} {'per round':>9} {'eps':>4} {'z':>7} {'noise/signal LoRA':>18} FFA")
    for r in table:
        print(
            f"{r['population']:>10} {r['per_round']:>9} {r['epsilon']:>4g} {r['z']:7.3f} "
            f"{r['noise_to_signal_lora']:18.1f} {r['noise_to_signal_ffa']:.1f}"
        )
    if not args.skip_cost and args.cost_first:
        cost = run_cost(args, base, model, records)
        report["cost"] = cost
        print_cost(cost)
    if not args.skip_utility:
        results = run_utility(args, base, model, records)
        report["utility"] = results
        cats = sorted(results[0]["loss_by_category"])
        head = f"{'setting':>22} {'FFA':>4} {'z':>6} {'eps':>6} {'mean':>6} " + " ".join(
            f"{c[:9]:>9}" for c in cats
        )
        print(head)
        for r in results:
            z = f"{r['noise_multiplier']:.3f}" if r["noise_multiplier"] else "-"
            e = f"{r['epsilon']:.2f}" if r["epsilon"] else "-"
            print(
                f"{r['setting']:>22} {'yes' if r['ffa_lora'] else 'no':>4} {z:>6} {e:>6} "
                f"{r['loss_mean']:6.3f} "
                + " ".join(f"{r['loss_by_category'][c]:9.3f}" for c in cats)
            )
        print(f"plot: {plot(results, args.out, args)}")
        (args.out / "privacy_utility.json").write_text(json.dumps(report, indent=2))
    if not args.skip_cost and not args.cost_first:
        report["cost"] = cost = run_cost(args, base, model, records)
        print_cost(cost)
    (args.out / "privacy_utility.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
