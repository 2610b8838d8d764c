"""The vector a client masks under secure aggregation, and how the coordinator reads the sum.

Without a codec the masked values are the update's values (all tensors flattened in the spec's
order). With ``sketch`` they are the update's count sketch (``SketchCodec.ring_input``: values
clipped to [-clip, clip], then sketched; every cell is then within ``ring_clip``), so the ring
holds ``ratio`` times as many values and the coordinator decodes the summed sketch. With mixed
client ranks (``protocol.ranks``) every client pads its delta to the global rank and appends its
holder vector (1 for the rank components it holds), multiplied by the plan's clip so that it
is encoded at full scale; the coordinator divides the summed holders by it again. The encoding
(``privacy.secagg.encoding.quantize``) then multiplies everything by the client's weight
fraction, so the summed holders are the per-component weights ``protocol.ranks.ranked_mean``
divides by.

    [ values or sketch cells ... | holders * clip (R values, mixed ranks only) ]

With distributed DP (an L2 clip in the plan) the sketch is taken of the unclipped values and the
encoder scales the *sketch* to the L2 clip before the clients' noise is added: compression comes
before clipping and noise, so the guarantee is about the released sum of sketches (what the
coordinator decodes is post-processing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocol.adapter import AdapterSpec
from protocol.codecs.base import Codec, CodecError, flatten
from protocol.codecs.sketch import SketchCodec
from protocol.errors import UpdateRejected


@dataclass(frozen=True)
class SecureLayout:
    """What one round's masked vectors hold: ``spec`` (the update's tensors at the global rank,
    the holder vector excluded), sketched or not, and ``holders`` holder values (0: one rank)."""

    spec: AdapterSpec
    codec: Codec
    holders: int = 0

    def __post_init__(self) -> None:
        if not self.codec.linear:
            raise CodecError(
                f"compress: {self.codec.name} does not compose with --secagg (its payloads do "
                "not add up); use none or sketch"
            )
        if self.holders < 0:
            raise CodecError(f"holders: must be >= 0, got {self.holders}")

    @property
    def sketch(self) -> SketchCodec | None:
        return self.codec if isinstance(self.codec, SketchCodec) else None

    @property
    def values(self) -> int:
        """Masked values before the holders: sketch cells, or the update's values."""
        sk = self.sketch
        return sk.operator(self.spec).size if sk else self.spec.numel

    @property
    def length(self) -> int:
        return self.values + self.holders

    def value_clip(self, clip: float) -> float:
        """The per-coordinate clip of the encoding for per-value clip ``clip``: a sketch cell
        sums several clipped values (``SketchCodec.ring_clip``)."""
        sk = self.sketch
        return sk.ring_clip(self.spec, clip) if sk else clip

    def encode(
        self,
        update: Mapping[str, np.ndarray],
        *,
        clip: float,
        plan_clip: float,
        l2: bool = False,
        holders: np.ndarray | None = None,
    ) -> np.ndarray:
        """The float64 vector to quantize and mask. ``clip``: the per-value clip
        (--secagg-clip); ``plan_clip``: the encoding's per-coordinate clip (holders are scaled
        to it); ``l2``: the encoding scales the vector to an L2 clip (distributed DP), so the
        sketch is taken of the unclipped values."""
        self.spec.check(update, what="secure update")
        sk = self.sketch
        if sk is None:
            v = flatten({k: update[k] for k in self.spec.names})
        elif l2:
            v = sk.sketch({k: update[k] for k in self.spec.names})
        else:
            v = sk.ring_input({k: update[k] for k in self.spec.names}, clip)
        if self.holders:
            if holders is None or holders.shape != (self.holders,):
                raise CodecError(f"secure update: a holder vector of {self.holders} is needed")
            v = np.concatenate([v, np.asarray(holders, np.float64) * plan_clip])
        elif holders is not None:
            raise CodecError("secure update: a holder vector in a round with one rank")
        return v

    def decode(self, summed: np.ndarray, *, plan_clip: float) -> dict[str, np.ndarray]:
        """The unmasked weighted sum (float64, ``length`` values) as named float64 tensors of
        ``spec``, plus ``holders_key`` when there are holders (summed holder weights)."""
        if summed.shape != (self.length,):
            raise UpdateRejected(
                f"secure sum has {summed.size} values, the round's layout {self.length}"
            )
        main, held = summed[: self.values], summed[self.values :]
        out: dict[str, np.ndarray]
        sk = self.sketch
        if sk is not None:
            out = {k: v.astype(np.float64) for k, v in sk.decode_vector(main, self.spec).items()}
        else:
            if not np.isfinite(main).all():
                raise UpdateRejected("secure sum contains NaN or infinite values")
            out, offset = {}, 0  # float64 slices (unflatten would cast to the spec's float32)
            for name, t in self.spec.tensors:
                out[name] = main[offset : offset + t.numel].reshape(t.shape).copy()
                offset += t.numel
        if self.holders:
            out[HOLDERS_KEY] = held / plan_clip
        return out


# The holder vector's name in a summed update (``protocol.ranks.HOLDERS`` is this).
HOLDERS_KEY = "fedtune.rank-holders"
