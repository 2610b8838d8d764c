"""Keys and certificates for a deployment, made with ``cryptography``.

``fedtune keys`` writes one directory::

    ca.pem, ca.key                  the deployment's own certificate authority (keep ca.key offline)
    coordinator.pem, .key           the coordinator's TLS certificate, signed by the CA; its SANs
                                    are the hostnames/IPs devices dial, plus localhost/127.0.0.1/::1
                                    (Flower's own processes on the coordinator use loopback)
    nodes/<name>.key, <name>.pub    one EC P-384 key pair per device, in the OpenSSH formats that
                                    Flower's node authentication reads (``flower-supernode
                                    --auth-supernode-private-key`` and the SuperLink's registry)

Devices get ``ca.pem`` and their own ``nodes/<name>.key``; the coordinator gets ``ca.pem``,
``coordinator.pem/.key`` and the ``nodes/*.pub`` files it accepts. Nothing is ever overwritten
unless ``force`` is set.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
COORDINATOR_CERT = "coordinator.pem"
COORDINATOR_KEY = "coordinator.key"
NODES_DIR = "nodes"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Flower's node authentication accepts NIST curves only; P-384 is what its docs use.
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeysError(ValueError):
    """A key or certificate is missing, malformed or would be overwritten; names the file."""


@dataclass(frozen=True)
class KeysConfig:
    out_dir: Path
    hosts: tuple[str, ...] = ()  # coordinator SANs besides the loopback names
    devices: tuple[str, ...] = ()
    days: int = 365
    force: bool = False

    def __post_init__(self) -> None:
        if self.days < 1:
            raise KeysError(f"days: must be >= 1, got {self.days}")
        for host in self.hosts:
            if not host or any(c.isspace() for c in host) or (":" in host and not _is_ip(host)):
                raise KeysError(f"coordinator-host: {host!r} is not a hostname or IP address")
        for name in self.devices:
            if not _NAME.match(name):
                raise KeysError(
                    f"device: {name!r} is not a valid device name (letters, digits, '.', '_', "
                    "'-'; at most 64 characters)"
                )
        if len(set(self.devices)) != len(self.devices):
            raise KeysError("device: the same device name is given twice")


@dataclass
class KeysResult:
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created 0600, never world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# ------------------------------------------------------------------------------ certificates


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune deployment CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def server_names(hosts: Iterable[str]) -> list[str]:
    """The coordinator certificate's SANs: the given hosts, then the loopback names, no repeats."""
    out: list[str] = []
    for h in [*hosts, *LOOPBACK_NAMES]:
        if h not in out:
            out.append(h)
    return out


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    names = server_names(hosts)
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in names
    ]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def load_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise KeysError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise KeysError(f"{what} {path}: not a PEM certificate") from None


def load_private_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise KeysError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        if data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)  # type: ignore[assignment]
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeysError(f"{what} {path}: not an unencrypted PEM or OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeysError(f"{what} {path}: not an elliptic-curve key ({type(key).__name__})")
    return key


def check_server_files(ca_path: Path, cert_path: Path, key_path: Path) -> list[str]:
    """Validate the coordinator's TLS files before starting anything; returns the SANs.

    Checks the certificate is signed by the CA, currently valid, matches the key, and names
    127.0.0.1 (Flower's SuperExec reaches the SuperLink's runtime API over loopback TLS).
    """
    ca = load_certificate(ca_path, "CA certificate")
    cert = load_certificate(cert_path, "coordinator certificate")
    key = load_private_key(key_path, "coordinator key")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KeysError(
            f"coordinator certificate {cert_path} is not signed by the CA in {ca_path}"
        ) from None
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KeysError(
            f"coordinator certificate {cert_path} is not valid now (valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise KeysError(f"coordinator key {key_path} does not belong to certificate {cert_path}")
    names = certificate_names(cert)
    if "127.0.0.1" not in names:
        raise KeysError(
            f"coordinator certificate {cert_path} does not name 127.0.0.1 (it names "
            f"{', '.join(names) or 'nothing'}); re-create it with `fedtune keys`"
        )
    return names


def certificate_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


# ------------------------------------------------------------------------------ node keys


def make_node_key() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) for one device, EC P-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The device key as ``flower-supernode --auth-supernode-private-key`` reads it."""
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise KeysError(f"node key {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeysError(
            f"node key {path}: not an unencrypted OpenSSH private key (make one with "
            "`fedtune keys --device NAME`)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, NIST_CURVES):
        raise KeysError(f"node key {path}: must be an EC key on a NIST curve (P-256/384/521)")
    return key


def parse_node_public_key(line: bytes, where: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(line.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise KeysError(f"{where}: not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise KeysError(f"{where}: must be an EC public key on a NIST curve (ecdsa-sha2-nistp*)")
    return key


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """The form Flower's SuperLink stores and compares registered node keys in."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint, as ``ssh-keygen -lf`` prints it."""
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    raw = base64.b64decode(blob.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class AuthorizedKey:
    name: str
    key: ec.EllipticCurvePublicKey
    source: str

    @property
    def pem(self) -> bytes:
        return public_key_pem(self.key)


def read_authorized_keys(paths: Sequence[Path]) -> list[AuthorizedKey]:
    """Device public keys from directories (every ``*.pub``) and/or files (one key per line,
    ``authorized_keys`` style; the comment, if any, names the device)."""
    out: list[AuthorizedKey] = []
    for path in paths:
        path = path.expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.pub"))
            if not files:
                raise KeysError(f"authorized keys {path}: directory holds no *.pub file")
            for f in files:
                keys = _read_key_file(f, default_name=f.stem)
                if len(keys) != 1:
                    raise KeysError(f"authorized key {f}: expected one key, found {len(keys)}")
                out += keys
        elif path.is_file():
            keys = _read_key_file(path, default_name=None)
            if not keys:
                raise KeysError(f"authorized keys {path}: file holds no key")
            out += keys
        else:
            raise KeysError(f"authorized keys {path}: no such file or directory")
    seen: dict[bytes, str] = {}
    names: dict[str, str] = {}
    for k in out:
        if k.pem in seen:
            raise KeysError(f"authorized keys: {k.source} repeats the key in {seen[k.pem]}")
        if k.name in names:
            raise KeysError(
                f"authorized keys: {k.source} repeats the name {k.name!r} of {names[k.name]}"
            )
        seen[k.pem] = k.source
        names[k.name] = k.source
    return out


def _read_key_file(path: Path, default_name: str | None) -> list[AuthorizedKey]:
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise KeysError(f"authorized keys {path}: cannot be read ({exc.strerror or exc})") from None
    out = []
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        where = f"{path}:{i}" if default_name is None else str(path)
        key = parse_node_public_key(line, where)
        parts = line.split(None, 2)
        name = default_name or (parts[2].decode(errors="replace") if len(parts) > 2 else where)
        out.append(AuthorizedKey(name=name, key=key, source=where))
    return out


# ------------------------------------------------------------------------------ the command


def create_keys(cfg: KeysConfig) -> KeysResult:
    """Create what is missing or asked for; refuse to overwrite unless ``force``.

    * the CA is created only when the directory has none (an existing one signs new
      certificates; to replace a CA, use a new directory);
    * the coordinator certificate is created when ``hosts`` are given, or when there is none;
    * a device key pair is created for each name in ``devices``.

    ``force`` allows replacing the coordinator certificate and the named device keys; it never
    replaces the CA.
    """
    out = cfg.out_dir.expanduser()
    res = KeysResult()
    ca_pem, ca_key_path = out / CA_CERT, out / CA_KEY
    srv_pem, srv_key_path = out / COORDINATOR_CERT, out / COORDINATOR_KEY
    nodes = out / NODES_DIR

    if ca_pem.exists() != ca_key_path.exists():
        missing = ca_key_path if ca_pem.exists() else ca_pem
        raise KeysError(
            f"{missing} is missing but its pair exists; restore it or use a new directory"
        )
    has_ca = ca_pem.exists()
    if not has_ca and srv_pem.exists():
        raise KeysError(f"{srv_pem} exists but {ca_pem} does not; use a new directory")
    conflicts: list[Path] = []
    if cfg.hosts and srv_pem.exists():
        conflicts.append(srv_pem)
    conflicts += [nodes / f"{d}.key" for d in cfg.devices if (nodes / f"{d}.key").exists()]
    if conflicts and not cfg.force:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise KeysError(f"{conflicts[0]} already exists{more}; pass --force to replace it")

    out.mkdir(parents=True, exist_ok=True)
    if has_ca:
        ca = load_certificate(ca_pem, "CA certificate")
        ca_key = load_private_key(ca_key_path, "CA key")
        res.kept.append(ca_pem)
    else:
        ca_key, ca = make_ca(cfg.days)
        _write_private(ca_key_path, _pem_key(ca_key))
        _write_public(ca_pem, ca.public_bytes(serialization.Encoding.PEM))
        res.created += [ca_pem, ca_key_path]

    if cfg.hosts or not srv_pem.exists():
        key, cert = make_server_cert(ca_key, ca, cfg.hosts, cfg.days)
        _write_private(srv_key_path, _pem_key(key))
        _write_public(srv_pem, cert.public_bytes(serialization.Encoding.PEM))
        res.created += [srv_pem, srv_key_path]
    else:
        res.kept.append(srv_pem)

    if cfg.devices:
        nodes.mkdir(exist_ok=True)
    for name in cfg.devices:
        private, public = make_node_key()
        _write_private(nodes / f"{name}.key", private)
        _write_public(nodes / f"{name}.pub", public)
        res.created += [nodes / f"{name}.key", nodes / f"{name}.pub"]
    return res
