"""``fedtune eval`` end to end on the tiny model: base, adapter, the JSON result, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli.main import main

ROWS = [
    {"text": "Why did the chicken cross the road?", "label": "joke"},
    {"text": "What is machine learning?", "label": "question"},
    {"text": "Red, green and blue.", "label": "colors"},
    {"text": "Tell me a joke.", "label": "joke"},
    {"text": "How do I reset my password?", "label": "question"},
]


def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def make_adapter(tiny_model_dir: Path, cache: Path, out: Path) -> Path:
    from client.model import Quantization, attach_lora, load_base, resolve_model
    from protocol.messages import LoraSpec

    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, cache)
    model = attach_lora(base.model, LoraSpec(rank=2))
    with torch.no_grad():  # B starts at zero; a trained adapter does not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(str(out))
    return out


def test_eval_base_and_adapter_write_json_with_top_level_accuracy(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = task_file(tmp_path)
    common = ["--model", str(tiny_model_dir), "--cache-dir", str(model_cache),
              "--task", str(task), "--kind", "label", "--limit", "4", "--seed", "3"]  # fmt: skip
    assert main(["eval", *common, "-o", str(tmp_path / "base.json")]) == 0
    table = capsys.readouterr().out
    assert "accuracy (length-normalised)" in table and "majority-class baseline" in table
    assert "confusion" in table and "result: " in table
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["kind"] == "label" and base["rows_in_file"] == 5 and base["adapter"] is None
    assert 0.0 <= base["accuracy"] <= 1.0 and "macro_f1" in base
    assert base["classes"] == ["colors", "joke", "question"]
    assert len(base["rows"]) == base["rows_scored"] == 4 and base["rows"][0]["row"] >= 1
    assert sum(map(sum, base["confusion_matrix"])) == 4

    adapter = make_adapter(tiny_model_dir, model_cache, tmp_path / "adapter")
    assert main(["eval", str(adapter), *common, "-o", str(tmp_path / "adapted.json")]) == 0
    adapted = json.loads((tmp_path / "adapted.json").read_text())
    assert adapted["adapter"] == str(adapter)
    assert [r["row"] for r in adapted["rows"]] == [r["row"] for r in base["rows"]]  # same subset
    assert adapted["rows"][0]["scores_summed"] != base["rows"][0]["scores_summed"]


def test_eval_names_the_bad_row(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mc.jsonl"
    path.write_text(
        '{"question": "q", "choices": ["a", "b"], "answer": 1}\n'
        '{"question": "q", "choices": ["a", "b"], "answer": 5}\n'
    )
    code = main(["eval", "--model", str(tiny_model_dir), "--task", str(path), "--kind", "choice"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"fedtune eval: error: {path}: row 2: field 'answer': index 5 is not in 0..1"


def test_eval_rejects_an_unknown_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--task", str(task_file(tmp_path)), "--kind", "ranking"])
    assert code == 2
    assert "kind: 'ranking' is not one of choice, label, generate" in capsys.readouterr().err


def test_quiet_and_verbose_are_accepted_after_the_subcommand() -> None:
    from cli.main import build_parser

    args = build_parser().parse_args(["eval", "--task", "t", "--kind", "label", "-q"])
    assert args.quiet is True and args.verbose is False
    args = build_parser().parse_args(["--quiet", "report", "r"])
    assert args.quiet is True
    args = build_parser().parse_args(["coordinator", "run", "--verbose", "--rounds", "2"])
    assert args.verbose is True and args.quiet is False
