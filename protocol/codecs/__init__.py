"""Update codecs: what a client's delta (or the global adapter) looks like on the wire.

``--compress none|fp16|int8|int4|sketch`` picks one; ``CompressionConfig`` holds the choice and
its settings and builds the ``Codec``. Which codecs compose with what:

| codec  | bytes vs fp32 (r=8 q,v default) | linear (secure aggregation) | error feedback |
|--------|---------------------------------|-----------------------------|----------------|
| none   | 1                               | yes                         | -              |
| fp16   | ~1/2                            | no                          | yes            |
| int8   | ~1/4 (+ scales)                 | no (per-client scales)      | yes            |
| int4   | ~1/8 (+ scales)                 | no (per-client scales)      | yes            |
| sketch | ~ratio (float32 cells)          | yes: the coordinator decodes the sum of sketches | no |

Under secure aggregation the masked vector is the sketch (``SketchCodec.ring_input``), fixed-point
encoded by ``privacy.secagg.encoding`` in the smallest ring that cannot wrap (bound in
``protocol.codecs.sketch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Protocol

from protocol.codecs.base import (
    Arrays,
    Codec,
    CodecError,
    MetaValue,
    Payload,
    layout_digest,
)
from protocol.codecs.feedback import error_feedback_step
from protocol.codecs.floats import Fp16Codec, NoneCodec
from protocol.codecs.quantized import StochasticQuantizer
from protocol.codecs.sketch import CountSketch, SketchCodec
from protocol.codecs.wire import (
    bytes_ratio,
    fp32_adapter_bytes,
    from_records,
    payload_bytes,
    to_records,
)

CODEC_NAMES: Final = ("none", "fp16", "int8", "int4", "sketch")
FEEDBACK_CODECS: Final = ("fp16", "int8", "int4")
LINEAR_CODECS: Final = ("none", "sketch")


class CompressionFields(Protocol):
    """The compression fields an option table or an instruction holds (``RunConfig``,
    ``TrainInstruction``), as ``CompressionConfig.of`` reads them."""

    @property
    def compress(self) -> str: ...
    @property
    def compress_block_size(self) -> int: ...
    @property
    def sketch_ratio(self) -> float: ...
    @property
    def sketch_rows(self) -> int: ...
    @property
    def error_feedback(self) -> bool: ...


@dataclass(frozen=True)
class CompressionConfig:
    """The ``--compress`` choice and its settings (names as on the command line)."""

    codec: str = "none"  # --compress
    block_size: int = 0  # --compress-block-size: int8/int4 values per scale; 0 = one per tensor
    sketch_ratio: float = 0.25  # --sketch-ratio: sketch cells / values
    sketch_rows: int = 1  # --sketch-rows
    error_feedback: bool = False  # --error-feedback

    def __post_init__(self) -> None:
        if self.codec not in CODEC_NAMES:
            raise CodecError(
                f"compress: must be one of {'|'.join(CODEC_NAMES)}, got {self.codec!r}"
            )
        if self.block_size < 0:
            raise CodecError(f"compress-block-size: must be >= 0, got {self.block_size}")
        if not (math.isfinite(self.sketch_ratio) and 0 < self.sketch_ratio <= 1):
            raise CodecError(f"sketch-ratio: must be in (0, 1], got {self.sketch_ratio}")
        if self.sketch_rows < 1:
            raise CodecError(f"sketch-rows: must be >= 1, got {self.sketch_rows}")
        if self.error_feedback and self.codec not in FEEDBACK_CODECS:
            raise CodecError(
                f"error-feedback: only for {', '.join(FEEDBACK_CODECS)} (got compress "
                f"{self.codec!r}: lossless, or a sketch whose one-client decode is too noisy)"
            )

    @classmethod
    def of(cls, fields: CompressionFields) -> CompressionConfig:
        """The settings held in ``fields`` (``RunConfig`` or ``TrainInstruction``)."""
        return cls(
            codec=fields.compress,
            block_size=fields.compress_block_size,
            sketch_ratio=fields.sketch_ratio,
            sketch_rows=fields.sketch_rows,
            error_feedback=fields.error_feedback,
        )

    def check_secagg(self, secagg: bool) -> None:
        """Refuse settings that cannot run under secure aggregation, with the reason."""
        if not secagg:
            return
        if self.error_feedback:
            raise CodecError("error-feedback: plaintext mode only (not with --secagg)")
        if self.codec not in LINEAR_CODECS:
            raise CodecError(
                f"compress: {self.codec} does not compose with --secagg (the coordinator sees "
                f"only the sum, and {self.codec} payloads do not add up); use "
                f"{' or '.join(LINEAR_CODECS)}"
            )

    @property
    def norm_slack(self) -> float:
        """How much larger than the sent update's L2 norm its decoded form may honestly be,
        for the coordinator's default norm bound: a one-client sketch decode adds error of
        expected squared norm (n_t - 1) / (rows w_t) ||x_t||^2 (``protocol.codecs.sketch``),
        so sqrt(1 + 1 / (ratio rows)), doubled for the draw; quantizers move each value by less
        than one step (1: the bound's own factor 4 covers it)."""
        if self.codec != "sketch":
            return 1.0
        return 2.0 * math.sqrt(1.0 + 1.0 / (self.sketch_ratio * self.sketch_rows))

    def build(self, seed: int = 0, rnd: int = 0) -> Codec:
        """The codec for one round; ``seed`` and ``rnd`` (shared) seed the sketch's hashes."""
        if self.codec == "none":
            return NoneCodec()
        if self.codec == "fp16":
            return Fp16Codec()
        if self.codec in ("int8", "int4"):
            return StochasticQuantizer(8 if self.codec == "int8" else 4, self.block_size)
        return SketchCodec(self.sketch_ratio, self.sketch_rows, seed, rnd)


__all__ = [
    "CODEC_NAMES",
    "FEEDBACK_CODECS",
    "LINEAR_CODECS",
    "Arrays",
    "Codec",
    "CodecError",
    "CompressionConfig",
    "CompressionFields",
    "CountSketch",
    "Fp16Codec",
    "MetaValue",
    "NoneCodec",
    "Payload",
    "SketchCodec",
    "StochasticQuantizer",
    "bytes_ratio",
    "error_feedback_step",
    "fp32_adapter_bytes",
    "from_records",
    "layout_digest",
    "payload_bytes",
    "to_records",
]
