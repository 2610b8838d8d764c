"""The run directory: the contract between a federated run and everything that reads it later.

    config.json     the resolved configuration
    metrics.jsonl   one JSON object per round (round 0: the untrained base, before training)
    adapter/        the global adapter in PEFT format (PeftModel.from_pretrained loads it)
    state.json      the round reached and what a resumed run needs
    server-state.safetensors   the server optimizer's state of that round (FedAdam's moments, ...)
    loss.png        train / held-out loss curves (each round); at the end of the run also
                    task.png, privacy.png, bytes.png, time.png and report.html
                    (coordinator/report.py)

Every write replaces the old file atomically, so a crash mid-round leaves the previous round's
files intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

CONFIG = "config.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
STATE = "state.json"
PLOT = "loss.png"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SERVER_STATE = "server-state.safetensors"  # server optimizer moments, SCAFFOLD's control variate


class RunDirError(RuntimeError):
    pass


# Settings a resumed run may change: how long it runs, where the run directory and the
# machine-local model cache live (the cache holds the same weights wherever it is).
RESUME_MAY_CHANGE = (
    "rounds",
    "output-dir",
    "max-epsilon",
    "cache-dir",
    # Where and how the simulation runs, not what it computes.
    "cpus-per-client",
    "gpus-per-client",
    "client-data-cache",
    "ray-address",
)
# Settings holding paths. One inside the run directory is stored (and compared) relative to it,
# so a moved or copied run directory resumes.
PATH_SETTINGS = ("partition-dir", "central-eval-data", "device-profiles")


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


# ------------------------------------------------------------ checks before anything is written


def _run_section(record: Mapping[str, Any]) -> dict[str, Any]:
    section = record.get("run", record)
    return dict(section) if isinstance(section, Mapping) else {}


def _inside(value: Any, root: Path | str | None) -> Any:
    """``value`` relative to ``root`` (POSIX form) if it is an absolute path inside it."""
    if not isinstance(value, str) or not value or root is None or not os.path.isabs(value):
        return value
    real, base = os.path.realpath(value), os.path.realpath(root)
    if real == base:
        return "."
    if real.startswith(base.rstrip(os.sep) + os.sep):
        return Path(os.path.relpath(real, base)).as_posix()
    return value


def relative_paths(run: Mapping[str, Any], root: Path | str | None) -> dict[str, Any]:
    """The flat run settings with each of ``PATH_SETTINGS`` inside ``root`` made relative."""
    return {k: _inside(v, root) if k in PATH_SETTINGS else v for k, v in run.items()}


def stored_config(path: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """What config.json holds: ``config`` with paths inside the run directory relative to it."""
    out = dict(config)
    if isinstance(out.get("run"), Mapping):
        out["run"] = relative_paths(out["run"], path)
    return out


def resume_mismatch(saved: Mapping[str, Any], new: Mapping[str, Any], run_dir: Path) -> str | None:
    """The first setting a resume would change (``RESUME_MAY_CHANGE`` aside), as a message, or
    None. Paths inside the run directory compare relative to it: the saved ones relative to
    where the run was (its saved ``output-dir``), the new ones relative to ``run_dir``."""
    old = relative_paths(_run_section(saved), _run_section(saved).get("output-dir"))
    cur = json.loads(json.dumps(_clean(_run_section(new)), default=_json_default))
    cur = relative_paths(cur, run_dir)
    for key, value in cur.items():
        if key not in RESUME_MAY_CHANGE and old.get(key) != value:
            return f"setting {key!r} was {old.get(key)!r}, now {value!r}"
    return None


def check_resume_config(path: Path, config: Mapping[str, Any]) -> None:
    """Raise ``RunDirError`` unless the run in ``path`` can resume with ``config``."""
    why = resume_mismatch(read_config(path), config, path)
    if why:
        raise RunDirError(f"cannot resume {path}: {why}")


def read_config(path: Path) -> dict[str, Any]:
    """The saved config.json of the run in ``path``; ``RunDirError`` if ``path`` is no run."""
    if not path.exists():
        raise RunDirError(f"--resume: {path} does not exist (nothing to resume)")
    if not path.is_dir():
        raise RunDirError(f"--resume: {path} is not a directory")
    try:
        saved = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(
            f"--resume: {path} is not a fedtune run directory (it has no {CONFIG})"
        ) from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"--resume: {path / CONFIG} cannot be read ({exc})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("run"), dict):
        raise RunDirError(f"--resume: {path / CONFIG} is not a fedtune run configuration")
    return saved


def is_run(path: Path) -> bool:
    """Whether ``path`` holds a run (a config.json with a ``run`` section)."""
    try:
        read_config(path)
    except RunDirError:
        return False
    return True


def check_new_output_dir(path: Path) -> None:
    """A new run goes into a new or empty directory: refuse a run (that needs --resume) and a
    directory holding anything else (the run would write beside, or over, the user's files)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise RunDirError(f"output directory {path} exists and is not a directory")
    if (path / STATE).exists() or is_run(path):
        raise RunDirError(
            f"output directory {path} already holds a run; pass --resume to continue it "
            "or choose another --output-dir"
        )
    if any(path.iterdir()):
        raise RunDirError(
            f"output directory {path} is not empty; a new run needs a new or empty directory"
        )


@contextlib.contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """For a new run in ``path`` (new or empty): if the block fails before a round was saved
    (no state.json, so nothing to resume), remove what it created there, and ``path`` itself
    if it did not exist. A directory that was there before keeps existing (it was empty)."""
    existed = path.exists()
    before = set(path.iterdir()) if existed else set()
    try:
        yield
    except BaseException:
        if not (path / STATE).exists():
            if not existed:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir():
                for entry in set(path.iterdir()) - before:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            entry.unlink()
        raise


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
            check_resume_config(path, config)
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path / CONFIG, stored_config(path, config))
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
        server_arrays: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write the adapter (``write_adapter`` fills a directory in PEFT format) and the server
        optimizer's arrays (tagged with the round), then the state.

        The state file is written last: it names a round only once that round's adapter and
        optimizer state are on disk.
        """
        self._write_server_arrays(rnd, dict(server_arrays or {}))
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

    def _write_server_arrays(self, rnd: int, arrays: dict[str, np.ndarray]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{SERVER_STATE}", suffix=".tmp")
        os.close(fd)
        try:
            save_file(
                {k: np.ascontiguousarray(v) for k, v in arrays.items()},
                tmp,
                metadata={"round": str(rnd)},
            )
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path / SERVER_STATE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load_server_arrays(self, rnd: int) -> dict[str, np.ndarray]:
        """The server optimizer's arrays saved with round ``rnd`` (none for a stateless
        optimizer; every round writes the file)."""
        path = self.path / SERVER_STATE
        if not path.is_file():
            raise RunDirError(f"{self.state_path} names round {rnd} but {path} is missing")
        with safe_open(str(path), framework="np") as fh:
            saved = (fh.metadata() or {}).get("round")
            if saved != str(rnd):
                raise RunDirError(f"{path} belongs to round {saved}, {STATE} to round {rnd}")
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118

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


def summary(run_dir: Path) -> Mapping[str, Any]:
    """The headline figures of a run directory (what `fedtune simulate` prints)."""
    rows = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    first, last = rows[0], rows[-1]
    state_file = run_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return {
        "epsilon": last.get("epsilon"),
        "delta": last.get("delta"),
        "stopped": state.get("stopped"),
        "rounds": last["round"],
        "eval_loss_round0": first.get("eval_loss"),
        "eval_loss_final": last.get("eval_loss"),
        "central_eval_loss_round0": first.get("central_eval_loss"),
        "central_eval_loss_final": last.get("central_eval_loss"),
        "task_accuracy_round0": first.get("task_accuracy"),
        "task_accuracy_final": last.get("task_accuracy"),
    }
