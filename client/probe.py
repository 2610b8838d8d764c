"""Can this device reach the coordinator, and does the coordinator prove who it is?

One TLS handshake against the Fleet API port, with the deployment's CA and the host name the
device dials. Flower's own reconnect loop only says "Connection attempt failed"; this says why,
and tells a wrong certificate (a configuration error, not worth retrying) apart from a
coordinator that is down or unreachable (retried with backoff).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path


class Unreachable(ConnectionError):
    """The coordinator could not be reached now (refused, timed out, DNS); worth retrying."""


class CertificateMismatch(ValueError):
    """The coordinator answered but its certificate does not check out; retrying won't help."""


class TlsMismatch(CertificateMismatch):
    """The device was started with ``--insecure`` but the coordinator speaks TLS."""


def probe(
    host: str, port: int, root_cert: Path | None, *, insecure: bool = False, timeout: float = 10.0
) -> None:
    """Raise ``Unreachable`` or ``CertificateMismatch``; return when a TLS session (or, with
    ``insecure``, a TCP connection) to ``host:port`` succeeds."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise Unreachable(f"cannot resolve {host!r} ({exc.strerror})") from None
    except TimeoutError:
        raise Unreachable(f"no answer from {where} within {timeout:g}s") from None
    except ConnectionRefusedError:
        raise Unreachable(f"{where} refused the connection (is the coordinator running?)") from None
    except OSError as exc:
        raise Unreachable(f"cannot connect to {where}: {exc.strerror or exc}") from None
    with sock:
        if insecure:
            _refuse_tls(sock, where, timeout)
            return
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if root_cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cafile=str(root_cert))
        ctx.set_alpn_protocols(["h2"])  # what gRPC speaks
        sock.settimeout(timeout)
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            ca = f"the CA in {root_cert}" if root_cert else "the system's trusted CAs"
            raise CertificateMismatch(
                f"coordinator {where} presented a certificate that {ca} does not accept: "
                f"{exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise CertificateMismatch(
                f"TLS handshake with {where} failed ({exc.reason or exc}); is it a TLS "
                "coordinator? (a coordinator started with --insecure needs --insecure here too)"
            ) from None
        except TimeoutError:
            raise Unreachable(f"TLS handshake with {where} timed out after {timeout:g}s") from None
        except OSError as exc:
            raise Unreachable(f"connection to {where} dropped during TLS: {exc}") from None


def _refuse_tls(sock: socket.socket, where: str, timeout: float) -> None:
    """With ``--insecure``: raise ``TlsMismatch`` if the coordinator completes a TLS handshake
    (nothing is verified; only whether it speaks TLS). A plaintext gRPC server drops the
    connection on the TLS hello instead, which is what an insecure coordinator should do."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    sock.settimeout(timeout)
    try:
        with ctx.wrap_socket(sock, do_handshake_on_connect=True):
            pass
    except (ssl.SSLError, OSError):
        return  # not TLS (or gone): the plaintext connection is for the SuperNode to try
    raise TlsMismatch(
        f"coordinator {where} speaks TLS, but this device was started with --insecure; drop "
        "--insecure and pass --root-cert (the deployment's ca.pem)"
    )
