"""Generated command-line input (Hypothesis, a bounded number of examples, fixed seed): every
value either builds a valid configuration or is refused with one line naming the setting; no
traceback, no other exception type, nothing written before the inputs are validated."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cli import main as cli
from coordinator.config import ConfigError, RunConfig, key_of

KEYS = RunConfig.keys()

# Values as TOML, Flower's run_config or the command line give them, and some that none should.
TRICKY_TEXT = [
    "", " ", "0", "-1", "1", "2", "3", "0.5", "1e-5", "1e309", "-1e309", "nan", "inf", "-inf",
    "true", "false", "yes", "None", "9" * 30, "-" + "9" * 30, "0x10", "1_000", "q_proj",
    "q_proj,,v_proj", ",", "nf4", "int8", "none", "client", "sample", "rdp", "pld", "stop",
    "continue", "masked-input", "\ufeff1", "１", "1\x00",
]  # fmt: skip
values = st.one_of(
    st.sampled_from(TRICKY_TEXT),
    st.text(max_size=12),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=4)), max_size=3),
)
mappings = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.sampled_from(["junk", "lora", "rounds ", "Rounds"])),
    values,
    max_size=8,
)


def _numbers(cfg: RunConfig) -> list[tuple[str, Any]]:
    flat = cfg.to_mapping()
    return [(k, v) for k, v in flat.items() if isinstance(v, int | float) and v is not True]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(mappings)
def test_run_config_from_any_mapping_is_valid_or_names_the_key(values: dict[str, Any]) -> None:
    try:
        cfg = RunConfig.from_mapping(values)
    except ConfigError as exc:
        event("refused")
        key = str(exc).split(":", 1)[0]
        assert key in KEYS, f"error does not start with a setting name: {exc}"
        assert "\n" not in str(exc)
        return
    event("accepted")
    # Accepted: every number is finite and fits the wire (Flower's ConfigRecord is int64/double),
    # and the configuration round-trips through its flat form and builds its instructions.
    for key, value in _numbers(cfg):
        assert math.isfinite(value), key
        if isinstance(value, int):
            assert -(2**63) <= value < 2**63, key
    assert cfg.seed >= 0
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    cfg.train_instruction(1)
    cfg.eval_instruction(0)


# ------------------------------------------------------------------------ the argparse layer

_FLAGS = [
    (f"--{key_of(f.name)}", RunConfig.types()[f.name] is bool)
    for f in RunConfig.options()
    if f.metadata["cli"] and key_of(f.name) not in ("output-dir", "cache-dir")
]
_OPTIONS = [flag for flag, switch in _FLAGS if not switch]
_OPTIONS += ["--data", "--partition", "--num-clients", "--cpus-per-client", "--lr"]
_SWITCHES = ["--resume"] + [flag for flag, switch in _FLAGS if switch]
arg_text = st.one_of(st.sampled_from(TRICKY_TEXT), st.text(max_size=10))
argvs = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(_OPTIONS), arg_text).map(list),
        st.sampled_from(_SWITCHES).map(lambda s: [s]),
    ),
    max_size=6,
).map(lambda parts: [a for p in parts for a in p])


class _Reached(RuntimeError):
    """Raised instead of starting the simulation: every command-line check passed."""

    exit_code = 99


@pytest.fixture()
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    import simulations.runner

    def reached(*_a: Any, **_k: Any) -> Path:
        raise _Reached("reached the simulation")

    monkeypatch.setattr(simulations.runner, "simulate", reached)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(argv=argvs)
def test_simulate_command_line_is_refused_in_one_line_or_accepted(
    argv: list[str], tmp_path: Path, no_simulation: None
) -> None:
    out = tmp_path / "never-written"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(["simulate", *argv, "--output-dir", str(out)])
        except SystemExit as exc:  # argparse: usage line and "error: ..."
            assert exc.code == 2
            assert "fedtune simulate: error:" in err.getvalue()
            code = None
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    event(f"exit {code if code is not None else 'argparse'}")
    if code is not None:
        assert code in (2, 99), (argv, lines)
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("fedtune simulate: error: "), lines
    assert "Traceback" not in err.getvalue()
    assert not out.exists(), "the command line wrote before its inputs were validated"


def test_a_valid_command_line_reaches_the_simulation(tmp_path: Path, no_simulation: None) -> None:
    """The property above is not vacuous: good values pass every command-line check."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["simulate", "--rounds", "2", "--lr", "0.01", "--partition", "iid",
                         "--num-clients", "4", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert code == 99, err.getvalue()
