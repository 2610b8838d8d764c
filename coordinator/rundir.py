"""The run directory: the contract between a federated run and everything that reads it later.

    config.json     the resolved configuration
    metrics.jsonl   one JSON object per round (round 0: the untrained base, before training)
    adapter/        the global adapter in PEFT format (PeftModel.from_pretrained loads it)
    state.json      the round reached and what a resumed run needs
    server-state.safetensors   the server optimizer's state of that round (FedAdam's moments, ...)
    loss.png        train / held-out loss curves (each round); at the end of the run also
                    task.png, privacy.png, bytes.png, time.png and report.html
                    (coordinator/report.py)

Crash consistency (``kill -9`` or a power cut at any moment, then ``--resume``): every file is
written atomically (``client.durable``: temp file, fsync, rename, fsync of the directory). A round
is saved in three steps:

1. stage: everything of round N (adapter/, server-state.safetensors, state.json, the metrics
   row) is written into a scratch directory ``.round-N.tmp-*`` and fsynced;
2. commit: that directory is renamed to ``.commit-N`` (one atomic rename): from here on round N
   is saved;
3. install: its files are moved into place (server state, adapter, the metrics row, state.json
   last) and ``.commit-N`` is removed.

Each install step can be redone, so a resume first finishes an interrupted install; a scratch
directory (a round that never committed) is deleted and that round is redone. state.json names
its round and the SHA-256 of the adapter weights; server-state.safetensors names its round in its
header; metrics.jsonl is reconciled with state.json (rows after it dropped, one row per round).
"""

from __future__ import annotations

import contextlib
import hashlib
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

from client.durable import fsync_dir, fsync_tree, remove_scratch, replace_durably, write_text_atomic

CONFIG = "config.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
STATE = "state.json"
PLOT = "loss.png"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SERVER_STATE = "server-state.safetensors"  # server optimizer moments, SCAFFOLD's control variate
ROW = "row.json"  # the metrics row inside a staged round
COMMIT_PREFIX = ".commit-"
OLD_ADAPTER = ".adapter-old"


def checkpoint_step(name: str) -> None:
    """A named point of saving a round (tests inject crashes here; nothing happens otherwise).
    Steps, in order: staged, committed, server-state-installed, adapter-moved-aside,
    adapter-installed, metrics-installed, state-installed, done."""


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
    """Replace ``path`` by ``data`` as JSON (temp file, fsync, rename, fsync of the directory)."""
    write_text_atomic(path, json.dumps(_clean(data), indent=2, default=_json_default) + "\n")


def _row_line(row: Mapping[str, Any]) -> str:
    return json.dumps(_clean(dict(row)), default=_json_default)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        if run.state_path.exists() or (path.is_dir() and run._commits()):
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
        """Append one row (not part of a round's checkpoint; ``save_round`` installs round rows)."""
        with (self.path / METRICS).open("a") as fh:
            fh.write(_row_line(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; a last line cut short by a crash is skipped."""
        f = self.path / METRICS
        if not f.exists():
            return []
        lines = [line for line in f.read_text().splitlines() if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i == len(lines) - 1:  # a torn append: that row is written again
                    break
                raise RunDirError(f"{f}: line {i + 1} is not JSON") from None
        return rows

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        write_text_atomic(self.path / METRICS, "".join(_row_line(r) + "\n" for r in rows))

    def truncate_metrics(self, last_round: int) -> None:
        """Keep one row per round up to ``last_round`` (a crash may have logged a round it
        never saved, or logged one twice)."""
        self.reconcile_metrics(last_round)

    def reconcile_metrics(self, last_round: int, row: Mapping[str, Any] | None = None) -> None:
        """metrics.jsonl := the first row of each round before ``last_round`` and, for
        ``last_round``, ``row`` if given (else the row already there). Rewritten atomically,
        and only if that changes it."""
        old = self.read_metrics()
        by_round: dict[int, dict[str, Any]] = {}
        for r in old:
            rnd = int(r["round"])
            if rnd <= last_round and rnd not in by_round:
                by_round[rnd] = r
        if row is not None:
            by_round[last_round] = json.loads(_row_line(row))
        rows = [by_round[k] for k in sorted(by_round)]
        f = self.path / METRICS
        want = "".join(_row_line(r) + "\n" for r in rows)
        if not f.exists() or f.read_text() != want:
            self._write_metrics(rows)

    def _last_row_round(self) -> int | None:
        """The round of metrics.jsonl's last line, read from the end of the file (None: no
        file, empty, or a last line that is not a whole JSON row)."""
        f = self.path / METRICS
        if not f.is_file():
            return None
        with f.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return None
            block = min(size, 1 << 16)
            while True:
                fh.seek(size - block)
                tail = fh.read(block)
                if not tail.endswith(b"\n"):
                    return None  # a torn append
                start = tail.rfind(b"\n", 0, len(tail) - 1)
                if start >= 0 or block == size:
                    break
                block = min(size, block * 4)
        try:
            return int(json.loads(tail[start + 1 :])["round"])
        except (ValueError, KeyError, TypeError):
            return None

    def _install_row(self, rnd: int, row: Mapping[str, Any] | None) -> None:
        """Put round ``rnd``'s row in metrics.jsonl: appended (fsynced) when the file ends with
        round ``rnd - 1``, nothing when it already ends with ``rnd`` (an install redone after
        the append), else the whole file reconciled (after a crash)."""
        last = self._last_row_round()
        if row is not None and last == rnd - 1:
            self.append_metrics(row)
        elif row is None or last != rnd:
            self.reconcile_metrics(rnd, row)

    # -- adapter + state ----------------------------------------------------------------------

    def save_round(
        self,
        rnd: int,
        write_adapter: Callable[[Path], None],
        extra_state: Mapping[str, Any] | None = None,
        server_arrays: Mapping[str, np.ndarray] | None = None,
        row: Mapping[str, Any] | None = None,
    ) -> None:
        """Save round ``rnd``: its adapter (``write_adapter`` fills a directory in PEFT format),
        the server optimizer's arrays, the state (``extra_state``: privacy ledgers, secure
        aggregation's exclusions, ...) and its metrics row, all or nothing (stage, commit,
        install: see the module docstring)."""
        remove_scratch(self.path)
        stage = Path(tempfile.mkdtemp(dir=self.path, prefix=f".round-{rnd}.tmp-"))
        try:
            write_adapter(stage / ADAPTER)
            weights = stage / ADAPTER / ADAPTER_WEIGHTS
            if not weights.is_file():
                raise RunDirError(f"adapter writer produced no {ADAPTER_WEIGHTS}")
            self._write_server_arrays(stage / SERVER_STATE, rnd, dict(server_arrays or {}))
            state = {"round": rnd, "adapter_sha256": file_sha256(weights), **(extra_state or {})}
            (stage / STATE).write_text(
                json.dumps(_clean(state), indent=2, default=_json_default) + "\n"
            )
            if row is not None:
                (stage / ROW).write_text(_row_line(row) + "\n")
            fsync_tree(stage)
            checkpoint_step("staged")
            commit = self.path / f"{COMMIT_PREFIX}{rnd}"
            shutil.rmtree(commit, ignore_errors=True)  # a stale one: this round is saved anew
            os.rename(stage, commit)
            fsync_dir(self.path)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        checkpoint_step("committed")
        self._install(commit)

    def _commits(self) -> list[tuple[int, Path]]:
        out = []
        for entry in self.path.iterdir():
            if entry.name.startswith(COMMIT_PREFIX) and entry.is_dir():
                suffix = entry.name[len(COMMIT_PREFIX) :]
                if suffix.isdigit():
                    out.append((int(suffix), entry))
        return sorted(out)

    def _install(self, commit: Path) -> None:
        """Move the files of a committed round into place. Every step can be redone after a
        crash (a file already moved is simply no longer in ``commit``)."""
        rnd = int(commit.name[len(COMMIT_PREFIX) :])
        if (commit / SERVER_STATE).exists():
            replace_durably(commit / SERVER_STATE, self.path / SERVER_STATE)
        checkpoint_step("server-state-installed")
        if (commit / ADAPTER).exists():
            old = self.path / OLD_ADAPTER
            if self.adapter_dir.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.rename(self.adapter_dir, old)
                fsync_dir(self.path)
            checkpoint_step("adapter-moved-aside")
            os.rename(commit / ADAPTER, self.adapter_dir)
            fsync_dir(self.path)
            fsync_dir(commit)
            shutil.rmtree(old, ignore_errors=True)
        checkpoint_step("adapter-installed")
        row = json.loads((commit / ROW).read_text()) if (commit / ROW).exists() else None
        self._install_row(rnd, row)
        checkpoint_step("metrics-installed")
        if (commit / STATE).exists():
            replace_durably(commit / STATE, self.state_path)
        checkpoint_step("state-installed")
        shutil.rmtree(commit)
        fsync_dir(self.path)
        checkpoint_step("done")

    def recover(self) -> None:
        """Finish a round whose install a crash interrupted, drop rounds that never committed
        (scratch directories) and older leftovers, and reconcile metrics.jsonl with state.json."""
        commits = self._commits()
        for _rnd, stale in commits[:-1]:  # never more than one; an older one is superseded
            shutil.rmtree(stale, ignore_errors=True)
        if commits:
            self._install(commits[-1][1])
        remove_scratch(self.path)
        old = self.path / OLD_ADAPTER
        if old.exists():
            if self.adapter_dir.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # cannot happen with a commit installed above; kept as the last good copy
                os.rename(old, self.adapter_dir)
            fsync_dir(self.path)
        if self.state_path.exists():
            self.reconcile_metrics(int(json.loads(self.state_path.read_text())["round"]))

    def _write_server_arrays(self, path: Path, rnd: int, arrays: dict[str, np.ndarray]) -> None:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            str(path),
            metadata={"round": str(rnd)},
        )

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
        """(state, global adapter) of the last saved round, or None for a fresh run. An
        interrupted save is finished or dropped first (``recover``)."""
        self.recover()
        if not self.state_path.exists():
            return None
        state = json.loads(self.state_path.read_text())
        weights = self.adapter_dir / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise RunDirError(
                f"{self.state_path} names round {state.get('round')} but {weights} is missing"
            )
        digest = state.get("adapter_sha256")
        if digest is not None and file_sha256(weights) != digest:
            raise RunDirError(
                f"{weights} is not the adapter of round {state.get('round')} that "
                f"{self.state_path} names (its SHA-256 differs)"
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
