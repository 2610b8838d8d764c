"""`fedtune keys`: certificates and node keys round-trip through the loaders Flower uses, a real
TLS handshake succeeds with the deployment's CA only, and nothing is overwritten by accident."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from cli.main import main
from client.probe import CertificateMismatch, Unreachable, probe
from client.processes import free_port
from protocol.credentials import (
    KeysConfig,
    KeysError,
    check_server_files,
    create_keys,
    fingerprint,
    load_node_private_key,
    public_key_pem,
    read_authorized_keys,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    create_keys(KeysConfig(out, hosts=("coord.example.org", "10.1.2.3"), devices=("pi", "jetson")))
    return out


def test_certificate_chain_and_names(keys: Path) -> None:
    names = check_server_files(keys / "ca.pem", keys / "coordinator.pem", keys / "coordinator.key")
    assert names == ["coord.example.org", "localhost", "10.1.2.3", "127.0.0.1", "::1"]
    ca = x509.load_pem_x509_certificate((keys / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((keys / "coordinator.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_node_keys_load_the_way_flower_loads_them(keys: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    for name in ("pi", "jetson"):
        # flower-supernode --auth-supernode-private-key: an OpenSSH EC private key
        private = serialization.load_ssh_private_key(
            (keys / "nodes" / f"{name}.key").read_bytes(), None
        )
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        # the SuperLink registry (what `flwr supernode register` sends): PEM of the public key
        registered = try_load_public_key(keys / "nodes" / f"{name}.pub")
        assert registered == public_key_pem(private.public_key())
        assert load_node_private_key(
            keys / "nodes" / f"{name}.key"
        ).public_key().public_numbers() == (private.public_key().public_numbers())
    a, b = (read_authorized_keys([keys / "nodes"])[i].pem for i in range(2))
    assert a != b


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_fingerprint_matches_ssh_keygen(keys: Path) -> None:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(keys / "nodes" / "pi.pub")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    key = load_node_private_key(keys / "nodes" / "pi.key").public_key()
    assert out.split()[1] == fingerprint(key)


def test_private_keys_are_owner_only(keys: Path) -> None:
    for path in [keys / "ca.key", keys / "coordinator.key", keys / "nodes" / "pi.key"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((keys / "ca.pem").stat().st_mode) & 0o044  # certificates are public


def test_never_overwrites_unless_forced(tmp_path: Path) -> None:
    create_keys(KeysConfig(tmp_path, devices=("a",)))
    ca = (tmp_path / "ca.pem").read_bytes()
    key_a = (tmp_path / "nodes" / "a.key").read_bytes()
    with pytest.raises(KeysError, match=r"nodes/a.key already exists; pass --force"):
        create_keys(KeysConfig(tmp_path, devices=("a",)))
    with pytest.raises(KeysError, match=r"coordinator.pem already exists; pass --force"):
        create_keys(KeysConfig(tmp_path, hosts=("new.example",)))
    assert (tmp_path / "nodes" / "a.key").read_bytes() == key_a

    res = create_keys(KeysConfig(tmp_path, devices=("b",)))  # adding a device reuses the CA
    assert [p.name for p in res.created] == ["b.key", "b.pub"]
    assert (tmp_path / "ca.pem").read_bytes() == ca

    create_keys(KeysConfig(tmp_path, devices=("a",), hosts=("new.example",), force=True))
    assert (tmp_path / "nodes" / "a.key").read_bytes() != key_a
    assert (tmp_path / "ca.pem").read_bytes() == ca  # --force never replaces the CA
    names = check_server_files(tmp_path / "ca.pem", tmp_path / "coordinator.pem",
                               tmp_path / "coordinator.key")  # fmt: skip
    assert names[0] == "new.example"


def test_cli_prints_what_it_created_and_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "--out", str(tmp_path), "--devices", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"created {tmp_path / 'nodes' / 'device-2.pub'}" in out and len(out) == 8
    assert main(["keys", "--out", str(tmp_path), "--device", "device-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fedtune keys: error: {tmp_path / 'nodes' / 'device-1.key'} already exists; pass --force "
        "to replace it"
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices": ("bad name",)}, "device: 'bad name' is not a valid device name"),
        ({"devices": ("a", "a")}, "the same device name is given twice"),
        ({"hosts": ("has space",)}, "coordinator-host: 'has space' is not a hostname"),
        ({"days": 0}, "days: must be >= 1"),
    ],
)
def test_bad_requests_name_the_setting(tmp_path: Path, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(KeysError, match=message):
        KeysConfig(tmp_path, **kwargs)


def test_server_files_from_another_deployment_are_rejected(keys: Path, tmp_path: Path) -> None:
    create_keys(KeysConfig(tmp_path))
    with pytest.raises(KeysError, match="is not signed by the CA in"):
        check_server_files(
            keys / "ca.pem", tmp_path / "coordinator.pem", tmp_path / "coordinator.key"
        )
    with pytest.raises(KeysError, match="does not belong to certificate"):
        check_server_files(keys / "ca.pem", keys / "coordinator.pem", tmp_path / "coordinator.key")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(KeysError, match=r"junk\.pem: not a PEM certificate"):
        check_server_files(
            tmp_path / "junk.pem", keys / "coordinator.pem", keys / "coordinator.key"
        )


def test_authorized_keys_file_and_errors(keys: Path, tmp_path: Path) -> None:
    pi = (keys / "nodes" / "pi.pub").read_text().strip()
    jetson = (keys / "nodes" / "jetson.pub").read_text().strip()
    listing = tmp_path / "authorized_keys"
    listing.write_text(f"# devices\n{pi} kitchen-pi\n\n{jetson}\n")
    got = read_authorized_keys([listing])
    assert [k.name for k in got] == ["kitchen-pi", f"{listing}:4"]

    with pytest.raises(KeysError, match="repeats the key in"):
        read_authorized_keys([listing, keys / "nodes"])
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    bad = tmp_path / "ed.pub"
    bad.write_bytes(
        ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(KeysError, match=r"ed\.pub:1: must be an EC public key on a NIST curve"):
        read_authorized_keys([bad])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KeysError, match=r"directory holds no \*\.pub file"):
        read_authorized_keys([empty])
    with pytest.raises(KeysError, match="no such file or directory"):
        read_authorized_keys([tmp_path / "missing"])
    (tmp_path / "junk.key").write_text("junk")
    with pytest.raises(KeysError, match=r"junk\.key: not an unencrypted OpenSSH private key"):
        load_node_private_key(tmp_path / "junk.key")


# ------------------------------------------------------------------------------ a real handshake


@pytest.fixture()
def tls_server(keys: Path) -> Iterator[int]:
    """A TLS server on loopback presenting the coordinator certificate (ALPN h2, like gRPC)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(keys / "coordinator.pem", keys / "coordinator.key")
    ctx.set_alpn_protocols(["h2"])
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(60)
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=60)
        sock.close()


def test_probe_accepts_the_deployment_ca_only(keys: Path, tls_server: int, tmp_path: Path) -> None:
    probe("127.0.0.1", tls_server, keys / "ca.pem", timeout=60)
    probe("localhost", tls_server, keys / "ca.pem", timeout=60)
    create_keys(KeysConfig(tmp_path))  # another deployment's CA
    with pytest.raises(
        CertificateMismatch,
        match=r"does not accept: .*(unable to get local issuer|self.signed|unknown ca)",
    ):
        probe("127.0.0.1", tls_server, tmp_path / "ca.pem", timeout=60)


def test_probe_says_why_it_cannot_connect() -> None:
    port = free_port()
    with pytest.raises(Unreachable, match=re.escape(f"127.0.0.1:{port} refused the connection")):
        probe("127.0.0.1", port, None, timeout=60)
    with pytest.raises(Unreachable, match=r"cannot resolve 'no-such-host\.invalid'"):
        probe("no-such-host.invalid", 9092, None, timeout=60)
