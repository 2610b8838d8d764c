"""Update codecs: round-trip bounds, unbiasedness, sketch linearity, the secure-aggregation ring,
validation of received payloads, measured bytes and error feedback across rounds and restarts."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from client.error_feedback import (
    ResidualError,
    encode_delta,
    load_residual,
    residual_path,
    save_residual,
)
from privacy.secagg.encoding import decode_sum, plan_encoding, quantize, required_bits, to_ring
from privacy.secagg.local import run_round
from protocol.adapter import AdapterSpec
from protocol.codecs import (
    CodecError,
    CompressionConfig,
    CountSketch,
    Fp16Codec,
    NoneCodec,
    Payload,
    SketchCodec,
    StochasticQuantizer,
    bytes_ratio,
    error_feedback_step,
    fp32_adapter_bytes,
    from_records,
    payload_bytes,
    to_records,
)
from protocol.codecs.quantized import pack_int4, segment_lengths
from protocol.errors import UpdateRejected

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
A1 = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
B1 = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"


def delta(seed: int = 0) -> dict[str, np.ndarray]:
    """A small LoRA delta whose tensors differ in scale (A ~ 1e-2, B ~ 1e-4); odd sizes."""
    rng = np.random.default_rng(seed)
    return {
        A0: rng.normal(0, 1e-2, (4, 33)).astype(np.float32),
        B0: rng.normal(0, 1e-4, (33, 4)).astype(np.float32),
        A1: rng.normal(0, 1e-2, (4, 33)).astype(np.float32),
        B1: rng.normal(0, 1e-4, (9, 4)).astype(np.float32),
    }


def wire(payload: Payload) -> Payload:
    """What the network does: records deflated to bytes and inflated again."""
    arrays, meta = to_records(payload)
    copy = ArrayRecord(
        {
            k: Array(dtype=v.dtype, shape=v.shape, stype=v.stype, data=bytes(v.data))
            for k, v in arrays.items()
        }
    )
    return from_records(copy, ConfigRecord(dict(meta)), what="update")


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.astype(np.float64).ravel() for v in arrays.values()])


QUANTIZERS = [
    StochasticQuantizer(8),
    StochasticQuantizer(8, 16),
    StochasticQuantizer(4),
    StochasticQuantizer(4, 16),
    StochasticQuantizer(4, 7),
]


# ------------------------------------------------------------------------------ none and fp16


def test_none_is_exact_and_keeps_the_tensor_names() -> None:
    d = delta()
    payload = wire(NoneCodec().encode(d, np.random.default_rng(0)))
    assert list(payload.arrays) == list(d)
    out = NoneCodec().decode(payload, AdapterSpec.of(d))
    for k in d:
        np.testing.assert_array_equal(out[k], d[k])


def test_none_bytes_are_the_fp32_baseline_plus_its_codec_name() -> None:
    d = delta()
    payload = NoneCodec().encode(d, np.random.default_rng(0))
    # ConfigRecord counts its key and the string's length: "codec" + "none".
    assert payload_bytes(payload) == fp32_adapter_bytes(AdapterSpec.of(d)) + len("codec") + 4


def test_fp16_round_trip_within_half_precision() -> None:
    d = delta()
    d[A0][0, :3] = [1e-7, -3e-6, 60000.0]  # subnormal, small normal, near the top of the range
    out = Fp16Codec().decode(
        wire(Fp16Codec().encode(d, np.random.default_rng(0))), AdapterSpec.of(d)
    )
    x, y = flat(d), flat(out)
    assert np.all(np.abs(y - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))
    assert all(out[k].dtype == np.float32 and out[k].shape == d[k].shape for k in d)


def test_fp16_refuses_values_outside_its_range() -> None:
    d = delta()
    d[B1][0, 0] = 70000.0
    with pytest.raises(CodecError, match="exceeds the fp16 range"):
        Fp16Codec().encode(d, np.random.default_rng(0))


# ------------------------------------------------------------------------------ int8 / int4


def expected_scales(d: dict[str, np.ndarray], levels: int, block: int) -> np.ndarray:
    """Per-value step s = max|x| / L of its segment, computed independently of the codec."""
    out = []
    for v in d.values():
        x = np.abs(v.astype(np.float64).ravel())
        size = x.size if block == 0 else block
        for start in range(0, x.size, size):
            seg = x[start : start + size]
            out.extend([seg.max() / levels] * seg.size)
    return np.asarray(out)


@pytest.mark.parametrize("codec", QUANTIZERS, ids=lambda c: f"{c.name}-b{c.block_size}")
def test_quantizer_round_trip_error_is_below_one_step(codec: StochasticQuantizer) -> None:
    d = delta()
    spec = AdapterSpec.of(d)
    out = codec.decode(wire(codec.encode(d, np.random.default_rng(1))), spec)
    x, y = flat(d), flat(out)
    step = expected_scales(d, codec.levels, codec.block_size)
    # |error| < one step, up to the float32 rounding of the scale and of the decoded value.
    assert np.all(np.abs(y - x) < step * (1 + 1e-6) + np.abs(x) * 2.0**-23)
    # Every decoded value is one of the two grid points around x.
    q = y / np.where(step > 0, step, 1)
    assert np.all((np.abs(q - np.floor(x / step)) < 1e-3) | (np.abs(q - np.ceil(x / step)) < 1e-3))


@pytest.mark.parametrize("codec", QUANTIZERS, ids=lambda c: f"{c.name}-b{c.block_size}")
def test_quantizer_is_unbiased_over_seeded_draws(codec: StochasticQuantizer) -> None:
    d = delta(3)
    spec = AdapterSpec.of(d)
    draws = 2000
    total = np.zeros(spec.numel)
    for i in range(draws):
        total += flat(codec.decode(codec.encode(d, np.random.default_rng(i)), spec))
    x = flat(d)
    # the codec's own (float32, rounded-up) scales: they do not depend on the generator
    scales = codec.encode(d, np.random.default_rng(0)).arrays["scale"].astype(np.float64)
    step = np.repeat(scales, segment_lengths(spec, codec.block_size))
    frac = x / step - np.floor(x / step)
    sd = step * np.sqrt(frac * (1 - frac) / draws)  # std of the mean of `draws` roundings
    err = np.abs(total / draws - x)
    slack = np.abs(x) * 2.0**-23  # float32 rounding of each decoded value
    # no coordinate biased beyond 5 sigma (~600 of them), give or take one rounding (step /
    # draws) where frac(x / s) is so small that the count of ups is far from normal
    assert np.all(err <= 5 * sd + 3 * step / draws + slack)
    # and the signed errors average out: their mean is within 5 sigma of its own spread
    signed = (total / draws - x)[sd > 0] / sd[sd > 0]
    assert abs(signed.mean()) < 5 / math.sqrt(signed.size)


def test_int4_packs_two_codes_per_byte_low_nibble_first() -> None:
    codec = StochasticQuantizer(4)
    d = {A0: np.array([[7.0, -7.0, 0.0]], dtype=np.float32)}  # scale exactly 1: no randomness
    payload = codec.encode(d, np.random.default_rng(0))
    np.testing.assert_array_equal(payload.arrays["scale"], np.array([1.0], dtype=np.float32))
    # codes q + 8 = 15, 1, 8 and an 8 pad nibble
    np.testing.assert_array_equal(payload.arrays["q"], np.array([0x1F, 0x88], dtype=np.uint8))
    out = codec.decode(payload, AdapterSpec.of(d))
    np.testing.assert_array_equal(out[A0], d[A0])


def test_int8_exact_codes_on_grid_points() -> None:
    codec = StochasticQuantizer(8)
    d = {A0: np.array([[127.0, -63.5, 0.5, 0.0]], dtype=np.float32) / 4}  # scale 0.25
    payload = codec.encode(d, np.random.default_rng(0))
    np.testing.assert_array_equal(payload.arrays["scale"], np.array([0.25], dtype=np.float32))
    q = payload.arrays["q"]
    assert q.dtype == np.int8
    assert q[0] == 127 and q[3] == 0
    assert q[1] in (-64, -63) and q[2] in (0, 1)  # -63.5 and 0.5 round either way


def test_scale_is_rounded_up_so_codes_never_exceed_the_levels() -> None:
    # 1/3 / 7 is not a float32: the stored scale must not round down below max|x| / 7.
    codec = StochasticQuantizer(4)
    d = {A0: np.full((1, 5), 1 / 3, dtype=np.float32)}
    for seed in range(50):
        payload = codec.encode(d, np.random.default_rng(seed))
        s = float(payload.arrays["scale"][0])
        assert float(d[A0].max()) <= 7 * s
        codec.decode(payload, AdapterSpec.of(d))  # codes in range


def test_per_block_segments_stay_inside_tensors() -> None:
    spec = AdapterSpec.of(delta())
    lengths = segment_lengths(spec, 16)
    assert lengths.sum() == spec.numel
    # 132 values -> 8 full blocks and one of 4; 36 -> 2 and one of 4
    assert lengths.tolist() == [16] * 8 + [4] + [16] * 8 + [4] + [16] * 8 + [4] + [16] * 2 + [4]
    assert segment_lengths(spec, 0).tolist() == [132, 132, 132, 36]


def test_all_zero_tensor_quantizes_to_zero() -> None:
    d = delta()
    d[B1][:] = 0
    for codec in QUANTIZERS:
        out = codec.decode(codec.encode(d, np.random.default_rng(0)), AdapterSpec.of(d))
        assert not out[B1].any()


# ------------------------------------------------------------------------------ bytes


def npy_bytes(arr: np.ndarray) -> int:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return len(buf.getvalue())


@pytest.mark.parametrize(
    "config",
    [
        CompressionConfig("fp16"),
        CompressionConfig("int8"),
        CompressionConfig("int4", block_size=16),
        CompressionConfig("sketch"),
    ],
    ids=lambda c: c.codec,
)
def test_payload_bytes_are_what_flower_serialises(config: CompressionConfig) -> None:
    d = delta()
    payload = config.build(seed=5, rnd=1).encode(d, np.random.default_rng(0))
    arrays = sum(npy_bytes(v) + len(k) for k, v in payload.arrays.items())
    meta = sum(
        len(k) + (len(v) if isinstance(v, str) else 1 if isinstance(v, bool) else 8)
        for k, v in payload.meta.items()
    )
    assert payload_bytes(payload) == arrays + meta
    fp32 = sum(npy_bytes(v) + len(k) for k, v in d.items())
    assert fp32_adapter_bytes(AdapterSpec.of(d)) == fp32
    assert bytes_ratio(payload, AdapterSpec.of(d)) == pytest.approx((arrays + meta) / fp32)


def test_int4_per_tensor_payload_is_about_an_eighth_of_fp32_on_a_large_adapter() -> None:
    rng = np.random.default_rng(0)
    d = {
        A0: rng.normal(size=(8, 576)).astype(np.float32),
        B0: rng.normal(size=(576, 8)).astype(np.float32),
    }
    spec = AdapterSpec.of(d)
    for codec, low, high in (
        (StochasticQuantizer(4), 0.125, 0.14),
        (StochasticQuantizer(8), 0.25, 0.27),
    ):
        assert low < bytes_ratio(codec.encode(d, rng), spec) < high


# ------------------------------------------------------------------------------ validation


def tamper(
    payload: Payload, *, arrays: dict[str, np.ndarray] | None = None, **meta: object
) -> Payload:
    return Payload({**payload.arrays, **(arrays or {})}, {**payload.meta, **meta})  # type: ignore[dict-item]


def test_quantized_decode_rejects_codes_outside_the_levels() -> None:
    d = delta()
    spec = AdapterSpec.of(d)
    p8 = StochasticQuantizer(8).encode(d, np.random.default_rng(0))
    bad = p8.arrays["q"].copy()
    bad[5] = -128
    with pytest.raises(UpdateRejected, match="code -128"):
        StochasticQuantizer(8).decode(tamper(p8, arrays={"q": bad}), spec)
    p4 = StochasticQuantizer(4).encode(d, np.random.default_rng(0))
    bad4 = p4.arrays["q"].copy()
    bad4[3] &= 0xF0  # low nibble 0 = code -8
    with pytest.raises(UpdateRejected, match="nibble 0"):
        StochasticQuantizer(4).decode(tamper(p4, arrays={"q": bad4}), spec)


def test_int4_decode_rejects_a_non_zero_pad_nibble() -> None:
    d = {A0: np.ones((1, 3), dtype=np.float32)}
    payload = StochasticQuantizer(4).encode(d, np.random.default_rng(0))
    bad = payload.arrays["q"].copy()
    bad[-1] = (bad[-1] & 0x0F) | (9 << 4)
    with pytest.raises(UpdateRejected, match="padding nibble"):
        StochasticQuantizer(4).decode(tamper(payload, arrays={"q": bad}), AdapterSpec.of(d))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"arrays": {"scale": None}}, "array 'scale' is missing"),
        ({"arrays": {"extra": np.zeros(2, np.float32)}}, "unexpected array 'extra'"),
        ({"arrays": {"q": np.zeros(3, np.int8)}}, r"shape \(3,\)"),
        ({"arrays": {"q": "int16"}}, "dtype int16"),
        ({"arrays": {"scale": "nan"}}, "negative or non-finite"),
        ({"arrays": {"scale": "neg"}}, "negative or non-finite"),
        ({"meta": {"codec": "int4"}}, "meta 'codec' is 'int4'"),
        ({"meta": {"layout": "0" * 16}}, "meta 'layout'"),
        ({"meta": {"block-size": 16}}, "meta 'block-size' is 16"),
        ({"meta": {"stray": 1}}, "unexpected meta field 'stray'"),
    ],
)
def test_int8_decode_rejects_malformed_payloads(
    change: dict[str, dict[str, object]], reason: str
) -> None:
    d = delta()
    payload = StochasticQuantizer(8).encode(d, np.random.default_rng(0))
    arrays = dict(payload.arrays)
    for k, v in change.get("arrays", {}).items():
        if v is None:
            del arrays[k]
        elif isinstance(v, np.ndarray):
            arrays[k] = v
        elif v == "int16":
            arrays[k] = arrays[k].astype(np.int16)
        elif v == "nan":
            arrays[k] = arrays[k].copy()
            arrays[k][0] = np.nan
        else:  # "neg"
            arrays[k] = -arrays[k]
    meta = {**payload.meta, **change.get("meta", {})}
    with pytest.raises(UpdateRejected, match=reason):
        StochasticQuantizer(8).decode(Payload(arrays, meta), AdapterSpec.of(d))  # type: ignore[arg-type]


def test_decode_rejects_a_payload_for_another_adapter_layout() -> None:
    d = delta()
    other = {A0: d[A0], B0: d[B0], B1: d[B1], A1: d[A1]}  # same tensors, other order
    for codec in (Fp16Codec(), StochasticQuantizer(4, 16), SketchCodec(seed=1)):
        payload = codec.encode(other, np.random.default_rng(0))
        with pytest.raises(UpdateRejected, match="meta 'layout'"):
            codec.decode(payload, AdapterSpec.of(d))


def test_none_and_fp16_reject_non_finite_and_misshapen_values() -> None:
    d = delta()
    spec = AdapterSpec.of(d)
    p = NoneCodec().encode(d, np.random.default_rng(0))
    nan = p.arrays[A0].copy()
    nan[0, 0] = np.nan
    with pytest.raises(UpdateRejected, match="NaN or infinite"):
        NoneCodec().decode(tamper(p, arrays={A0: nan}), spec)
    with pytest.raises(UpdateRejected, match="has shape"):
        NoneCodec().decode(tamper(p, arrays={A0: p.arrays[A0].T.copy()}), spec)
    q = Fp16Codec().encode(d, np.random.default_rng(0))
    inf = q.arrays["values"].copy()
    inf[0] = np.inf
    with pytest.raises(UpdateRejected, match="NaN or infinite"):
        Fp16Codec().decode(tamper(q, arrays={"values": inf}), spec)


def test_sketch_decode_rejects_another_seed_or_round() -> None:
    d = delta()
    payload = SketchCodec(seed=1, round=2).encode(d, np.random.default_rng(0))
    with pytest.raises(UpdateRejected, match="meta 'seed'"):
        SketchCodec(seed=9, round=2).decode(payload, AdapterSpec.of(d))
    with pytest.raises(UpdateRejected, match="meta 'round'"):
        SketchCodec(seed=1, round=3).decode(payload, AdapterSpec.of(d))


def test_from_records_refuses_list_meta() -> None:
    arrays, _ = to_records(Fp16Codec().encode(delta(), np.random.default_rng(0)))
    with pytest.raises(UpdateRejected, match="meta 'codec' must be a scalar"):
        from_records(arrays, ConfigRecord({"codec": ["fp16"]}), what="update")


def test_encoders_refuse_non_finite_input_and_configs_name_the_field() -> None:
    d = delta()
    d[A1][1, 1] = np.nan
    for codec in (NoneCodec(), Fp16Codec(), StochasticQuantizer(8), SketchCodec()):
        with pytest.raises(CodecError, match="NaN or infinite"):
            codec.encode(d, np.random.default_rng(0))
    with pytest.raises(CodecError, match="compress: must be one of"):
        CompressionConfig("int2")
    with pytest.raises(CodecError, match="compress-block-size"):
        CompressionConfig("int8", block_size=-1)
    with pytest.raises(CodecError, match="sketch-ratio"):
        CompressionConfig("sketch", sketch_ratio=1.5)
    with pytest.raises(CodecError, match="error-feedback: only for"):
        CompressionConfig("sketch", error_feedback=True)


def test_only_linear_codecs_pass_the_secagg_check() -> None:
    for name in ("none", "sketch"):
        CompressionConfig(name).check_secagg(True)
        assert CompressionConfig(name).build().linear
    for name in ("fp16", "int8", "int4"):
        CompressionConfig(name).check_secagg(False)
        assert not CompressionConfig(name).build().linear
        with pytest.raises(CodecError, match=f"compress: {name} does not compose with --secagg"):
            CompressionConfig(name).check_secagg(True)
    with pytest.raises(CodecError, match="error-feedback: plaintext mode only"):
        CompressionConfig("int8", error_feedback=True).check_secagg(True)


# ------------------------------------------------------------------------------ sketch


def test_sketch_of_a_one_hot_vector_decodes_its_value_exactly() -> None:
    op = CountSketch((50, 30), ratio=0.2, rows=3, seed=4)
    x = np.zeros(80)
    x[57] = 2.5
    xhat = op.transpose_mean(op.apply(x))
    assert xhat[57] == 2.5  # every row: s^2 * 2.5
    assert not xhat[:50].any()  # another tensor's cells: no leak across tensors
    assert set(np.abs(xhat[50:][xhat[50:] != 0]).round(9)) <= {
        round(2.5 / 3, 9),
        round(5 / 3, 9),
        2.5,
    }


def test_sketch_error_is_within_its_collision_bound() -> None:
    d = delta()
    codec = SketchCodec(ratio=0.25, rows=2, seed=7)
    spec = AdapterSpec.of(d)
    x = flat(d)
    xhat = flat(codec.decode(wire(codec.encode(d, np.random.default_rng(0))), spec))
    cells, _ = codec.operator(spec).hashes()
    bound = np.zeros_like(x)
    for r in range(cells.shape[0]):
        cell_abs = np.bincount(cells[r], weights=np.abs(x), minlength=cells.max() + 1)
        bound += (cell_abs[cells[r]] - np.abs(x)) / cells.shape[0]
    # float32 cells add a relative rounding of ~2^-24 of the cell's mass
    assert np.all(np.abs(xhat - x) <= bound * (1 + 1e-6) + 1e-12)


def test_sketch_is_linear_decode_of_sum_equals_sum_of_decodes() -> None:
    codec = SketchCodec(ratio=0.3, rows=2, seed=11, round=4)
    spec = AdapterSpec.of(delta())
    ds = [delta(s) for s in range(5)]
    w = np.array([3.0, 1.0, 7.0, 2.0, 5.0])
    summed = sum(wi * codec.sketch(di) for wi, di in zip(w, ds, strict=True))
    via_sum = flat(codec.decode_vector(np.asarray(summed), spec))
    sum_of = sum(
        wi * flat(codec.decode_vector(codec.sketch(di), spec)) for wi, di in zip(w, ds, strict=True)
    )
    scale = np.abs(np.asarray(sum_of)).max()
    # float32 output of decode: within a few float32 ulps of the largest value
    assert np.abs(via_sum - np.asarray(sum_of)).max() <= 4 * 2.0**-24 * scale
    # and through float32 payloads on the wire: sum the received cells, decode once
    cells = sum(
        wi * wire(codec.encode(di, np.random.default_rng(0))).arrays["sketch"].astype(np.float64)
        for wi, di in zip(w, ds, strict=True)
    )
    assert (
        np.abs(flat(codec.decode_vector(np.asarray(cells), spec)) - via_sum).max() <= 1e-5 * scale
    )


def test_sketch_is_unbiased_over_seeds_with_the_predicted_variance() -> None:
    d = delta(2)
    spec = AdapterSpec.of(d)
    x = flat(d)
    draws = 2000
    total = np.zeros_like(x)
    sq = 0.0
    for seed in range(draws):
        xhat = flat(
            SketchCodec(ratio=0.25, rows=1, seed=seed).decode_vector(
                SketchCodec(ratio=0.25, rows=1, seed=seed).sketch(d), spec
            )
        )
        total += xhat
        sq += float(((xhat - x) ** 2).sum())
    # per-tensor predicted variance (||x_t||^2 - x_i^2) / w_t
    op = SketchCodec(ratio=0.25).operator(spec)
    var = np.concatenate(
        [
            (np.sum(v.astype(np.float64) ** 2) - v.astype(np.float64).ravel() ** 2) / w
            for v, w in zip(d.values(), op.widths, strict=True)
        ]
    )
    z = np.abs(total / draws - x) / np.sqrt(var / draws)
    assert z.max() < 5.0
    assert sq / draws == pytest.approx(var.sum(), rel=0.1)


def test_sketch_bytes_follow_the_ratio() -> None:
    d = delta()
    spec = AdapterSpec.of(d)
    op = SketchCodec(ratio=0.25).operator(spec)
    assert op.widths.tolist() == [33, 33, 33, 9]  # ceil(0.25 * n_t)
    payload = SketchCodec(ratio=0.25).encode(d, np.random.default_rng(0))
    assert payload.arrays["sketch"].shape == (108,)
    assert bytes_ratio(payload, spec) < 0.5  # tiny tensors: headers weigh; large ones ~ ratio


def test_sketch_through_secagg_ring_equals_plaintext_sketch_within_encoding_error() -> None:
    """Clients mask their sketches (fixed point, privacy.secagg.encoding) in the smallest ring
    that cannot wrap; the real SecAgg+ protocol sums them; the coordinator decodes the sum."""
    codec = SketchCodec(ratio=0.25, rows=1, seed=3, round=1)
    ds = [delta(s) for s in range(4)]
    weights = [120, 40, 300, 75]
    spec = AdapterSpec.of(ds[0])
    clip = 0.05  # per value; the deltas are ~1e-2, so nothing is clipped
    assert all(np.abs(flat(d)).max() < clip for d in ds)
    ring_clip = codec.ring_clip(spec, clip)
    assert ring_clip == clip * codec.operator(spec).max_load
    # a step of ring_clip / 8000: a sum of 4 clients stays within 32000 < 2^15
    plan = plan_encoding(len(ds), ring_clip, precision=ring_clip / 8000, weight_cap=512)
    # the smallest ring: one bit fewer could wrap a sum of 4 in-range vectors
    assert plan.ring_bits == required_bits(4, plan.level, 512) == (4 * plan.level).bit_length() + 1
    assert plan.ring_bits == 16 and plan.dtype == np.uint16
    rng = np.random.default_rng(9)
    vectors = [codec.ring_input(d, clip) for d in ds]
    assert all(np.abs(v).max() <= ring_clip for v in vectors)
    encoded = {
        i + 1: quantize(v, w, plan, rng)
        for i, (v, w) in enumerate(zip(vectors, weights, strict=True))
    }
    result = run_round(encoded, plan)
    assert result.contributors == (1, 2, 3, 4)
    decoded = decode_sum(result.ring_sum, plan, len(result.contributors))
    assert decoded.total_weight == sum(weights)
    secure = flat(
        codec.decode_vector(decoded.weighted_sum * plan.weight_cap / decoded.total_weight, spec)
    )
    plain_mean = sum(w * codec.sketch(d) for w, d in zip(weights, ds, strict=True)) / sum(weights)
    plain = flat(codec.decode_vector(np.asarray(plain_mean), spec))
    # each client's cell is off by < one step after rounding; the weighted mean by < 4 steps *
    # cap / total weight; decoding averages rows of such cells
    bound = len(ds) * plan.step * plan.weight_cap / sum(weights)
    assert np.abs(secure - plain).max() <= bound
    assert np.abs(secure - plain).max() > 0  # the ring path really went through rounding
    # masked upload: 2-byte ring elements for ~1/4 of the values -> ~1/8 of fp32
    masked_bytes = (codec.operator(spec).size + 1) * plan.dtype.itemsize
    assert masked_bytes / (4 * spec.numel) < 0.14
    # the ring input is the same vector to_ring carries (smallest wire dtype for the ring)
    assert to_ring(encoded[1], plan.ring_bits).dtype == np.uint16


def test_sketch_ring_clip_uses_the_l2_bound_when_it_is_lower() -> None:
    spec = AdapterSpec.of(delta())
    codec = SketchCodec(ratio=0.1, seed=2)
    load = codec.operator(spec).max_load
    assert load > 4
    assert codec.ring_clip(spec, clip=1.0) == load
    assert codec.ring_clip(spec, clip=1.0, l2_clip=1.0) == pytest.approx(math.sqrt(load))
    d = delta()
    norm = float(np.linalg.norm(flat(d)))
    v = codec.ring_input(d, clip=1.0)
    assert np.abs(v).max() <= codec.ring_clip(spec, clip=1.0, l2_clip=norm) * (1 + 1e-12)


# ------------------------------------------------------------------------------ error feedback


def test_error_feedback_residual_is_exactly_what_was_not_sent() -> None:
    codec = StochasticQuantizer(4)
    d = delta()
    spec = AdapterSpec.of(d)
    residual = {k: np.full_like(v, 1e-3) for k, v in d.items()}
    payload, new = error_feedback_step(codec, d, residual, np.random.default_rng(0))
    sent = codec.decode(payload, spec)
    for k in d:
        want = d[k].astype(np.float64) + 1e-3 - sent[k]
        np.testing.assert_allclose(new[k], want.astype(np.float32), rtol=0, atol=1e-9)


def test_error_feedback_sends_the_running_sum_with_bounded_error() -> None:
    """Over T rounds, sum of sent = sum of deltas - last residual: the error does not grow."""
    codec = StochasticQuantizer(4)
    spec = AdapterSpec.of(delta())
    rng = np.random.default_rng(1)
    residual = None
    sent_total = np.zeros(spec.numel)
    true_total = np.zeros(spec.numel)
    for t in range(30):
        d = delta(100 + t)
        payload, residual = error_feedback_step(codec, d, residual, rng)
        sent_total += flat(codec.decode(payload, spec))
        true_total += flat(d)
    assert residual is not None
    np.testing.assert_allclose(sent_total, true_total - flat(residual), atol=1e-7)
    # without feedback the error of the sum grows like sqrt(T) steps; with it, one residual
    assert np.abs(flat(residual)).max() < 2 * np.abs(flat(delta(0))).max()


def test_error_feedback_store_survives_a_restart(tmp_path: Path) -> None:
    codec = StochasticQuantizer(8, 16)
    spec = AdapterSpec.of(delta())
    state = tmp_path / "client-state"
    # round 1 in one process ...
    p1 = encode_delta(codec, delta(1), np.random.default_rng(1), state_dir=state)
    on_disk = load_residual(residual_path(state), spec)
    assert on_disk is not None
    want = {
        k: (delta(1)[k].astype(np.float64) - v).astype(np.float32)
        for k, v in codec.decode(p1, spec).items()
    }
    for k in want:
        np.testing.assert_allclose(on_disk[k], want[k], atol=1e-9)
    # ... round 2 after a restart (nothing in memory): the stored residual is added first
    p2 = encode_delta(codec, delta(2), np.random.default_rng(2), state_dir=state)
    direct, expect_residual = error_feedback_step(
        codec, delta(2), on_disk, np.random.default_rng(2)
    )
    np.testing.assert_array_equal(p2.arrays["q"], direct.arrays["q"])
    after = load_residual(residual_path(state), spec)
    assert after is not None
    for k in expect_residual:
        np.testing.assert_array_equal(after[k], expect_residual[k])
    assert residual_path(state).parent.stat().st_mode & 0o777 == 0o700
    assert not [p for p in residual_path(state).parent.iterdir() if p.name.endswith(".tmp")]


def test_error_feedback_store_discards_another_layout_and_names_a_corrupt_file(
    tmp_path: Path,
) -> None:
    path = residual_path(tmp_path)
    assert load_residual(path, AdapterSpec.of(delta())) is None  # first round
    save_residual(path, {A0: np.ones((4, 33), np.float32)})
    assert load_residual(path, AdapterSpec.of(delta())) is None  # another layout
    path.write_bytes(b"not safetensors")
    with pytest.raises(ResidualError, match=str(path)):
        load_residual(path, AdapterSpec.of(delta()))


def test_without_state_dir_encode_delta_is_the_plain_codec(tmp_path: Path) -> None:
    codec = StochasticQuantizer(4)
    a = encode_delta(codec, delta(), np.random.default_rng(5))
    b = codec.encode(delta(), np.random.default_rng(5))
    np.testing.assert_array_equal(a.arrays["q"], b.arrays["q"])


def test_pack_int4_odd_count_pads_with_zero_code() -> None:
    np.testing.assert_array_equal(
        pack_int4(np.array([-7, 0, 7], np.int8)), np.array([0x81, 0x8F], np.uint8)
    )
