"""The option table: RunConfig's fields are the one definition the CLI flags, the Flower app
config and the wire instructions derive from."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from cli.main import build_parser
from coordinator.config import STRATEGY_WIRE_FIELDS, ConfigError, RunConfig, key_of
from protocol.messages import TrainInstruction

ROOT = Path(__file__).resolve().parents[3]


def test_flower_app_config_in_pyproject_equals_the_option_table() -> None:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig().to_mapping()


def test_every_option_has_help_and_a_flag_with_its_key() -> None:
    parser = build_parser()
    sim = parser._subparsers._group_actions[0].choices["simulate"]  # type: ignore[union-attr]
    flags = {s for a in sim._actions for s in a.option_strings}
    for f in RunConfig.options():
        assert f.metadata["help"], f.name
        if f.metadata["cli"]:
            assert f"--{key_of(f.name)}" in flags, f.name
    assert "--lr" in flags  # an alias, declared on the field


def test_flags_parse_to_the_same_config_as_keys() -> None:
    args = build_parser().parse_args(
        ["simulate", "--strategy", "fedadam", "--beta2", "0.9", "--lr", "0.01", "--secagg"]
    )
    from cli.options import run_overrides

    cfg = RunConfig.from_mapping(run_overrides(args))
    assert (cfg.strategy, cfg.beta2, cfg.learning_rate, cfg.secagg) == ("fedadam", 0.9, 0.01, True)
    assert cfg == RunConfig.from_mapping(cfg.to_mapping())


def test_wire_instruction_defaults_agree_with_the_options() -> None:
    """A field of the train instruction named like a run option takes its value from it (and
    its default is the option's default, so a client that gets no value does the same)."""
    defaults = RunConfig()
    instr = defaults.train_instruction(1)
    options = {f.name for f in RunConfig.options()} - set(STRATEGY_WIRE_FIELDS)
    shared = [f for f in dataclasses.fields(TrainInstruction) if f.name in options]
    assert {f.name for f in shared} >= {"local_steps", "batch_size", "learning_rate", "seed"}
    for f in shared:
        assert getattr(instr, f.name) == getattr(defaults, f.name), f.name
        if f.default is not dataclasses.MISSING:
            assert f.default == getattr(defaults, f.name), f.name
    assert instr.lora == defaults.lora
    # The strategy's fields: FedProx's mu reaches clients only under fedprox.
    from coordinator.strategies import Strategy

    for name, mu in (("fedavg", 0.0), ("fedprox", defaults.proximal_mu)):
        cfg = RunConfig.from_mapping({"strategy": name})
        strategy = Strategy.create(cfg.strategy_settings(), 4, 2)
        assert strategy.instruction(cfg.train_instruction(1)).proximal_mu == mu


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strategy": "fedsgd"}, "strategy: 'fedsgd' is not one of fedavg, fedavgm"),
        ({"server-learning-rate": -1}, "server-learning-rate: must be >= 0"),
        ({"beta1": 1.0}, "beta1: must be in [0, 1)"),
        ({"server-momentum": -0.1}, "server-momentum: must be in [0, 1)"),
        ({"tau": 0}, "tau: must be > 0"),
        ({"proximal-mu": -0.5}, "proximal-mu: must be >= 0"),
        (
            {"strategy": "scaffold", "dp": "sample", "noise-multiplier": 1.0},
            "strategy: scaffold's control variates are built from the clients' non-private",
        ),
        (
            {"compute-dtype": "bf16", "dp": "sample", "noise-multiplier": 1.0},
            "compute-dtype: bf16 does not compose with --dp sample",
        ),
        ({"compute-dtype": "fp16"}, "compute-dtype: 'fp16' is not one of fp32, bf16, auto"),
        ({"lora-rank": 0}, "lora-rank: must be >= 1"),
        ({"logit-adjustment": -1}, "logit-adjustment: must be >= 0"),
        (
            {"logit-adjustment": 1, "dp": "sample", "noise-multiplier": 1.0},
            "logit-adjustment: a client's prior is counted over all its rows, which DP-SGD's",
        ),
        ({"lora-targets": "q_proj,,v_proj"}, "lora-targets: empty module name"),
    ],
)
def test_refused_combinations_say_why(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(
    "values",
    [
        {"strategy": s, **extra}
        for s in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold")
        for extra in ({}, {"secagg": True}, {"dp": "client", "noise-multiplier": 0.5})
    ]
    + [{"strategy": "fedprox", "dp": "sample", "noise-multiplier": 1.0}],
)
def test_combinations_that_can_work_are_accepted(values: dict[str, object]) -> None:
    cfg = RunConfig.from_mapping(values)
    assert cfg.strategy == values["strategy"]
