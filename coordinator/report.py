"""Run reports: PNG plots of a run directory, and one self-contained HTML file (plots embedded as
base64 PNG, no scripts, nothing fetched) for one run or several side by side.

What it shows, from ``metrics.jsonl``, ``config.json`` and ``state.json``:

    loss         train / held-out losses per round
    task         task_* metrics per round (--eval-task), with the task's baselines, and the
                 clients' pooled client_task_* (--eval-task-clients) with a per-client table
    privacy      epsilon per round where DP ran
    bytes        bytes down / up per round and cumulative
    time         each round's wall time split into train, evaluate, transport and coordinator
    participation, failures (with reasons), the resolved configuration

``fedtune report RUN [RUN ...]`` writes the HTML; every run writes its PNGs and ``report.html``
when it ends (``write_run_report``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("fedtune")

REPORT = "report.html"
PLOT_FILES = {
    "loss": "loss.png",
    "task": "task.png",
    "privacy": "privacy.png",
    "bytes": "bytes.png",
    "time": "time.png",
}
# task_* keys plotted (others, e.g. task_rows_scored, are shown only in the table).
TASK_METRICS = ("accuracy", "macro_f1", "exact_match", "token_f1")
TASK_BASELINES = ("majority_baseline", "chance_baseline")
# Where task metrics come from: the coordinator's --eval-task file (task_*), and the clients'
# held-out rows pooled (client_task_*, --eval-task-clients).
TASK_SOURCES = (("task_", "coordinator task"), ("client_task_", "clients' held-out"))
LOSSES = (
    ("train_loss", "train (clients, during local steps)"),
    ("eval_loss", "held-out (clients' local splits)"),
    ("central_eval_loss", "held-out (coordinator set)"),
)


class ReportError(RuntimeError):
    pass


@dataclass
class RunData:
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def node_names(self) -> dict[int, str]:
        """Display names of client nodes where the run recorded them (``node_names`` in
        config.json: node id -> name); ids otherwise."""
        raw = self.config.get("node_names") or {}
        return {int(k): str(v) for k, v in raw.items()}

    def client_label(self, client: int | str) -> str:
        """A client's display name: rows name clients by their stable name (``client``);
        older runs by node id, shown by ``node_names`` where config.json has them."""
        text = str(client)
        return self.node_names.get(int(text), text) if text.isdigit() else text

    @property
    def sequential(self) -> bool:
        """Did a phase's clients run one after another (the default simulation) rather than in
        parallel (deployments)?"""
        sim = self.config.get("simulation")
        if not isinstance(sim, dict):
            return False
        return int(sim.get("workers", 2 if sim.get("cpus_per_client") else 1)) == 1


def load_run(path: Path) -> RunData:
    path = Path(path).expanduser()
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{path} is not a run directory (no metrics.jsonl)")
    rows = []
    for lineno, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ReportError(f"{metrics}:{lineno}: not valid JSON ({exc.msg})") from None
    config = (
        json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    )
    state = json.loads((path / "state.json").read_text()) if (path / "state.json").is_file() else {}
    return RunData(path, config, rows, state)


# ------------------------------------------------------------------------------ pure helpers


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows where ``key`` holds a number."""
    pts = [
        (int(r["round"]), float(r[key]))
        for r in rows
        if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def cumulative(values: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def _num(row: dict[str, Any], key: str) -> float:
    v = row.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


def time_split(row: dict[str, Any], *, sequential: bool) -> dict[str, float]:
    """A round's wall time (``seconds``) in four parts that add up to it:

    train      clients' compute in the train phase (their summed time when clients run one
               after another, the slowest client's when they run in parallel)
    evaluate   clients' compute in the evaluate phase (summed, or the mean client's in parallel),
               plus the coordinator's task evaluation
    transport  the rest of both phases: sending, waiting for and receiving messages
    coordinator  everything else: aggregation, coordinator-side loss, saving the round
    """
    train_phase, eval_phase = _num(row, "train_phase_seconds"), _num(row, "eval_phase_seconds")
    train_cpu = _num(row, "client_seconds") if sequential else _num(row, "client_seconds_max")
    eval_cpu = _num(row, "client_eval_seconds")
    if not sequential:
        eval_cpu /= max(1.0, _num(row, "eval_clients_ok"))
    train = min(train_cpu, train_phase)
    evaluate = min(eval_cpu, eval_phase)
    task = _num(row, "task_eval_seconds")
    total = max(_num(row, "seconds"), train_phase + eval_phase + task)
    return {
        "train": train,
        "evaluate": evaluate + task,
        "transport": (train_phase - train) + (eval_phase - evaluate),
        "coordinator": total - train_phase - eval_phase - task,
    }


def _who(entry: Mapping[str, Any]) -> str:
    """The client of a failure entry: its name (``client``), or an older run's node id."""
    return str(entry.get("client", entry.get("node")))


def participation(
    rows: Sequence[dict[str, Any]],
) -> tuple[list[str], list[int], dict[tuple[str, int], str]]:
    """(clients, training rounds, cell) where cell[(client, round)] is "ok" (trained and its
    update was used), or the reason it failed; absent = not asked to train that round.

    Clients come from each row's ``clients`` (the sampled nodes) and ``failures``; a round
    without ``clients`` (secure aggregation, older runs) is left out."""
    cells: dict[tuple[str, int], str] = {}
    rounds = []
    for r in rows:
        rnd = int(r["round"])
        if rnd == 0 or "clients" not in r:
            continue
        rounds.append(rnd)
        failed = {_who(f): str(f.get("reason", "")) for f in r.get("failures") or []}
        for client in r.get("clients") or []:
            cells[(str(client), rnd)] = failed.get(str(client), "ok")
        for node, reason in failed.items():
            cells[(node, rnd)] = reason or "failed"
    clients = sorted({c for c, _ in cells})
    return clients, rounds, cells


def failures(rows: Sequence[dict[str, Any]]) -> list[tuple[int, str, str, str]]:
    """(round, phase, client, reason) of every failure a run recorded, rounds that failed
    as a whole included (client "-")."""
    out: list[tuple[int, str, str, str]] = []
    for r in rows:
        rnd = int(r["round"])
        for f in r.get("failures") or []:
            out.append((rnd, "train", _who(f), str(f.get("reason"))))
        for f in r.get("eval_failures") or []:
            out.append((rnd, "evaluate", _who(f), str(f.get("reason"))))
        if r.get("status") == "failed":
            out.append((rnd, "round", "-", str(r.get("reason"))))
    return out


# ------------------------------------------------------------------------------ plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def _color(i: int) -> str:
    return f"C{i % 10}"


def plot_loss(runs: Sequence[RunData]) -> Any | None:
    if not any(series(run.rows, k)[0] for run in runs for k, _ in LOSSES):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ("-", "--", ":")
    for i, run in enumerate(runs):
        for (key, label), style in zip(LOSSES, styles, strict=True):
            xs, ys = series(run.rows, key)
            if xs:
                name = f"{run.name}: {label}" if len(runs) > 1 else label
                ax.plot(
                    xs,
                    ys,
                    style,
                    marker="o",
                    color=_color(i if len(runs) > 1 else LOSSES.index((key, label))),
                    label=name,
                )
    _integer_rounds(ax)
    ax.set_ylabel("loss per response token")
    ax.set_title("Loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_task(runs: Sequence[RunData]) -> Any | None:
    keys = [
        (prefix, source, k)
        for prefix, source in TASK_SOURCES
        for k in TASK_METRICS
        if any(series(run.rows, f"{prefix}{k}")[0] for run in runs)
    ]
    if not keys:
        return None
    both = len({prefix for prefix, _, _ in keys}) > 1
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ("-", "--", "-.", ":")
    for i, run in enumerate(runs):
        for j, (prefix, source, key) in enumerate(keys):
            xs, ys = series(run.rows, f"{prefix}{key}")
            if xs:
                label = f"{source}: {key}" if both else key
                label = f"{run.name}: {label}" if len(runs) > 1 else label
                color = _color(i) if len(runs) > 1 else _color(j)
                marker = "o" if prefix == "task_" else "s"
                ax.plot(xs, ys, styles[j % 4], marker=marker, color=color, label=label)
        for b, key in enumerate(TASK_BASELINES):
            _, ys = series(run.rows, f"task_{key}")
            if ys:
                label = key.replace("_", " ") + (f" ({run.name})" if len(runs) > 1 else "")
                ax.axhline(ys[-1], color="grey", linestyle=(":", "--")[b], linewidth=1, label=label)
    _integer_rounds(ax)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("score on the task")
    sources = [s for p, s in TASK_SOURCES if any(k[0] == p for k in keys)]
    ax.set_title(f"Task metrics ({' and '.join(sources)})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_privacy(runs: Sequence[RunData]) -> Any | None:
    keys = (
        ("epsilon", "epsilon (client level)"),
        ("client_epsilon_max", "largest client epsilon (sample level)"),
    )
    if not any(series(run.rows, k)[0] for run in runs for k, _ in keys):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(runs):
        for j, (key, label) in enumerate(keys):
            xs, ys = series(run.rows, key)
            if xs:
                name = f"{run.name}: {label}" if len(runs) > 1 else label
                ax.plot(
                    xs,
                    ys,
                    ("-", "--")[j],
                    marker="o",
                    color=_color(i if len(runs) > 1 else j),
                    label=name,
                )
    _integer_rounds(ax)
    ax.set_ylabel("epsilon spent so far")
    ax.set_title("Privacy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_bytes(runs: Sequence[RunData]) -> Any | None:
    if not any(series(run.rows, "bytes_down")[0] for run in runs):
        return None
    plt = _pyplot()
    fig, (per, cum) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / (2 * len(runs))
    for i, run in enumerate(runs):
        for j, key in enumerate(("bytes_down", "bytes_up")):
            xs, ys = series(run.rows, key)
            mb = [y / 1e6 for y in ys]
            label = ("down (to clients)", "up (from clients)")[j]
            label = f"{run.name}: {label}" if len(runs) > 1 else label
            offset = (2 * i + j - len(runs) + 0.5) * width
            color = _color(2 * i + j)
            per.bar([x + offset for x in xs], mb, width=width, color=color, label=label)
            cum.plot(xs, cumulative(mb), ("-", "--")[j], marker="o", color=color, label=label)
    per.set_ylim(0, per.get_ylim()[1] * 1.35)  # room for the legend above the bars
    for ax, title in ((per, "per round"), (cum, "cumulative")):
        _integer_rounds(ax)
        ax.set_ylabel("MB")
        ax.set_title(f"Bytes on the wire, {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


TIME_PARTS = ("train", "evaluate", "transport", "coordinator")
TIME_LABELS = {
    "train": "train (client compute)",
    "evaluate": "evaluate (client compute + task eval)",
    "transport": "transport + waiting",
    "coordinator": "coordinator (aggregate, save, ...)",
}


def plot_time(runs: Sequence[RunData]) -> Any | None:
    if not any(series(run.rows, "seconds")[0] for run in runs):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(min(7 * len(runs), 14), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        rounds = [int(r["round"]) for r in run.rows]
        splits = [time_split(r, sequential=run.sequential) for r in run.rows]
        bottom = [0.0] * len(rounds)
        for j, part in enumerate(TIME_PARTS):
            values = [s[part] for s in splits]
            ax.bar(rounds, values, bottom=bottom, color=_color(j), label=TIME_LABELS[part])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        _integer_rounds(ax)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.45)  # room for the legend above the bars
        ax.set_ylabel("seconds")
        ax.set_title(f"Round time{': ' + run.name if len(runs) > 1 else ''}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


PLOTTERS: dict[str, Callable[[Sequence[RunData]], Any]] = {
    "loss": plot_loss,
    "task": plot_task,
    "privacy": plot_privacy,
    "bytes": plot_bytes,
    "time": plot_time,
}


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def render_plots(runs: Sequence[RunData]) -> dict[str, bytes]:
    """PNG bytes of every plot that has data, by name (see PLOT_FILES)."""
    out = {}
    for name, plot in PLOTTERS.items():
        fig = plot(runs)
        if fig is not None:
            out[name] = _png(fig)
    return out


def save_plots(run_dir: Path) -> list[Path]:
    """Write the run's PNG plots (loss.png, task.png, ...) into its directory."""
    written = []
    for name, png in render_plots([load_run(run_dir)]).items():
        path = Path(run_dir) / PLOT_FILES[name]
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------ HTML

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.ok { background: #d9f2d9; text-align: center; }
td.fail { background: #f8d0d0; text-align: center; }
td.idle { color: #bbb; text-align: center; }
figure { margin: 1em 0; } img.plot { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 12px; }
.muted { color: #777; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return (
            f"{value:.{digits}g}"
            if abs(value) >= 1e4 or (0 < abs(value) < 1e-3)
            else f"{value:.{digits}f}"
        )
    return str(value)


def _first_last(rows: Sequence[dict[str, Any]], key: str) -> str:
    xs, ys = series(rows, key)
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{_fmt(ys[0])} (round {xs[0]})"
    return f"{_fmt(ys[0])} (round {xs[0]}) &rarr; {_fmt(ys[-1])} (round {xs[-1]})"


def _summary(runs: Sequence[RunData]) -> str:
    head = ["run", "rounds", "train loss", "held-out loss (clients)", "held-out loss (coordinator)",
            "task accuracy", "task macro-F1", "clients' task accuracy", "clients' task macro-F1",
            "epsilon", "MB down / up", "status"]  # fmt: skip
    lines = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for run in runs:
        last = run.rows[-1] if run.rows else {}
        down = sum(_num(r, "bytes_down") for r in run.rows) / 1e6
        up = sum(_num(r, "bytes_up") for r in run.rows) / 1e6
        failed = sum(1 for r in run.rows if r.get("status") == "failed")
        status = f"stopped: {run.state['stopped']}" if run.state.get("stopped") else "completed"
        if failed:
            status += f"; {failed} failed round(s)"
        cells = [
            html.escape(run.name),
            str(last.get("round", "-")),
            _first_last(run.rows, "train_loss"),
            _first_last(run.rows, "eval_loss"),
            _first_last(run.rows, "central_eval_loss"),
            _first_last(run.rows, "task_accuracy"),
            _first_last(run.rows, "task_macro_f1"),
            _first_last(run.rows, "client_task_accuracy"),
            _first_last(run.rows, "client_task_macro_f1"),
            _fmt(last.get("epsilon")),
            f"{down:.2f} / {up:.2f}",
            html.escape(status),
        ]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(lines) + "</table>"


def _participation(run: RunData) -> str:
    clients, rounds, cells = participation(run.rows)
    if not clients:
        counts = ", ".join(
            f"round {r['round']}: {r.get('clients_ok', 0)}/{r.get('clients_sampled', 0)}"
            for r in run.rows
            if int(r["round"]) > 0
        )
        return (
            '<p class="muted">This run did not record which clients trained (secure aggregation '
            "rounds and older runs record counts only). Updates used / clients asked: "
            f"{counts or '-'}.</p>"
        )
    head = "".join(f"<th>{r}</th>" for r in rounds)
    lines = [f"<table><tr><th>client \\ round</th>{head}<th>trained</th></tr>"]
    for c in sorted(clients, key=lambda n: (run.client_label(n), n)):
        tds, trained = [], 0
        for rnd in rounds:
            cell = cells.get((c, rnd))
            if cell is None:
                tds.append('<td class="idle">&middot;</td>')
            elif cell == "ok":
                trained += 1
                tds.append('<td class="ok" title="update used">&#10003;</td>')
            else:
                tds.append(f'<td class="fail" title="{html.escape(cell)}">&#10007;</td>')
        label = html.escape(run.client_label(c))
        lines.append(f"<tr><td>{label}</td>{''.join(tds)}<td class='num'>{trained}</td></tr>")
    legend = (
        '<p class="muted">&#10003; trained, update used; &#10007; asked but failed (hover for the '
        "reason, listed under Failures); &middot; not sampled.</p>"
    )
    return "\n".join(lines) + "</table>" + legend


def _failures(run: RunData) -> str:
    rows = failures(run.rows)
    if not rows:
        return "<p>No failures.</p>"
    lines = ["<table><tr><th>round</th><th>phase</th><th>client</th><th>reason</th></tr>"]
    for rnd, phase, node, reason in rows:
        label = run.client_label(node)
        lines.append(
            f"<tr><td class='num'>{rnd}</td><td>{phase}</td><td>{html.escape(label)}</td>"
            f"<td>{html.escape(reason)}</td></tr>"
        )
    return "\n".join(lines) + "</table>"


def _task_detail(run: RunData) -> str:
    """Last round's per-class recall of a label task, if the run scored one."""
    last = next((r for r in reversed(run.rows) if r.get("task_per_class_recall")), None)
    if last is None:
        return ""
    recall = last["task_per_class_recall"]
    cells = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td class='num'>{_fmt(v)}</td></tr>"
        for k, v in recall.items()
    )
    return (
        f"<p>Per-class recall after round {last['round']} ({html.escape(run.name)}):</p>"
        f"<table><tr><th>class</th><th>recall</th></tr>{cells}</table>"
    )


def _client_task_detail(run: RunData) -> str:
    """The last evaluated round's per-client task scores (--eval-task-clients), if any."""
    last = next((r for r in reversed(run.rows) if r.get("client_task_per_client")), None)
    if last is None:
        return ""
    generate = any("token_f1" in c for c in last["client_task_per_client"])
    second = "token F1" if generate else "macro-F1"
    head = f"<tr><th>client</th><th>rows scored</th><th>accuracy</th><th>{second}</th>"
    head += "<th>rows without a label (skipped)</th><th>unreadable rows (skipped)</th></tr>"
    lines = [head]
    for c in sorted(last["client_task_per_client"], key=lambda c: run.client_label(_who(c))):
        cells = [
            html.escape(run.client_label(_who(c))),
            _fmt(c.get("rows")),
            _fmt(c.get("accuracy")),
            _fmt(c.get("token_f1" if generate else "macro_f1")),
            _fmt(c.get("unlabelled")),
            _fmt(c.get("invalid")),
        ]
        lines.append("<tr>" + "".join(f"<td class='num'>{v}</td>" for v in cells) + "</tr>")
    pooled = (
        f"pooled: accuracy {_fmt(last.get('client_task_accuracy'))}, "
        f"{second} {_fmt(last.get('client_task_token_f1' if generate else 'client_task_macro_f1'))}"
        f" over {_fmt(last.get('client_task_rows_scored'))} rows of "
        f"{_fmt(last.get('client_task_clients'))} client(s)"
    )
    return (
        f"<p>Clients' held-out rows scored as the task after round {last['round']} "
        f"({html.escape(run.name)}; {pooled}):</p>"
        f'<table id="client-task">{"".join(lines)}</table>'
    )


_CAPTIONS = {
    "loss": "Loss per response token, per round (round 0: the untrained adapter).",
    "task": "Task metrics of the global adapter per round: on the coordinator's --eval-task "
    "(circles) and on the clients' own held-out rows, pooled (squares, --eval-task-clients); grey "
    "lines: the majority-class and chance baselines of the coordinator's task.",
    "privacy": "Epsilon spent after each round (at the run's delta).",
    "bytes": "Payload bytes sent to and received from clients, per round and summed.",
    "time": "Each round's wall time: clients' train and evaluate compute (plus the coordinator's "
    "task evaluation), transport and waiting in those phases, and the coordinator's own work.",
}
_TITLES = {
    "loss": "Loss",
    "task": "Task metrics",
    "privacy": "Privacy",
    "bytes": "Bytes on the wire",
    "time": "Round time",
}


def render_html(runs: Sequence[RunData]) -> str:
    """The report as one HTML document: plots as data: URIs, no scripts, no external links."""
    plots = render_plots(runs)
    names = ", ".join(html.escape(r.name) for r in runs)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fedtune report: {names}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>fedtune report</h1>",
        f"<p class='muted'>{len(runs)} run(s): "
        + ", ".join(html.escape(str(r.path)) for r in runs)
        + f". Written {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>",
        "<h2>Summary</h2>",
        _summary(runs),
    ]
    for name in PLOT_FILES:
        if name not in plots:
            continue
        data = base64.b64encode(plots[name]).decode("ascii")
        parts += [
            f'<h2 id="{name}">{_TITLES[name]}</h2>',
            f'<figure><img class="plot" id="plot-{name}" data-plot="{name}" '
            f'alt="{_TITLES[name]} per round" src="data:image/png;base64,{data}">',
            f"<figcaption class='muted'>{_CAPTIONS[name]}</figcaption></figure>",
        ]
        if name == "task":
            parts += [_task_detail(run) for run in runs]
            parts += [_client_task_detail(run) for run in runs]
    parts.append("<h2>Participation</h2>")
    for run in runs:
        parts += [f"<h3>{html.escape(run.name)}</h3>", _participation(run)]
    parts.append("<h2>Failures</h2>")
    for run in runs:
        parts += [f"<h3>{html.escape(run.name)}</h3>", _failures(run)]
    parts.append("<h2>Configuration</h2>")
    for run in runs:
        cfg = json.dumps(run.config, indent=2, sort_keys=False)
        parts += [
            f"<details open><summary>{html.escape(run.name)}: config.json</summary>",
            f"<pre>{html.escape(cfg)}</pre></details>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write the HTML report of ``run_dirs`` to ``out``."""
    runs = [load_run(Path(p)) for p in run_dirs]
    text = render_html(runs)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def write_run_report(run_dir: Path) -> None:
    """At the end of a run: its PNG plots and report.html. A run that trained is not failed by
    its report: a problem here is logged."""
    try:
        save_plots(run_dir)
        path = write_report([run_dir], Path(run_dir) / REPORT)
        log.info("report: %s", path)
    except Exception as exc:  # plotting must not turn a finished run into a failed one
        log.warning("could not write the run report in %s: %s", run_dir, exc)
