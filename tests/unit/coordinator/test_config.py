from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from client.model import Quantization
from coordinator.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[3]


def test_pyproject_app_config_matches_runconfig_defaults() -> None:
    """`flwr run .` reads [tool.flwr.app.config]; it must say what fedtune's defaults say."""
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_mapping()
    assert set(app_cfg) == set(defaults)
    for key, value in defaults.items():
        assert app_cfg[key] == value, key
    assert RunConfig.from_mapping(app_cfg) == RunConfig()


def test_mapping_roundtrip() -> None:
    cfg = RunConfig.from_mapping(
        {
            "rounds": "5",
            "lora-targets": "q_proj, k_proj",
            "quantization": "int8",
            "learning-rate": 0.01,
        }
    )
    assert cfg.rounds == 5
    assert cfg.lora.target_modules == ("q_proj", "k_proj")
    assert cfg.quantization is Quantization.INT8
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rounds": 0}, "rounds: must be >= 1"),
        ({"rounds": "three"}, "rounds: expected int, got 'three'"),
        ({"rounds": 2.5}, "rounds: expected int"),
        ({"quantization": "fp8"}, "quantization: 'fp8' is not one of none, int8, nf4"),
        ({"min-clients": 5, "clients-per-round": 3}, "min-clients: 5 exceeds clients-per-round 3"),
        ({"lora-rank": 0}, "lora-rank: must be >= 1"),
        ({"lora-dropout": 1.5}, "lora-dropout: must be in"),
        ({"lora-targets": "q_proj,,v_proj"}, "lora-targets: empty module name"),
        ({"heldout-fraction": 1.0}, "heldout-fraction: must be in [0, 1)"),
        ({"local-steps": 0}, "local-steps: must be >= 1"),
        ({"learning-rate": -1}, "learning-rate: must be a positive number"),
        ({"round-timeout": 0}, "round-timeout: must be > 0"),
        ({"lr-schedule": "linear"}, "lr-schedule: 'linear' is not one of constant, cosine"),
        ({"min-learning-rate": 0.01}, "min-learning-rate: must be in [0, learning-rate 0.001]"),
        ({"client-quantization": "nf4,fp4"}, "client-quantization: 'fp4' is not one of"),
        ({"client-max-memory": "1GB,lots"}, "client-max-memory: expected a size such as 3GB"),
        ({"client-max-memory": "32MB"}, "client-max-memory: 32MB is below 64 MiB"),
    ],
)
def test_bad_values_name_the_key(values: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert message in str(err.value)
