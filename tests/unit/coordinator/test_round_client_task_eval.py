"""``--eval-task-clients`` through the round loop: FakeGrid nodes running the real ClientApp on
their own shards (the tiny model), on virtual time. Each round's ``client_task_*`` values must
equal scoring the union of the clients' labelled held-out rows as one task file with the same
adapter, which is what pooling counts (not averaging client rates) guarantees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from client import app as client_app
from client.data import heldout_split, load_records, records_seed
from client.model import Quantization, attach_lora, load_base, resolve_model, set_adapter
from client.tasks import TaskKind, TaskSpec, evaluate_task, load_task
from coordinator.config import ConfigError, RunConfig
from coordinator.progress import Progress
from coordinator.report import load_run, plot_task, render_html
from tests.fakegrid import FakeGrid, run_virtual

NODES = [101, 202]
COLUMNS = "text=instruction,label=category"


def shard(path: Path, offset: int) -> Path:
    rows = []
    for i in range(offset, offset + 24):
        row = {"instruction": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}
        if i % 3 == 0:
            row = {"instruction": f"Say hello to user {i}.", "response": f"Hello {i}!"}
        if i % 4 != 1:  # every fourth row carries no label
            row["category"] = "greeting" if i % 3 == 0 else "math"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_heldout(path: Path, fraction: float) -> tuple[list[dict[str, str]], int]:
    """The shard's held-out rows with a label, and the number without (as the client splits)."""
    records = load_records(path)
    _, held = heldout_split(len(records), fraction, records_seed(records))
    rows = [records[int(i)] for i in held]
    return [r for r in rows if "category" in r], sum("category" not in r for r in rows)


def test_client_task_rows_in_metrics_and_report(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    shards = [shard(tmp_path / f"shard{i}.jsonl", 24 * i) for i in range(len(NODES))]
    run = tmp_path / "run"
    cfg = RunConfig.from_mapping(
        {
            "model": str(tiny_model_dir),
            "quantization": "none",
            "cache-dir": str(model_cache),
            "output-dir": str(run),
            "rounds": 2,
            "clients-per-round": 2,
            "min-clients": 2,
            "eval-clients": 0,
            "round-timeout": 5.0,
            "node-wait-timeout": 1.0,
            "lora-rank": 2,
            "local-steps": 2,
            "batch-size": 2,
            "seq-len": 48,
            "learning-rate": 0.05,
            "heldout-fraction": 0.4,
            "eval-task-kind": "label",
            "eval-task-columns": COLUMNS,
            "eval-task-labels": "greeting,math",
            "eval-task-clients": True,
        }
    )
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    client_app.load_resident.cache_clear()
    app = client_app.make_client_app()

    def node(n: int, data: Path):  # type: ignore[no-untyped-def]
        context = Context(run_id=1, node_id=n, node_config={"data-path": str(data)},
                          state=RecordDict(), run_config=cfg.to_mapping())  # fmt: skip
        return lambda msg: app(msg, context)

    grid = FakeGrid({n: node(n, s) for n, s in zip(NODES, shards, strict=True)})
    rows = run_virtual(grid, cfg, run, progress=Progress(2, live=False))
    assert [r["round"] for r in rows] == [0, 1, 2]

    held = [labelled_heldout(s, 0.4) for s in shards]
    labelled = [r for rows_, _ in held for r in rows_]
    unlabelled = sum(u for _, u in held)
    assert len(labelled) > 0 and unlabelled > 0
    for r in rows:
        assert r["client_task_clients"] == 2
        assert r["client_task_rows_scored"] == len(labelled)
        assert r["client_task_rows_unlabelled"] == unlabelled
        assert r["client_task_rows_invalid"] == 0
        per = r["client_task_per_client"]
        assert [c["client"] for c in per] == [str(n) for n in NODES]  # unnamed: by node id
        assert [c["rows"] for c in per] == [len(h[0]) for h in held]
        assert set(r["client_task_per_class_recall"]) == {"greeting", "math"}
        assert r["client_task_eval_seconds"] > 0
        assert "task_accuracy" not in r  # no coordinator-side --eval-task file in this run

    # Pooled = the union of the labelled held-out rows scored as one file with the same adapter.
    union = tmp_path / "union.jsonl"
    union.write_text("".join(json.dumps(r) + "\n" for r in labelled))
    task = load_task(union, TaskSpec(TaskKind.LABEL, COLUMNS, "greeting,math"))
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, cfg.lora, seed=cfg.seed)
    fresh0 = evaluate_task(model, base.tokenizer, task)  # the initial adapter
    set_adapter(model, dict(load_file(str(run / "adapter" / "adapter_model.safetensors"))))
    fresh = evaluate_task(model, base.tokenizer, task)
    for row, result in ((rows[0], fresh0), (rows[2], fresh)):
        assert row["client_task_confusion"] == result.confusion
        assert row["client_task_accuracy"] == pytest.approx(result.metrics["accuracy"])
        assert row["client_task_macro_f1"] == pytest.approx(result.metrics["macro_f1"])
    assert fresh0.rows[0]["scores_summed"] != fresh.rows[0]["scores_summed"]  # training moved it

    # The report plots it in task.png and lists the clients' scores.
    assert (run / "task.png").is_file()
    page = render_html([load_run(run)])
    assert 'id="plot-task"' in page and 'id="client-task"' in page
    assert "held-out rows scored as the task after round 2" in page
    fig = plot_task([load_run(run)])
    assert fig is not None
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["accuracy", "macro_f1"]  # the clients' pooled series, one source only
    xs, ys = fig.axes[0].get_lines()[0].get_data()
    assert list(xs) == [0, 1, 2]
    assert list(ys) == pytest.approx([r["client_task_accuracy"] for r in rows])
    assert f"<td class='num'>{rows[2]['client_task_per_client'][0]['rows']}</td>" in page


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"eval-task-clients": True}, "eval-task-kind: --eval-task-clients needs a kind"),
        ({"eval-task-clients": True, "eval-task-kind": "label"},
         "eval-task-labels: --eval-task-clients with kind label needs the label set"),
        ({"eval-task-clients": True, "eval-task-kind": "label", "eval-task-labels": "a"},
         "eval-task-labels: need at least two labels"),
        ({"eval-task-clients": True, "eval-task-kind": "choice", "secagg": True},
         "eval-task-clients: reports each client's confusion counts in the clear"),
        ({"eval-task-clients": True, "eval-task-kind": "choice", "dp": "client",
          "noise-multiplier": 1.0},
         "eval-task-clients: reports each client's confusion counts in the clear"),
    ],
)  # fmt: skip
def test_client_task_config_errors_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert message in str(err.value)
    RunConfig.from_mapping({"eval-task-clients": True, "eval-task-kind": "choice"})  # enough
