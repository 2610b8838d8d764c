"""Bad input gets one clear line naming the field or file, exit code 2, and nothing starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model.gguf"], "model path /no/such/model.gguf does not exist"),
        (["--data", "/no/such/data.jsonl"], "data path /no/such/data.jsonl does not exist"),
        (["--partition", "random"], "partition: 'random' is not one of"),
        (["--quantization", "fp4"], "quantization: 'fp4' is not one of none, int8, nf4"),
        (["--rounds", "0"], "rounds: must be >= 1"),
        (
            ["--lora-targets", "nope_proj"],
            "lora.target_modules: model has no module named 'nope_proj'",
        ),
        (["--partition", "iid", "--num-clients", "5000"], "num_clients: 5000 clients but only"),
        (["--clients-per-round", "40"], "clients-per-round: 40 exceeds the 21 clients"),
    ],
)
def test_simulate_rejects_bad_input(
    args: list[str], message: str, tiny_model_dir: Path, model_cache: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    base = ["simulate", "--model", str(tiny_model_dir), "--cache-dir", str(model_cache),
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    code = main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if "error" in line.lower()]
    assert errors == [err[-1]] and err[-1].startswith("fedtune simulate: error: ")
    assert message in err[-1]
    assert not any("simulating" in line for line in err), "the fleet must not start"


def test_bad_row_is_named_before_anything_starts(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "response": "b", "category": "x"}\n{"prompt": "c"}\n')
    code = main(["simulate", "--model", str(tiny_model_dir), "--data", str(data),
                 "--partition", "iid", "--num-clients", "1", "--clients-per-round", "1",
                 "--min-clients", "1", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    assert f"{data}: row 2: no response field" in capsys.readouterr().err


def test_export_of_a_non_run_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "is neither a run directory nor a PEFT adapter directory" in capsys.readouterr().err
