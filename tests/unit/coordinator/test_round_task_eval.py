"""``--eval-task``: the coordinator scores the global adapter on a task at round 0 and after every
round, and the metrics rows carry ``task_*`` values equal to scoring the saved adapter afresh.
The round loop runs on FakeGrid with synthetic clients (as in test_rounds.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType
from safetensors.numpy import load_file

from client.model import Quantization, attach_lora, load_base, resolve_model, set_adapter
from client.tasks import evaluate_task, load_task
from coordinator.config import ConfigError, RunConfig
from coordinator.progress import Progress
from protocol.messages import (
    ClientUpdate,
    EvalResult,
    decode_eval_instruction,
    decode_train_instruction,
    encode_eval_result,
    encode_update,
)
from tests.fakegrid import FakeGrid, run_virtual

NODES = [11, 22, 33]
TASK = [
    {"text": "Why did the chicken cross the road?", "label": "joke"},
    {"text": "What is machine learning?", "label": "question"},
    {"text": "Red, green and blue.", "label": "colors"},
    {"text": "How do I reset my password?", "label": "question"},
]


def client(index: int):  # type: ignore[no-untyped-def]
    """Delta 0.05 * (index + 1) on every adapter value; fixed evaluation replies."""

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            ei, _ = decode_eval_instruction(msg.content)
            res = EvalResult(loss=2.0, num_tokens=10, num_examples=2)
            return Message(encode_eval_result(res, rnd=ei.round), reply_to=msg)
        instr, adapter = decode_train_instruction(msg.content)
        delta = {k: np.full_like(v, 0.05 * (index + 1)) for k, v in adapter.items()}
        up = ClientUpdate(delta=delta, num_examples=10, metrics={"train-loss": 2.0})
        return Message(encode_update(up, rnd=instr.round), reply_to=msg)

    return handle


def config(tiny_model_dir: Path, cache: Path, out: Path, task: Path) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "model": str(tiny_model_dir),
            "quantization": "none",
            "cache-dir": str(cache),
            "output-dir": str(out),
            "rounds": 2,
            "clients-per-round": 2,
            "min-clients": 2,
            "round-timeout": 5.0,
            "node-wait-timeout": 1.0,
            "lora-rank": 2,
            "max-update-norm": 1e6,  # synthetic deltas of 0.05 per value, above the automatic bound
            "eval-task": str(task),
            "eval-task-kind": "label",
            "eval-task-limit": 3,
        }
    )


def test_eval_task_rows_in_metrics(tiny_model_dir: Path, model_cache: Path, tmp_path: Path) -> None:
    task_path = tmp_path / "task.jsonl"
    task_path.write_text("".join(json.dumps(r) + "\n" for r in TASK))
    run = tmp_path / "run"
    cfg = config(tiny_model_dir, model_cache, run, task_path)
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES)})
    rows = run_virtual(grid, cfg, run, progress=Progress(2, live=False))

    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        for key in ("task_accuracy", "task_macro_f1", "task_majority_baseline", "task_rows_scored"):
            assert key in r, (r["round"], key)
        assert r["task_rows_scored"] == 3.0  # --eval-task-limit
        assert set(r["task_per_class_recall"]) == {"colors", "joke", "question"}
    assert rows[1]["clients"] == sorted(rows[1]["clients"]) and len(rows[1]["clients"]) == 2

    # The last row's numbers are those of the saved adapter, scored afresh on the same subset.
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, cfg.lora, seed=cfg.seed)
    task = load_task(task_path, cfg.task_spec())
    fresh0 = evaluate_task(model, base.tokenizer, task)  # the initial adapter (B = 0)
    set_adapter(model, dict(load_file(str(run / "adapter" / "adapter_model.safetensors"))))
    fresh = evaluate_task(model, base.tokenizer, task)
    for key in ("accuracy", "macro_f1", "accuracy_summed", "majority_baseline"):
        assert rows[0][f"task_{key}"] == pytest.approx(fresh0.metrics[key]), key
        assert rows[2][f"task_{key}"] == pytest.approx(fresh.metrics[key]), key
    first, last = fresh0.rows[0]["scores_summed"], fresh.rows[0]["scores_summed"]
    assert first != last  # two rounds of updates changed what the model scores

    # The run's report and plots are written at its end.
    assert (run / "report.html").is_file() and (run / "task.png").is_file()
    assert 'id="plot-task"' in (run / "report.html").read_text()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"eval-task-kind": "label"}, "eval-task-kind: needs --eval-task FILE"),
        ({"eval-task": "t.jsonl"}, "eval-task-kind: --eval-task needs a kind"),
        ({"eval-task": "t.jsonl", "eval-task-kind": "rank"}, "eval-task-kind: 'rank' is not one"),
        ({"eval-task": "t.jsonl", "eval-task-kind": "choice", "eval-task-limit": -2},
         "eval-task-limit: must be >= 0"),
        ({"eval-task": "t.jsonl", "eval-task-kind": "label", "eval-task-columns": "x=y"},
         "eval-task-columns: unknown role 'x'"),
    ],
)  # fmt: skip
def test_eval_task_config_errors_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert message in str(err.value)
