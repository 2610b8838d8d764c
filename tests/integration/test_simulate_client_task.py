"""`fedtune simulate --eval-task-clients` on Flower's simulation engine (Ray) with a tiny model:
the evaluate messages carry the task through Ray to the real ClientApp and the counts come back
into metrics.jsonl, task.png and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.data import heldout_split, records_seed
from client.shards import shard_records

pytestmark = pytest.mark.integration


def test_simulate_writes_client_task_metrics(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    rows = []
    for n, cat in enumerate(("open_qa", "brainstorming")):
        for i in range(30):
            rows.append({"instruction": f"Question {i} of kind {n}?", "response": f"Answer {i}."})
            if i % 5:  # one row in five carries no category
                rows[-1]["category"] = cat
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate",
         "--model", str(tiny_model_dir), "--cache-dir", str(model_cache),
         "--data", str(data), "--partition", "iid", "--num-clients", "2",
         "--clients-per-round", "2", "--min-clients", "2", "--rounds", "1",
         "--local-steps", "2", "--seq-len", "64", "--quantization", "none",
         "--heldout-fraction", "0.3", "--eval-task-clients", "--eval-task-kind", "label",
         "--eval-task-columns", "text=instruction,label=category",
         "--eval-task-labels", "open_qa,brainstorming", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in metrics] == [0, 1]
    # What the clients hold out, recomputed from the run's own partitions (client/shards.py).
    labelled = unlabelled = 0
    for pid in range(2):
        records = shard_records(out / "partitions", pid)
        _, held = heldout_split(len(records), 0.3, records_seed(records))
        labelled += sum("category" in records[int(i)] for i in held)
        unlabelled += sum("category" not in records[int(i)] for i in held)
    for r in metrics:
        assert r["client_task_clients"] == 2
        assert r["client_task_rows_scored"] == labelled
        assert r["client_task_rows_unlabelled"] == unlabelled
        cm = r["client_task_confusion"]
        assert sum(map(sum, cm)) == labelled
        assert r["client_task_accuracy"] == pytest.approx((cm[0][0] + cm[1][1]) / labelled)
        assert len(r["client_task_per_client"]) == 2
    assert (out / "task.png").is_file()
    assert 'id="client-task"' in (out / "report.html").read_text()
