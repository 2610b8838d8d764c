"""Run reports: the numbers behind the plots, by hand; the HTML's content (Chromium rendering is in
tests/integration/test_report_chromium.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli.main import main
from coordinator import report
from tests.report_fixture import NODES, rows, write_run


def test_time_split_sequential_and_parallel() -> None:
    row = rows()[1]  # train phase 10 s (clients 8 s summed, 4.5 s slowest), eval phase 4 s
    seq = report.time_split(row, sequential=True)
    assert seq == {"train": 8.0, "evaluate": 3.0 + 1.0, "transport": 2.0 + 1.0, "coordinator": 1.0}
    par = report.time_split(row, sequential=False)  # eval: mean client 3/3 = 1 s
    assert par == {"train": 4.5, "evaluate": 1.0 + 1.0, "transport": 5.5 + 3.0, "coordinator": 1.0}
    assert sum(seq.values()) == sum(par.values()) == row["seconds"]
    # round 0 has no train phase: 4 s evaluate phase (3 s compute), 1 s task eval, 0.5 s other
    assert report.time_split(rows()[0], sequential=True) == {
        "train": 0.0, "evaluate": 4.0, "transport": 1.0, "coordinator": 0.5,
    }  # fmt: skip


def test_participation_and_failures() -> None:
    clients, rounds, cells = report.participation(rows())  # an older run: clients by node id
    n0, n2 = str(NODES[0]), str(NODES[2])
    assert clients == sorted(str(n) for n in NODES) and rounds == [1, 2, 3]
    assert cells[(n0, 1)] == "ok" and (n2, 1) not in cells
    assert cells[(n0, 2)] == "CUDA out of memory"
    assert cells[(n2, 3)] == "ok"
    named = [  # rows of this version: clients by name
        {**r, "clients": ["ai", "law"], "failures": [{"client": "law", "reason": "oom"}]}
        for r in rows()
    ]
    clients, _, cells = report.participation(named)
    assert clients == ["ai", "law"] and cells[("ai", 1)] == "ok" and cells[("law", 1)] == "oom"
    assert (1, "train", "law", "oom") in report.failures(named)
    secure = [{k: v for k, v in r.items() if k != "clients"} for r in rows()]  # counts only
    assert report.participation(secure) == ([], [], {})
    assert report.failures(rows()) == [
        (2, "train", str(NODES[0]), "CUDA out of memory"),
        (2, "train", str(NODES[1]), "no reply within 900s"),
        (2, "round", "-", "0 usable update(s), min-clients is 2"),
        (3, "evaluate", str(NODES[2]), "no held-out rows"),
    ]


def test_series_and_cumulative() -> None:
    assert report.series(rows(), "train_loss") == ([1, 2, 3], [2.2, 1.9, pytest.approx(1.6)])
    assert report.cumulative([1.0, 2.0, 3.0]) == [1.0, 3.0, 6.0]


def test_report_html_is_self_contained(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run-a")
    out = report.write_report([run], tmp_path / "r.html")
    text = out.read_text()
    for name in report.PLOT_FILES:
        assert f'id="plot-{name}"' in text, name
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 5
    assert not re.search(r'(src|href)="(https?:)?//', text), "nothing may be fetched"
    assert "<script" not in text
    assert "device-0" in text and "CUDA out of memory" in text and "no held-out rows" in text
    assert "&quot;dp&quot;: &quot;client&quot;" in text  # the configuration, escaped
    assert "0.2500 (round 0) &rarr; 0.5500 (round 3)" in text  # task accuracy first -> last


def test_report_cli_several_runs_and_pngs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_run(tmp_path / "run-a")
    b = write_run(tmp_path / "run-b", node_names=False, simulated=False)
    out = tmp_path / "both.html"
    assert main(["report", str(a), str(b), "-o", str(out)]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    text = out.read_text()
    assert "run-a" in text and "run-b" in text and str(NODES[1]) in text  # b: ids, no names
    written = report.save_plots(a)
    assert sorted(p.name for p in written) == sorted(report.PLOT_FILES.values())
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_report_of_a_non_run_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a run directory (no metrics.jsonl)" in capsys.readouterr().err
