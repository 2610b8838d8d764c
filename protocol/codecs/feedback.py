"""Error feedback (Seide et al. 2014; Karimireddy et al. 2019), as one pure step.

A client adds the residual it kept from earlier rounds to this round's delta, encodes the sum,
and keeps as its new residual what the encoding lost:

    corrected = delta + residual
    payload   = encode(corrected)
    residual' = corrected - decode(payload)

so over rounds every bit of the deltas is eventually sent (the residual stays bounded instead of
the error accumulating in the model). It needs the client's own decoded payload, so it suits
per-client codecs (fp16, int8, int4) in plaintext mode; the client keeps the residual between
rounds in its state directory (``client.error_feedback``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocol.adapter import AdapterSpec
from protocol.codecs.base import Arrays, Codec, CodecError, Payload


def error_feedback_step(
    codec: Codec,
    delta: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    rng: np.random.Generator,
) -> tuple[Payload, Arrays]:
    """Encode ``delta + residual``; return the payload and the new residual (float32, same
    names and shapes as ``delta``). ``residual`` None means zero (the first round)."""
    if residual is not None:
        if list(residual) != list(delta):
            raise CodecError("error feedback: the residual holds other tensors than the delta")
        for k, v in residual.items():
            if v.shape != delta[k].shape:
                raise CodecError(
                    f"error feedback: residual {k!r} has shape {v.shape}, "
                    f"the delta {delta[k].shape}"
                )
    corrected = {
        k: np.asarray(v, dtype=np.float64) + (0.0 if residual is None else residual[k])
        for k, v in delta.items()
    }
    wire = {k: v.astype(np.float32) for k, v in corrected.items()}
    payload = codec.encode(wire, rng)
    sent = codec.decode(payload, AdapterSpec.of(wire))
    new_residual = {k: (corrected[k] - sent[k]).astype(np.float32) for k in corrected}
    return payload, new_residual
