"""Crash-safe file writes: a file is either its old content or its whole new content, also after
a power cut or ``kill -9``.

Each write goes to a temporary file in the same directory, is flushed and fsynced, renamed over
the target (``os.replace`` is atomic on POSIX within a file system), and then the directory is
fsynced so that the rename itself is durable. Temporary names start with ``.`` and end with
``.tmp``; ``remove_scratch`` deletes what a crash left of them.

Used by the run directory (``coordinator.rundir``) and the clients' state directories
(``client.corrections``, ``client.error_feedback``, ``client.dpsgd``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (``path`` included), deepest first."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: temp file in the same directory, fsync, rename, fsync dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def replace_durably(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` (a file, same file system) and make the rename durable."""
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def remove_scratch(directory: Path) -> list[Path]:
    """Delete the temporary files and directories a crash left in ``directory`` (names starting
    with ``.`` and ending with ``.tmp``, or containing ``.tmp-``). Returns what was removed."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        name = entry.name
        if not name.startswith(".") or not (name.endswith(TMP_SUFFIX) or ".tmp-" in name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    if removed:
        fsync_dir(directory)
    return removed


# ------------------------------------------------------------- round-versioned client state
#
# A client's state (SCAFFOLD's c_i, ...) is written per round: ``<stem>-r000007<suffix>`` is the
# state after round 7. Round r reads the newest version from before r, so a round the coordinator
# redoes after a crash (it never saved it) starts from the same state as the first attempt, even
# if this client finished that attempt and wrote its version. Older versions are deleted once a
# newer one is written, except the one a redo of the newest round would read.


def versioned(directory: Path, stem: str, suffix: str, rnd: int) -> Path:
    return directory / f"{stem}-r{rnd:06d}{suffix}"


def versions(directory: Path, stem: str, suffix: str) -> dict[int, Path]:
    """Round -> file of every stored version."""
    out: dict[int, Path] = {}
    if not directory.is_dir():
        return out
    prefix = f"{stem}-r"
    for p in directory.iterdir():
        name = p.name
        if name.startswith(prefix) and name.endswith(suffix):
            digits = name[len(prefix) : len(name) - len(suffix)]
            if digits.isdigit():
                out[int(digits)] = p
    return out


def version_before(directory: Path, stem: str, suffix: str, rnd: int) -> Path | None:
    """The newest version written by a round before ``rnd``, or None."""
    older = {r: p for r, p in versions(directory, stem, suffix).items() if r < rnd}
    return older[max(older)] if older else None


def prune_versions(directory: Path, stem: str, suffix: str, rnd: int) -> None:
    """After writing round ``rnd``'s version: delete versions before the one round ``rnd`` read
    (that one stays for a redo of ``rnd``), and any of later rounds (never saved by the
    coordinator: they will be written again)."""
    all_versions = versions(directory, stem, suffix)
    read = max((r for r in all_versions if r < rnd), default=None)
    for r, p in all_versions.items():
        if r > rnd or (read is not None and r < read):
            p.unlink(missing_ok=True)
