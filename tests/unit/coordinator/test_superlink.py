"""`fedtune coordinator start|run`: configuration checks, the registry sync, the run bundle."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli

from cli.main import main
from coordinator.config import RunConfig
from coordinator.submit import DEVICE_APP, SERVER_APP, build_fab, show_log_line
from coordinator.superlink import (
    ControlEndpoint,
    CoordinatorConfig,
    CoordinatorError,
    sync_registry,
)
from protocol.credentials import KeysConfig, create_keys, read_authorized_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    create_keys(KeysConfig(out, devices=("a", "b", "c")))
    return out


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "TLS needs the CA certificate"),
        ({"insecure": True}, "node authentication needs TLS: drop --insecure"),
        ({"keys": True}, "--authorized-keys is required with node authentication"),
        ({"keys": True, "authorized_keys": (Path("k"),), "fleet_address": "9092"},
         "fleet-address: expected HOST:PORT"),
    ],
)  # fmt: skip
def test_start_config_errors(kw: dict, message: str, keys: Path, tmp_path: Path) -> None:  # type: ignore[type-arg]
    if kw.pop("keys", False):
        with pytest.raises(ValueError, match=message):
            CoordinatorConfig.from_keys_dir(keys, state_dir=tmp_path, **kw)
        return
    with pytest.raises(ValueError, match=message):
        CoordinatorConfig(state_dir=tmp_path, **kw)


def test_insecure_needs_explicit_no_node_auth(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(state_dir=tmp_path, insecure=True, node_auth=False)
    assert cfg.db_path == tmp_path / "superlink.db"


@dataclass
class FakeNode:
    node_id: int
    public_key: bytes
    status: str = "registered"


@dataclass
class FakeControl:
    """Records Control API calls like Flower's ControlHttpClient would receive them."""

    nodes: list[FakeNode] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def ListNodes(self, req: Any) -> Any:
        return type("Res", (), {"nodes_info": list(self.nodes)})()

    def RegisterNode(self, req: Any) -> Any:
        self.calls.append(("register", (req.name, bytes(req.public_key))))
        self.nodes.append(FakeNode(100 + len(self.nodes), bytes(req.public_key)))

    def UnregisterNode(self, req: Any) -> Any:
        self.calls.append(("unregister", req.node_id))


def test_registry_follows_the_authorized_keys(keys: Path, tmp_path: Path) -> None:
    a, b, c = read_authorized_keys([keys / "nodes"])
    control = FakeControl(
        nodes=[
            FakeNode(1, a.pem.replace(b"\n", b"\r\n")),  # same key, other line endings
            FakeNode(2, c.pem),  # no longer listed
            FakeNode(3, b"old", status="unregistered"),  # already gone
        ]
    )
    res = sync_registry(control, [a, b])
    assert res.added == ["b"] and res.kept == ["a"] and res.removed == [2]
    assert control.calls == [("register", ("b", b.pem)), ("unregister", 2)]


def test_run_bundle_names_the_installed_apps_and_carries_the_config() -> None:
    from flwr.common.config import validate_config

    cfg = RunConfig.from_mapping({"rounds": 5, "min-clients": 1, "clients-per-round": 2,
                                  "output-dir": "/runs/r1"})  # fmt: skip
    fab = build_fab(cfg)
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        names = sorted(z.namelist())
        pyproject = tomli.loads(z.read("pyproject.toml").decode())
    assert names == [".info/CONTENT", "pyproject.toml"]  # no code travels with a run
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": DEVICE_APP}
    assert RunConfig.from_mapping(app["config"]) == cfg
    ok, errors, _ = validate_config(pyproject, check_module=True)
    assert ok, errors  # the components import from the installed fedtune


def test_log_filter_keeps_progress_and_drops_library_noise() -> None:
    assert show_log_line("07:11:07 round 1/2 train: waiting for 3 client(s)")
    assert show_log_line("07:12:20 round 2: client 68 dropped: no reply within 40s")
    assert not show_log_line("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
    assert not show_log_line("\rLoading weights: 100%|██████████| 20/20")
    assert not show_log_line("   ")


def test_run_without_a_coordinator_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["coordinator", "run", "--state-dir", str(tmp_path / "none"), "--rounds", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"fedtune coordinator run: error: no coordinator found: {tmp_path / 'none'}/"
        "coordinator.json does not exist (start one with `fedtune coordinator start`, or pass "
        "--control-address)"
    ]


def test_start_with_certificates_of_another_ca_is_one_line(
    capsys: pytest.CaptureFixture[str], keys: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    create_keys(KeysConfig(other))
    code = main(
        [
            "coordinator",
            "start",
            "--ca-cert",
            str(keys / "ca.pem"),
            "--cert",
            str(other / "coordinator.pem"),
            "--key",
            str(other / "coordinator.key"),
            "--authorized-keys",
            str(keys / "nodes"),
            "--state-dir",
            str(tmp_path / "s"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (
        f"fedtune coordinator start: error: coordinator certificate {other / 'coordinator.pem'} "
        f"is not signed by the CA in {keys / 'ca.pem'}"
    )
    assert not (tmp_path / "s").exists(), "nothing may start"


def test_endpoint_from_state_dir(tmp_path: Path) -> None:
    (tmp_path / "coordinator.json").write_text(
        '{"control_address": "127.0.0.1:9093", "root_certificates": "/k/ca.pem", "insecure": false}'
    )
    ep = ControlEndpoint.from_state_dir(tmp_path)
    assert ep == ControlEndpoint("127.0.0.1:9093", Path("/k/ca.pem"), False)
    (tmp_path / "coordinator.json").write_text("{")
    with pytest.raises(CoordinatorError, match="cannot be read"):
        ControlEndpoint.from_state_dir(tmp_path)


def test_simulation_only_option_is_refused_not_ignored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "coordinator.json").write_text(
        '{"control_address": "127.0.0.1:1", "insecure": true}'
    )
    code = main(["coordinator", "run", "--state-dir", str(tmp_path),
                 "--client-quantization", "nf4,int8"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        "fedtune coordinator run: error: client-quantization: applies to simulated fleets; in a "
        "deployment each device chooses with `fedtune client start --quantization`"
    ]
