"""The ``fedtune`` command line. Parsing only: each subcommand calls one library function.

Library code raises typed errors; this module turns them into one clear line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cli.options import add_run_options, run_overrides
from client.logs import quiet_libraries, setup_logging
from coordinator.config import RunConfig

log = logging.getLogger("fedtune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated LoRA fine-tuning of quantized language models.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show library logs and warnings"
    )
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
    sim.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    add_run_options(sim)

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

    from cli.deploy import add_deploy_commands
    from cli.tasks import add_output_flags, add_task_commands

    add_task_commands(sub)  # eval, report
    add_deploy_commands(sub)
    add_output_flags(parser)  # -q/--quiet and -v/--verbose on every subcommand too
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.runner import (
        DEFAULT_DATA,
        DEFAULT_PARTITION,
        SIMULATION_ROUND_TIMEOUT,
        SimulationConfig,
        resume_settings,
        simulate,
    )

    overrides = run_overrides(args)
    overrides.setdefault("round-timeout", SIMULATION_ROUND_TIMEOUT)
    if overrides.get("eval-task"):
        overrides["eval-task"] = str(Path(overrides["eval-task"]).expanduser().resolve())
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
    data, partition, num_clients = args.data, args.partition, args.num_clients
    if args.resume:  # the run's own data split, unless the same one is given again
        data, partition, num_clients = resume_settings(
            Path(cfg.output_dir), data, partition, num_clients
        )
    sim = SimulationConfig(
        run=cfg,
        data=data or DEFAULT_DATA,
        partition=partition or DEFAULT_PARTITION,
        num_clients=num_clients,
        resume=args.resume,
    )
    from cli.tasks import check_eval_task

    check_eval_task(cfg)
    if not args.verbose:
        # Importing Flower's simulation turns DeprecationWarnings back on ("once", ahead of our
        # filters), so torch.jit's deprecation reached users; filter again after that import.
        import flwr.simulation  # noqa: F401

        quiet_libraries()
    from coordinator.progress import Progress

    progress = Progress(cfg.rounds, quiet=args.quiet)
    run_dir = simulate(sim, progress=progress, verbose=args.verbose)
    from coordinator.rundir import summary

    s = summary(run_dir)
    print(f"run directory: {run_dir}")
    if (run_dir / "report.html").is_file():
        print(f"report: {run_dir / 'report.html'}")
    print(
        f"held-out loss (clients): round 0 {s['eval_loss_round0']:.4f} -> round {s['rounds']} "
        f"{s['eval_loss_final']:.4f}"
        if s["eval_loss_final"] is not None
        else "no held-out loss recorded"
    )
    if s.get("task_accuracy_final") is not None:
        print(
            f"task accuracy (coordinator): round 0 {s['task_accuracy_round0']:.4f} -> round "
            f"{s['rounds']} {s['task_accuracy_final']:.4f}"
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
    setup_logging(args.verbose, args.quiet)
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
