"""The run directory: the contract between a federated run and everything that reads it later.

    config.json     the resolved configuration
    metrics.jsonl   one JSON object per round (round 0: the untrained base, before training)
    adapter/        the global adapter in PEFT format (PeftModel.from_pretrained loads it)
    state.json      the round reached and what a resumed run needs
    loss.png        train / held-out loss curves (each round); at the end of the run also
                    task.png, privacy.png, bytes.png, time.png and report.html
                    (coordinator/report.py)

Every write replaces the old file atomically, so a crash mid-round leaves the previous round's
files intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

CONFIG = "config.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
STATE = "state.json"
PLOT = "loss.png"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class RunDirError(RuntimeError):
    pass


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "value"):  # enums
        return obj.value
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(_clean(data), fh, indent=2, default=_json_default)
        fh.write("\n")
    os.replace(tmp, path)


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: Path, config: Mapping[str, Any], *, resume: bool) -> RunDirectory:
        """Create a new run directory, or reopen one to resume (its config must match)."""
        run = cls(path)
        if run.state_path.exists():
            if not resume:
                raise RunDirError(
                    f"output directory {path} already holds a run; pass --resume to continue it "
                    "or choose another --output-dir"
                )
            saved = json.loads((path / CONFIG).read_text())
            saved_cfg = saved.get("run", saved)
            new_cfg = json.loads(
                json.dumps(_clean(dict(config.get("run", config))), default=_json_default)
            )
            diffs = [
                k
                for k in new_cfg
                if k not in ("rounds", "output-dir", "max-epsilon")
                and saved_cfg.get(k) != new_cfg[k]
            ]
            if diffs:
                raise RunDirError(
                    f"cannot resume {path}: setting {diffs[0]!r} was {saved_cfg.get(diffs[0])!r}, "
                    f"now {new_cfg[diffs[0]]!r}"
                )
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path / CONFIG, dict(config))
        return run

    def update_config(self, section: str, data: Mapping[str, Any]) -> None:
        """Add (or replace) one top-level section of config.json, e.g. the privacy settings
        resolved once the population is known."""
        current = json.loads((self.path / CONFIG).read_text())
        current[section] = dict(data)
        write_json_atomic(self.path / CONFIG, current)

    def mark_stopped(self, reason: str) -> None:
        """Note in state.json why the run stopped before its last round."""
        state = json.loads(self.state_path.read_text())
        state["stopped"] = reason
        write_json_atomic(self.state_path, state)

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    # -- metrics ------------------------------------------------------------------------------

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(_clean(dict(row)), default=_json_default)
        with (self.path / METRICS).open("a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        f = self.path / METRICS
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows after ``last_round`` (a crash may have logged a round it never saved)."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".metrics", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, self.path / METRICS)

    # -- adapter + state ----------------------------------------------------------------------

    def save_round(
        self,
        rnd: int,
        write_adapter: Callable[[Path], None],
        extra_state: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the adapter (``write_adapter`` fills a directory in PEFT format), then the state.

        The state file is written last: it names a round only once that round's adapter is on
        disk.
        """
        scratch = Path(tempfile.mkdtemp(dir=self.path, prefix=".adapter-"))
        try:
            write_adapter(scratch)
            if not (scratch / ADAPTER_WEIGHTS).is_file():
                raise RunDirError(f"adapter writer produced no {ADAPTER_WEIGHTS}")
            old = self.path / ".adapter-old"
            if self.adapter_dir.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.rename(self.adapter_dir, old)
            os.rename(scratch, self.adapter_dir)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        write_json_atomic(self.state_path, {"round": rnd, **(extra_state or {})})

    def load_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """(state, global adapter) of the last completed round, or None for a fresh run."""
        if not self.state_path.exists():
            return None
        state = json.loads(self.state_path.read_text())
        weights = self.adapter_dir / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise RunDirError(
                f"{self.state_path} names round {state.get('round')} but {weights} is missing"
            )
        return state, dict(load_file(str(weights)))

    # -- plot -----------------------------------------------------------------------------------

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (
            ("train_loss", "train (clients, during local steps)"),
            ("eval_loss", "held-out (clients' local splits)"),
            ("central_eval_loss", "held-out (coordinator set)"),
        ):
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=label)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.set_xlabel("round")
        ax.set_ylabel("loss per response token")
        ax.set_title("fedtune run")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.path / PLOT
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
