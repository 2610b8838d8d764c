"""``fedtune export``: the global adapter as a PEFT directory, optionally merged into a
standalone model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from client.model import Quantization, default_cache_dir, load_base, resolve_model
from coordinator.rundir import ADAPTER, ADAPTER_WEIGHTS, CONFIG


class ExportError(RuntimeError):
    pass


def find_adapter(path: Path) -> tuple[Path, str | None]:
    """Accept a run directory or a PEFT adapter directory. Returns (adapter dir, model spec
    recorded by the run, if any)."""
    path = path.expanduser()
    if (path / ADAPTER / ADAPTER_WEIGHTS).is_file():
        model = None
        if (path / CONFIG).is_file():
            cfg = json.loads((path / CONFIG).read_text())
            model = cfg.get("run", cfg).get("model")
        return path / ADAPTER, model
    if (path / ADAPTER_WEIGHTS).is_file() and (path / "adapter_config.json").is_file():
        return path, None
    raise ExportError(
        f"{path} is neither a run directory nor a PEFT adapter directory "
        f"(no {ADAPTER}/{ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS} inside)"
    )


def export(
    source: Path,
    output: Path,
    *,
    model: str | None,
    merge: bool,
    cache_dir: Path | None = None,
    overwrite: bool = False,
) -> Path:
    adapter_dir, run_model = find_adapter(source)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ExportError(f"output directory {output} is not empty (pass --overwrite)")
        shutil.rmtree(output)
    if not merge:
        shutil.copytree(adapter_dir, output)
        return output

    from peft import PeftModel

    spec = model or run_model
    if spec is None:
        raise ExportError(
            "--merge needs the base model: pass --model (not recorded with this adapter)"
        )
    base = load_base(resolve_model(spec), Quantization.NONE, cache_dir or default_cache_dir())
    merged = PeftModel.from_pretrained(base.model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(output)
    base.tokenizer.save_pretrained(output)
    return output
