"""This process's memory: current and peak resident set size, a peak that can be reset between
clients, and the C allocator's settings for training. Standard library only.

A Ray actor serves many simulated clients and a device worker many rounds, so the lifetime peak
(``getrusage``'s ``ru_maxrss``) says nothing about one client. On Linux, writing ``5`` to
``/proc/self/clear_refs`` resets the peak (``VmHWM``) to the current RSS; each client's peak is
then read from ``/proc/self/status``. Elsewhere the lifetime peak is what is reported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations from this size on get their own mapping, returned to the system when freed.
MMAP_THRESHOLD_BYTES = 256 * 1024
# Free memory at the top of the heap beyond this is returned to the system.
TRIM_THRESHOLD_BYTES = 4 * 2**20


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    """Resident set size now, MiB (the lifetime peak where /proc is not available)."""
    now = _status_mb("VmRSS")
    return now if now is not None else lifetime_peak_rss_mb()


def lifetime_peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def reset_peak_rss() -> bool:
    """Make the peak start again from the current RSS; False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident set size since the last ``reset_peak_rss`` (or since start), MiB."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else lifetime_peak_rss_mb()


@functools.cache
def tune_allocator() -> bool:
    """Make glibc's malloc hand freed activations back to the system (once per process).

    By default glibc serves allocations of up to 128 KiB from its heap and raises that threshold
    (up to 32 MiB) every time a larger, separately mapped block is freed. Training allocates and
    frees tensors of a few MiB all through a step, so after the first frees they come from the
    heap, whose freed space is kept: the peak RSS of an NF4 training step with checkpointing was
    1,071 MiB with the defaults and 771 MiB with the threshold fixed at 256 KiB (README,
    "Memory"). Fixing the threshold also stops glibc from moving it. Returns whether the
    settings were applied (False on other C libraries).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    )
