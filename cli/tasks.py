"""The task-evaluation and report subcommands of ``fedtune``: ``eval`` and ``report``, the
``-q/--quiet`` and ``-v/--verbose`` flags on every subcommand, and the check of ``--eval-task``
before a fleet starts. Parsing only; each command calls one library function
(``client.tasks``, ``coordinator.report``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from coordinator.config import RunConfig

log = logging.getLogger("fedtune")


def add_task_commands(sub: Any) -> None:
    _add_eval(sub)
    _add_report(sub)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """-q/--quiet and -v/--verbose, accepted before or after the subcommand (a value given
    after it wins; SUPPRESS keeps a subcommand from resetting one given before it)."""
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only results and errors (no progress)"
    )
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            _add_leaf_output_flags(child)
            nested = [a for a in child._actions if isinstance(a, argparse._SubParsersAction)]
            for inner in nested:
                for grandchild in dict.fromkeys(inner.choices.values()):
                    _add_leaf_output_flags(grandchild)


def _add_leaf_output_flags(p: argparse.ArgumentParser) -> None:
    for flags, help_text in (
        (("-v", "--verbose"), "show library logs and warnings"),
        (("-q", "--quiet"), "only results and errors (no progress)"),
    ):
        p.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=help_text)


def _add_eval(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="score a base model, a run or an exported adapter on a task file",
        description="Accuracy on a held-out task file (JSONL/JSON/CSV/Parquet) of three kinds: "
        "choice (question, choices, answer as index, letter or text), label (text, label) and "
        "generate (instruction, response). Prints a table and writes a JSON result.",
    )
    ev.add_argument(
        "source",
        nargs="?",
        type=Path,
        default=None,
        help="run directory or PEFT adapter directory (default: the base model alone)",
    )
    ev.add_argument("--model", default=None, help="base model (default: the run's, else 'smollm2')")
    ev.add_argument("--task", required=True, help="task file (JSONL, JSON, CSV or Parquet)")
    ev.add_argument("--kind", required=True, help="choice | label | generate")
    ev.add_argument(
        "--labels",
        default="",
        help="label kind: the label set, comma-separated (default: the labels in the file)",
    )
    ev.add_argument(
        "--columns",
        default="",
        help="ROLE=COLUMN,... to rename columns; roles (defaults): question, choices (A|B|C|D: "
        "one column per choice), answer, text, label, instruction, context, response",
    )
    ev.add_argument(
        "--template",
        default="",
        help="user prompt as a Python format string over the row's columns and roles, plus "
        "{options} (choices as 'A. ...' lines) and {labels}; @FILE reads it from FILE",
    )
    ev.add_argument("--limit", type=int, default=0, help="score a seeded subset of N rows")
    ev.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    ev.add_argument(
        "--max-new-tokens", type=int, default=64, help="generate kind: reply length limit"
    )
    ev.add_argument("--quantization", default="none", help="nf4 | int8 | none (default none)")
    ev.add_argument("--cache-dir", type=Path, default=None)
    ev.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        help="result JSON (default: eval-<task file name>.json in the current directory)",
    )
    ev.set_defaults(func=cmd_eval, label="eval")


def _add_report(sub: Any) -> None:
    rep = sub.add_parser(
        "report",
        help="write one self-contained HTML report for one or several runs",
        description="Plots (loss, task metrics, epsilon, bytes, round time), participation, "
        "failures and configuration of each run, in one HTML file that needs no network.",
    )
    rep.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    rep.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        help="HTML file (default: RUN/report.html for one run, fedtune-report.html for several)",
    )
    rep.set_defaults(func=cmd_report, label="report")


def cmd_eval(args: argparse.Namespace) -> int:
    from client.tasks import TaskSpec, evaluate_task, load_eval_model, load_task, result_table
    from coordinator.export import find_adapter
    from coordinator.rundir import write_json_atomic

    template = args.template
    if template.startswith("@"):
        template = Path(template[1:]).expanduser().read_text(encoding="utf-8")
    spec = TaskSpec(
        kind=args.kind,
        columns=args.columns,
        labels=args.labels,
        template=template,
        limit=args.limit,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )
    task = load_task(args.task, spec)  # every row checked before the model loads
    adapter_dir, run_model = find_adapter(args.source) if args.source else (None, None)
    model_spec = args.model or run_model or "smollm2"
    model, tokenizer = load_eval_model(
        model_spec, adapter_dir, quantization=args.quantization, cache_dir=args.cache_dir
    )
    log.info(
        "scoring %d of %d rows of %s (%s)",
        len(task.items),
        task.total_rows,
        args.task,
        spec.kind.value,
    )
    with _row_progress(len(task.items), quiet=args.quiet) as on_row:
        result = evaluate_task(model, tokenizer, task, on_row=on_row)
    header = {
        "task": str(args.task),
        "model": model_spec,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "quantization": args.quantization,
        "rows_in_file": task.total_rows,
        "limit": args.limit,
        "seed": args.seed,
        "template": template or None,
        "columns": args.columns or None,
    }
    out = args.output or Path(f"eval-{Path(args.task).stem}.json")
    write_json_atomic(out, result.to_json(**header))
    title = (
        f"{args.task} ({spec.kind.value}, {len(task.items)} of {task.total_rows} rows): "
        f"{model_spec}{' + ' + str(adapter_dir) if adapter_dir else ''}"
    )
    print(result_table(result, title=title))
    print(f"result: {out}")
    return 0


OnRow = Callable[[int, int], None]


@contextlib.contextmanager
def _row_progress(total: int, *, quiet: bool) -> Iterator[OnRow | None]:
    """on_row(done, total) for evaluate_task: a transient rich bar on a terminal, a log line
    every tenth of the rows elsewhere, nothing with --quiet."""
    if quiet:
        yield None
        return
    if not sys.stderr.isatty():
        step = max(1, total // 10)

        def line(done: int, n: int) -> None:
            if done % step == 0:
                log.info("scored %d/%d rows", done, n)

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "scoring", BarColumn(), MofNCompleteColumn(), "rows", TimeRemainingColumn(), transient=True
    ) as bar:
        task = bar.add_task("rows", total=total)

        def advance(done: int, _total: int) -> None:
            bar.update(task, completed=done)

        yield advance


def cmd_report(args: argparse.Namespace) -> int:
    from coordinator.report import write_report

    out = args.output or (
        args.runs[0] / "report.html" if len(args.runs) == 1 else Path("fedtune-report.html")
    )
    path = write_report(args.runs, out)
    print(f"report written to {path}")
    return 0


def check_eval_task(cfg: RunConfig) -> None:
    """Read and check every row of ``--eval-task`` before a fleet starts (one clear line on a
    bad row, instead of an error from inside the coordinator later)."""
    if cfg.eval_task:
        from client.tasks import load_task

        task = load_task(cfg.eval_task, cfg.task_spec())
        log.info(
            "task evaluation: %d of %d rows of %s (%s) scored at round 0 and after every round",
            len(task.items),
            task.total_rows,
            cfg.eval_task,
            cfg.eval_task_kind,
        )
    if cfg.eval_task_clients:
        log.info(
            "task evaluation on the clients: each evaluating client scores its held-out rows that "
            "carry an answer as a %s task at round 0 and after every round",
            cfg.eval_task_kind,
        )
