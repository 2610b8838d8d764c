"""`fedtune client start`: device settings from flags and TOML, the node config a SuperNode gets,
and one clear error line (nothing started) for each bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import main
from client.device import (
    TOML_KEYS,
    DeviceConfig,
    SettingsError,
    add_flags,
    build_config,
    check_inputs,
    flags_given,
    node_config,
    parse_size,
    read_settings_file,
    supernode_command,
)
from client.processes import Backoff, free_port, split_address
from protocol.credentials import KeysConfig, create_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    create_keys(KeysConfig(out, devices=("pi",)))
    return out


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "notes.jsonl"
    path.write_text(
        "".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(5))
    )
    return path


@pytest.mark.parametrize(
    ("text", "size"),
    [("3GB", 3 * 2**30), ("512m", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5g", 3 * 2**29),
     ("4096", 4096), (1024, 1024), ("64 MB", 64 * 2**20)],
)  # fmt: skip
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_bad_size_names_the_setting() -> None:
    with pytest.raises(SettingsError, match="max-memory: expected a size such as 3GB"):
        parse_size("lots")


def test_toml_file_then_flags(tmp_path: Path, data: Path) -> None:
    conf = tmp_path / "client.toml"
    conf.write_text(
        'coordinator = "coord.example.org:9092"\n'
        f'data = "{data.name}"\n'
        'root-cert = "keys/ca.pem"\n'
        'key = "/etc/fedtune/pi.key"\n'
        'quantization = "int8"\n'
        'compute-dtype = "bf16"\n'
        "threads = 2\n"
        'max-memory = "3GB"\n'
        "quantize-to-fit = true\n"
        "heldout-fraction = 0\n"
    )
    got = read_settings_file(conf)
    assert got == {
        "coordinator": "coord.example.org:9092",
        "data": str(data),  # relative paths are relative to the file
        "root_cert": tmp_path / "keys" / "ca.pem",
        "key": Path("/etc/fedtune/pi.key"),
        "quantization": "int8",
        "compute_dtype": "bf16",
        "threads": 2,
        "max_memory": 3 * 2**30,
        "quantize_to_fit": True,
        "heldout_fraction": 0.0,
    }
    cfg = build_config(conf, {"threads": 4, "quantization": None, "coordinator": None})
    assert cfg.threads == 4 and cfg.quantization == "int8"
    assert cfg.coordinator == "coord.example.org:9092"


# Values that pass DeviceConfig's checks, for the settings whose type alone does not say one.
_SAMPLES = {
    "data": "/p/data.jsonl",  # (relative: relative to the TOML file)
    "coordinator": "coord.example.org:9092",
    "quantization": "int8",
    "compute-dtype": "bf16",
    "max-memory": "2GB",
    "insecure": False,  # (with root-cert: refused)
    "worker": False,
}


def test_every_device_setting_is_one_toml_key_one_flag_and_reaches_the_client(
    tmp_path: Path,
) -> None:
    """DeviceConfig is the one table: each setting read from the TOML file and given as a
    ``client start`` flag makes the same config, and the ClientApp's ones reach node_config."""
    import argparse
    import dataclasses

    values: dict[str, object] = {}
    for key, (_, kind) in TOML_KEYS.items():
        default = {str: f"{key}-x", Path: f"/p/{key}", int: 3, float: 0.5, bool: True}[kind]
        values[key] = _SAMPLES.get(key, default)
    lines, argv = [], ["--coordinator", str(values["coordinator"])]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, float) else value}")
        if key == "coordinator":
            continue
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append("--no-worker" if key == "worker" else "")
        else:
            argv += [f"--{key}", str(value)]
    conf = tmp_path / "client.toml"
    conf.write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    add_flags(parser)
    from_file = build_config(conf, {})
    from_flags = build_config(None, flags_given(parser.parse_args([a for a in argv if a])))
    assert from_file == from_flags
    changed = {
        f.name for f in dataclasses.fields(from_file) if getattr(from_file, f.name) != f.default
    }
    assert changed == {name for name, _ in TOML_KEYS.values()} - {"insecure"}
    assert from_file.max_memory == 2 * 2**30
    node = node_config(from_file, None)
    passed = {k for k in node if k not in ("data-path", "cache-dir", "state-dir", "device-name")}
    assert passed == {
        "model", "quantization", "compute-dtype", "threads", "max-memory", "quantize-to-fit",
        "device", "heldout-fraction",
    }  # fmt: skip
    assert node["max-memory"] == 2 * 2**30 and node["heldout-fraction"] == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('coordinator = "x:1"\nthreads = \n', "invalid TOML: "),
        ('coordinator = "x:1"\ncolour = "blue"\n', "unknown setting 'colour'"),
        ('coordinator = "x:1"\nthreads = "two"\n', "threads: expected int, got 'two'"),
        ('coordinator = "x:1"\ninsecure = 1\n', "insecure: expected bool, got 1"),
        ('coordinator = "x:1"\nkey = 5\n', "key: expected a path string, got 5"),
        ('coordinator = "x:1"\nmax-memory = true\n', "max-memory: expected a size, got True"),
    ],
)
def test_malformed_settings_file_names_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    conf = tmp_path / "client.toml"
    conf.write_text(text)
    with pytest.raises(SettingsError, match=rf"config {conf}: .*{message}"):
        read_settings_file(conf)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"data": "d"}, "coordinator: required"),
        ({"coordinator": "x:1"}, "data: required"),
        ({"coordinator": "nohost", "data": "d"}, "coordinator: expected HOST:PORT, got 'nohost'"),
        ({"coordinator": "x:70000", "data": "d"}, "coordinator: expected HOST:PORT"),
        ({"coordinator": "x:1", "data": "d", "threads": -1}, "threads: must be >= 0"),
        ({"coordinator": "x:1", "data": "d", "max_memory": 1000}, "max-memory: 1000 bytes"),
        ({"coordinator": "x:1", "data": "d", "quantization": "fp4"}, "quantization: 'fp4'"),
        ({"coordinator": "x:1", "data": "d", "compute_dtype": "fp8"}, "compute-dtype: 'fp8'"),
        (
            {"coordinator": "x:1", "data": "d", "insecure": True, "root_cert": Path("ca.pem")},
            "--insecure and --root-cert were both given",
        ),
    ],
)
def test_device_config_errors_name_the_setting(kw: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        DeviceConfig(**kw)


def test_node_config_and_supernode_command(keys: Path, data: Path, tmp_path: Path) -> None:
    cfg = check_inputs(
        DeviceConfig(
            coordinator="127.0.0.1:9092",
            data=str(data),
            root_cert=keys / "ca.pem",
            key=keys / "nodes" / "pi.key",
            state_dir=tmp_path / "state",
            cache_dir=tmp_path / "cache",
            threads=2,
            quantization="int8",
            compute_dtype="bf16",
            max_memory=2**30,
            quantize_to_fit=True,
        )
    )
    sock = tmp_path / "state" / "worker.sock"
    assert node_config(cfg, sock) == {
        "data-path": str(data),
        "cache-dir": str(tmp_path / "cache"),
        "state-dir": str(tmp_path / "state"),
        "worker-socket": str(sock),
        "device-name": "pi",  # what it answers the identity query with (its registered name)
        "quantization": "int8",
        "compute-dtype": "bf16",  # a budgeted device that asks for bf16 keeps it
        "threads": 2,
        "max-memory": 2**30,  # the ClientApp plans its training within it
        "quantize-to-fit": True,
    }
    cmd = supernode_command(cfg, tmp_path / "node.toml", 45678)
    assert cmd[1:] == [
        "--grpc-rere",
        "--superlink",
        "127.0.0.1:9092",
        "--node-config",
        str(tmp_path / "node.toml"),
        "--host",
        "127.0.0.1",
        "--port",
        "45678",
        "--max-wait-time",
        "60.0",
        "--root-certificates",
        str(keys / "ca.pem"),
        "--auth-supernode-private-key",
        str(keys / "nodes" / "pi.key"),
    ]


def test_default_state_dir_is_per_device_key(
    keys: Path, data: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FEDTUNE_STATE", str(tmp_path / "st"))
    cfg = check_inputs(
        DeviceConfig(coordinator="h:1", data=str(data), key=keys / "nodes" / "pi.key")
    )
    assert cfg.state_dir == tmp_path / "st" / "clients" / "pi"


def test_backoff_doubles_to_a_cap_and_respects_the_budget() -> None:
    b = Backoff(first=1, cap=8, budget=0)
    assert [b.next_delay() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    spent = Backoff(first=1, cap=8, budget=1e-9)
    import time

    time.sleep(0.01)
    assert spent.next_delay() is None
    assert split_address("[::1]:9092", "x") == ("::1", 9092)


# ------------------------------------------------------------------ one clear line, nothing starts


def _client(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["client", "start", *args])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    return code, err


def test_unreadable_data_is_one_line(capsys: pytest.CaptureFixture[str], keys: Path) -> None:
    code, err = _client(
        [
            "--coordinator",
            "127.0.0.1:1",
            "--data",
            "/no/such/data.jsonl",
            "--root-cert",
            str(keys / "ca.pem"),
        ],
        capsys,
    )
    assert code == 2
    assert err == ["fedtune client start: error: data path /no/such/data.jsonl does not exist"]


def test_wrong_key_file_is_one_line(
    capsys: pytest.CaptureFixture[str], keys: Path, data: Path
) -> None:
    code, err = _client(
        [
            "--coordinator",
            "127.0.0.1:1",
            "--data",
            str(data),
            "--root-cert",
            str(keys / "ca.pem"),
            "--key",
            str(keys / "ca.pem"),
        ],
        capsys,
    )
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"fedtune client start: error: node key {keys / 'ca.pem'}: not an")


def test_malformed_config_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    conf = tmp_path / "client.toml"
    conf.write_text("coordinator = [unclosed\n")
    code, err = _client(["--config", str(conf)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"fedtune client start: error: config {conf}: invalid TOML")


def test_wrong_root_certificate_is_one_line(
    capsys: pytest.CaptureFixture[str], keys: Path, data: Path, tmp_path: Path
) -> None:
    """A coordinator whose certificate the device's CA does not accept: no retries."""
    import socket
    import ssl
    import threading

    other = tmp_path / "other"
    create_keys(KeysConfig(other))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(other / "coordinator.pem", other / "coordinator.key")
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve_once() -> None:
        conn, _ = srv.accept()
        conn.settimeout(60)
        try:
            with ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            conn.close()

    t = threading.Thread(target=serve_once, daemon=True)
    t.start()
    try:
        code, err = _client(
            [
                "--coordinator",
                f"127.0.0.1:{port}",
                "--data",
                str(data),
                "--root-cert",
                str(keys / "ca.pem"),
                "--key",
                str(keys / "nodes" / "pi.key"),
            ],
            capsys,
        )
    finally:
        t.join(timeout=10)
        srv.close()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(
        f"fedtune client start: error: coordinator 127.0.0.1:{port} presented a certificate "
        f"that the CA in {keys / 'ca.pem'} does not accept"
    )


@pytest.mark.integration
def test_unreachable_coordinator_retries_with_reasons_then_gives_up(
    capsys: pytest.CaptureFixture[str], keys: Path, data: Path, tmp_path: Path
) -> None:
    port = free_port()
    code, err = _client(
        [
            "--coordinator",
            f"127.0.0.1:{port}",
            "--data",
            str(data),
            "--root-cert",
            str(keys / "ca.pem"),
            "--key",
            str(keys / "nodes" / "pi.key"),
            "--state-dir",
            str(tmp_path / "s"),
            "--no-worker",
            "--max-wait",
            "3",
        ],
        capsys,
    )
    assert code == 4
    retries = [ln for ln in err if "coordinator unreachable:" in ln]
    assert retries and all(f"127.0.0.1:{port} refused the connection" in ln for ln in retries)
    assert "retrying in 1s" in retries[0] and "retrying in 2s" in retries[1]
    assert err[-1] == (
        f"fedtune client start: error: coordinator 127.0.0.1:{port} unreachable for 3s: "
        f"127.0.0.1:{port} refused the connection (is the coordinator running?)"
    )


# ------------------------------------------------------------------ TLS on one side only


@pytest.fixture()
def grpc_server(keys: Path, request: pytest.FixtureRequest) -> Iterator[int]:
    """A real gRPC server on loopback (the transport of Flower's Fleet API), with TLS from the
    deployment's coordinator certificate or, with ``tls=False``, plaintext."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    if request.param == "tls":
        creds = grpc.ssl_server_credentials(
            [((keys / "coordinator.key").read_bytes(), (keys / "coordinator.pem").read_bytes())]
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


@pytest.fixture()
def no_supernode(monkeypatch: pytest.MonkeyPatch) -> None:
    from client.device import Device

    def refuse(_self: Device) -> None:
        raise AssertionError("the SuperNode must not start on a configuration error")

    monkeypatch.setattr(Device, "start_node", refuse)


@pytest.mark.parametrize("grpc_server", ["tls"], indirect=True)
def test_insecure_device_against_a_tls_coordinator_fails_at_once(
    capsys: pytest.CaptureFixture[str],
    keys: Path,
    data: Path,
    tmp_path: Path,
    grpc_server: int,
    no_supernode: None,
) -> None:
    """Issue 12: a device started with --insecure and --key against a TLS coordinator retried
    forever as if the coordinator were down."""
    state = tmp_path / "state"
    code, err = _client(
        ["--coordinator", f"127.0.0.1:{grpc_server}", "--data", str(data), "--insecure",
         "--key", str(keys / "nodes" / "pi.key"), "--state-dir", str(state), "--no-worker",
         "--max-wait", "3"],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert [ln for ln in err if "error" in ln] == [err[-1]]
    assert err[-1] == (
        f"fedtune client start: error: coordinator 127.0.0.1:{grpc_server} speaks TLS, but this "
        "device was started with --insecure; drop --insecure and pass --root-cert (the "
        "deployment's ca.pem)"
    )
    assert not state.exists(), "nothing is written for a configuration error"


@pytest.mark.parametrize("grpc_server", ["plaintext"], indirect=True)
def test_tls_device_against_an_insecure_coordinator_fails_at_once(
    capsys: pytest.CaptureFixture[str],
    keys: Path,
    data: Path,
    tmp_path: Path,
    grpc_server: int,
    no_supernode: None,
) -> None:
    code, err = _client(
        ["--coordinator", f"127.0.0.1:{grpc_server}", "--data", str(data),
         "--root-cert", str(keys / "ca.pem"), "--key", str(keys / "nodes" / "pi.key"),
         "--state-dir", str(tmp_path / "state"), "--no-worker", "--max-wait", "3"],
        capsys,
    )  # fmt: skip
    assert code == 2 and len(err) == 1
    assert err[0].startswith(
        f"fedtune client start: error: TLS handshake with 127.0.0.1:{grpc_server} failed"
    )
    assert "a coordinator started with --insecure needs --insecure here too" in err[0]


@pytest.mark.parametrize("grpc_server", ["plaintext"], indirect=True)
def test_the_insecure_probe_accepts_a_plaintext_coordinator(grpc_server: int) -> None:
    from client.probe import probe

    probe("127.0.0.1", grpc_server, None, insecure=True, timeout=5)
