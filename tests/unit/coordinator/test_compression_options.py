"""--compress, --client-ranks and their company: what is refused before training, with the one-line
reason, through the CLI's own path (flags -> option table -> RunConfig); the wire form of a
compressed update and global adapter; what a compressed reply that does not match is told."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from cli.main import build_parser, main
from cli.options import run_overrides
from coordinator.config import ConfigError, RunConfig
from protocol import keys
from protocol.adapter import AdapterSpec
from protocol.codecs import CompressionConfig, StochasticQuantizer
from protocol.errors import ProtocolError, UpdateRejected
from protocol.messages import (
    ClientUpdate,
    LoraSpec,
    TrainInstruction,
    decode_train_instruction,
    decode_update,
    encode_train_instruction,
    encode_update,
)

ADAPTER = {
    "m.q_proj.lora_A.weight": np.random.default_rng(0).normal(0, 0.1, (4, 40)).astype(np.float32),
    "m.q_proj.lora_B.weight": np.random.default_rng(1).normal(0, 0.1, (30, 4)).astype(np.float32),
}


def from_flags(*flags: str) -> RunConfig:
    return RunConfig.from_mapping(run_overrides(build_parser().parse_args(["simulate", *flags])))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compress", "int8", "--secagg"], "compress: int8 does not compose with --secagg"),
        (["--compress", "fp16", "--secagg"], "compress: fp16 does not compose with --secagg"),
        (
            ["--compress", "int4", "--error-feedback", "--secagg"],
            "error-feedback: plaintext mode only",
        ),
        (["--error-feedback"], "error-feedback: only for fp16, int8, int4"),
        (["--compress", "sketch", "--error-feedback"], "error-feedback: only for fp16"),
        (["--compress", "zip"], "compress: must be one of none|fp16|int8|int4|sketch"),
        (["--compress-down", "sketch"], "compress-down: must be one of none | fp16"),
        (["--sketch-ratio", "0"], "sketch-ratio: must be in (0, 1]"),
        (["--compress-block-size", "-1"], "compress-block-size: must be >= 0"),
        (["--client-ranks", "4,8,16"], "client-ranks: the largest rank 16 must equal lora-rank 8"),
        (["--client-ranks", "4,x"], "client-ranks: expected comma-separated integers"),
        (["--client-ranks", "0,8"], "client-ranks: every rank must be >= 1"),
        (
            ["--client-ranks", "4,8", "--dp", "client", "--noise-multiplier", "1"],
            "client-ranks: mixed ranks divide each rank component",
        ),
        (["--client-ranks", "4,8", "--aggregator", "median"], "client-ranks: 'median' is not"),
        (["--client-ranks", "4,8", "--ffa-lora"], "client-ranks: FFA-LoRA freezes A"),
        (["--client-ranks", "4,8", "--strategy", "scaffold"], "client-ranks: scaffold's control"),
        (
            ["--rank-aggregation", "flexlora", "--secagg"],
            "rank-aggregation: flexlora averages the clients' products",
        ),
        (
            ["--rank-aggregation", "flexlora", "--dp", "client", "--noise-multiplier", "1"],
            "rank-aggregation: flexlora is not a clipped sum",
        ),
        (["--rank-aggregation", "svd"], "rank-aggregation: must be one of mean | flexlora"),
        (["--secagg-ring-bits", "16"], "secagg-ring-bits: sizes the secure-aggregation ring"),
        (
            ["--secagg", "--secagg-ring-bits", "16"],
            "secagg-weight-cap: 65536 x 3 clients per round does not fit a 16-bit ring; use "
            "--secagg-weight-cap 10922",
        ),
        (
            ["--secagg", "--secagg-ring-bits", "16", "--secagg-precision", "0.001"],
            "secagg-ring-bits: give either secagg-ring-bits or secagg-precision",
        ),
        (["--secagg", "--secagg-ring-bits", "40"], "secagg-ring-bits: must be 0 (automatic)"),
    ],
)
def test_refused_before_training_with_the_reason(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_flags(*flags)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_cli_prints_the_reason_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--compress", "int4", "--secagg", "--data", "builtin:chatterbot"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert any("compress: int4 does not compose with --secagg" in line for line in err), err


def test_what_composes_is_accepted() -> None:
    for flags in (
        ["--compress", "sketch", "--secagg"],
        ["--compress", "sketch", "--secagg", "--dp", "client", "--noise-multiplier", "1"],
        ["--compress", "int4", "--error-feedback", "--dp", "client", "--noise-multiplier", "1"],
        ["--compress", "int8", "--dp", "sample", "--noise-multiplier", "1"],
        ["--client-ranks", "4,8", "--lora-rank", "8", "--secagg"],
        ["--client-ranks", "4,8", "--lora-rank", "8", "--rank-aggregation", "flexlora"],
        ["--compress-down", "int4", "--compress-block-size", "64"],
        [
            "--compress",
            "sketch",
            "--secagg",
            "--secagg-ring-bits",
            "16",
            "--secagg-weight-cap",
            "4096",
        ],
    ):
        cfg = from_flags(*flags)
        assert cfg.train_instruction(1).compress == cfg.compress


def test_the_run_and_its_instruction_read_the_same_compression_settings() -> None:
    cfg = from_flags(
        "--compress", "int4", "--compress-block-size", "32", "--sketch-ratio", "0.5",
        "--sketch-rows", "3", "--error-feedback",
    )  # fmt: skip
    want = CompressionConfig(
        "int4", block_size=32, sketch_ratio=0.5, sketch_rows=3, error_feedback=True
    )
    assert cfg.compression() == want
    assert cfg.train_instruction(1).compression() == want


def test_a_compressed_update_round_trips_and_a_mismatch_is_rejected_with_the_reason() -> None:
    spec = AdapterSpec.of(ADAPTER)
    int8 = CompressionConfig("int8", block_size=16).build()
    update = ClientUpdate(ADAPTER, 12, {"train-loss": 1.0})
    payload = int8.encode(ADAPTER, np.random.default_rng(0))
    content = encode_update(update, rnd=3, payload=payload)
    got = decode_update(content, spec, rnd=3, codec=int8)
    for k in ADAPTER:
        assert np.abs(got.delta[k] - ADAPTER[k]).max() <= np.abs(ADAPTER[k]).max() / 127
    with pytest.raises(UpdateRejected, match="record 'update-codec' sent, but this round has no"):
        decode_update(content, spec, rnd=3)
    plain = encode_update(update, rnd=3)
    with pytest.raises(UpdateRejected, match="record 'update-codec' is missing"):
        decode_update(plain, spec, rnd=3, codec=int8)
    other = CompressionConfig("int8", block_size=32).build()
    with pytest.raises(UpdateRejected, match="meta 'block-size' is 16, expected 32"):
        decode_update(content, spec, rnd=3, codec=other)
    int4 = StochasticQuantizer(4, 16)
    with pytest.raises(UpdateRejected, match="meta 'codec' is 'int8', expected 'int4'"):
        decode_update(content, spec, rnd=3, codec=int4)
    bloated = encode_update(update, rnd=3, payload=payload)
    bloated[keys.UPDATE_CODEC] = ConfigRecord({**dict(payload.meta), "extra": 1})
    with pytest.raises(UpdateRejected, match="unexpected meta field 'extra'"):
        decode_update(bloated, spec, rnd=3, codec=int8)


def test_a_compressed_global_adapter_round_trips_and_a_bad_layout_is_refused() -> None:
    instr = TrainInstruction(round=1, lora=LoraSpec(rank=4))
    down = StochasticQuantizer(8, 0)
    content = encode_train_instruction(instr, ADAPTER, down=down, rng=np.random.default_rng(1))
    _instr, got = decode_train_instruction(content)
    assert list(got) == list(ADAPTER)
    for k, v in ADAPTER.items():
        assert got[k].shape == v.shape and got[k].dtype == np.float32
        assert np.abs(got[k] - v).max() <= np.abs(v).max() / 127
    plain = encode_train_instruction(instr, ADAPTER)
    assert content[keys.GLOBAL_ADAPTER].count_bytes() < plain[keys.GLOBAL_ADAPTER].count_bytes() / 2
    content[keys.GLOBAL_ADAPTER_CODEC]["layout-shapes"] = [4, 40, 30]
    with pytest.raises(ProtocolError, match="layout lists are malformed"):
        decode_train_instruction(content)


def test_an_instruction_names_a_bad_codec_field() -> None:
    with pytest.raises(ValueError, match="compress: must be one of"):
        TrainInstruction(round=1, lora=LoraSpec(), compress="gzip")
    with pytest.raises(ValueError, match=r"global_rank: must be 0 or >= lora\.rank 8"):
        TrainInstruction(round=1, lora=LoraSpec(), global_rank=4)


def test_the_default_norm_bound_makes_room_for_a_sketch_decode() -> None:
    assert CompressionConfig("int4").norm_slack == 1.0
    assert CompressionConfig("sketch", sketch_ratio=0.25).norm_slack == pytest.approx(
        2 * np.sqrt(5)
    )
