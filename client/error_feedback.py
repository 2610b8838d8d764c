"""The client's error-feedback residual, kept in its state directory across rounds and restarts.

``encode_delta`` is what a client's train handler calls to put its delta on the wire: with error
feedback on, it loads the residual left by the previous round (none on the first round, or after
the adapter layout changed), runs ``protocol.codecs.error_feedback_step`` and stores the new
residual before the payload is returned. The file is written atomically (temporary file, fsync,
rename), so a crash leaves the previous residual intact.

The residual is stored as safetensors (float32, under the tensors' names) with the layout digest
in its header; a residual for another layout (another rank, other trained tensors) is discarded,
since its entries do not correspond to the new tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.durable import write_bytes_atomic
from protocol.adapter import AdapterSpec
from protocol.codecs import Codec, Payload, error_feedback_step, layout_digest
from protocol.messages import TrainInstruction

RESIDUAL_FILE = Path("compression") / "residual.safetensors"
_LAYOUT_KEY = "fedtune-layout"


class ResidualError(RuntimeError):
    """The residual file exists but cannot be read; the message names the file."""


def residual_path(state_dir: Path) -> Path:
    return state_dir / RESIDUAL_FILE


def load_residual(path: Path, spec: AdapterSpec) -> dict[str, np.ndarray] | None:
    """The stored residual for tensors of ``spec``, or None if there is none for this layout."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            if meta.get(_LAYOUT_KEY) != layout_digest(spec):
                return None
            out = {name: fh.get_tensor(name) for name in spec.names}
    except (OSError, SafetensorError, KeyError) as exc:
        raise ResidualError(
            f"error-feedback residual {path} cannot be read ({exc}); delete it to start again"
        ) from exc
    for name, t in spec.tensors:
        if out[name].shape != t.shape or out[name].dtype != np.float32:
            raise ResidualError(
                f"error-feedback residual {path}: tensor {name!r} is {out[name].dtype} "
                f"{out[name].shape}, expected float32 {t.shape}"
            )
    return out


def save_residual(path: Path, residual: Mapping[str, np.ndarray]) -> None:
    """Write ``residual`` (float32) atomically, tagged with its layout."""
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in residual.items()}
    blob = save(tensors, metadata={_LAYOUT_KEY: layout_digest(AdapterSpec.of(tensors))})
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_bytes_atomic(path, blob)


def codec_rng(instr: TrainInstruction, context: Any) -> np.random.Generator:
    """The generator of a client's stochastic rounding: seeded by the run's seed, the round and
    the client's partition id (its node id when it has none), so simulations reproduce."""
    node = context.node_config.get("partition-id", context.node_id)
    return np.random.default_rng([0xC0DEC, instr.seed, instr.round, int(node) % 2**63])


def encode_delta(
    codec: Codec,
    delta: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    *,
    state_dir: Path | None = None,
) -> Payload:
    """The client's delta as a payload; with ``state_dir`` (error feedback on), the residual in
    ``state_dir`` is added first and the new residual stored."""
    if state_dir is None:
        return codec.encode(delta, rng)
    path = residual_path(state_dir)
    residual = load_residual(path, AdapterSpec.of(delta))
    payload, new_residual = error_feedback_step(codec, delta, residual, rng)
    save_residual(path, new_residual)
    return payload
