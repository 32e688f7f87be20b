"""Mutual TLS for both gRPC daemons: credentials, the caller's identity, and a node's fingerprint.

Nodes serve only to clients holding a device certificate from the deployment
CA; agents verify nodes against the same CA. Nodes are usually addressed by
IP, so clients verify the node id (always a DNS SAN in node certs) through
``("grpc.ssl_target_name_override", node_id)``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from pki.certs import fingerprint, identity

logger = logging.getLogger(__name__)


def server_credentials(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> grpc.ServerCredentials:
    """Server credentials that refuse any client without a certificate from ``ca_pem``."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)


def channel_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ChannelCredentials:
    """Client credentials: trust only the deployment CA and present this device's certificate."""
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


class _HasAuthContext(Protocol):
    def auth_context(self) -> dict[str, list[bytes]]: ...


def peer_identity(context: _HasAuthContext) -> tuple[str, str] | None:
    """(common name, serial hex) of the client's certificate, or None on a plaintext or cert-less connection.

    Works with both ``grpc.ServicerContext`` and ``grpc.aio.ServicerContext``.
    The serial comes from parsing ``x509_pem_cert``: gRPC exposes the CN but not the serial.
    """
    pem_certs = context.auth_context().get("x509_pem_cert")
    if not pem_certs:
        return None
    return identity(pem_certs[0])


def caller_key(context: _HasAuthContext) -> str:
    """Who is calling, for sharing a server between callers: the device its
    certificate names, else (plaintext, where nothing is authenticated) the
    address it calls from."""
    peer = peer_identity(context)
    if peer is not None:
        return f"device {peer[0]}"
    kind, _, rest = context.peer().partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"address {rest.rpartition(':')[0].strip('[]')}"
    return f"{kind} peer"


def server_fingerprint(
    host: str,
    port: int,
    ca_pem: bytes,
    *,
    timeout_s: float = 5.0,
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
) -> str:
    """SHA-256 fingerprint of the certificate a node serves, after checking it chains to ``ca_pem``.

    For operators pinning or comparing nodes. The host name is not checked
    (nodes are addressed by IP); the client certificate, if given, is presented
    because nodes require one. Under TLS 1.3 the server checks the client cert
    after the client's handshake is done, so a fingerprint read without one
    proves nothing about whether the node would accept this client.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])  # gRPC servers refuse handshakes without h2 in ALPN
    try:
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as error:
        raise ValueError(f"CA certificate is not valid PEM: {error}") from None
    if (client_cert_pem is None) != (client_key_pem is None):
        raise ValueError("pass both client_cert_pem and client_key_pem, or neither")
    if client_cert_pem is not None and client_key_pem is not None:
        _load_client_pair(context, client_cert_pem, client_key_pem)

    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as error:
        raise ConnectionError(f"{where}: certificate does not chain to the deployment CA ({error.verify_message})") from None
    except (OSError, ssl.SSLError) as error:
        raise ConnectionError(f"{where}: TLS connection failed: {error}") from None
    if der is None:
        raise ConnectionError(f"{where}: server presented no certificate")
    return fingerprint(ssl.DER_cert_to_PEM_cert(der).encode("ascii"))


def _load_client_pair(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``SSLContext.load_cert_chain`` reads only files, so the pair goes through a private temp directory."""
    with tempfile.TemporaryDirectory(prefix="tandem-tls-") as directory:  # created 0700
        cert_path, key_path = Path(directory) / "client.crt", Path(directory) / "client.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as error:
            raise ValueError(f"client certificate and key do not form a usable pair: {error}") from None


@dataclass(frozen=True)
class TlsFiles:
    """Where a daemon's TLS material lives: the deployment CA, and this host's cert and key."""

    ca: Path
    cert: Path
    key: Path

    def load(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) PEM bytes; a ValueError names the file that is missing, unreadable or not PEM."""
        return _read_pem(self.ca, "CA certificate"), _read_pem(self.cert, "certificate"), _read_pem(self.key, "private key")


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"TLS {what} file {path} does not exist") from None
    except OSError as error:
        raise ValueError(f"TLS {what} file {path} cannot be read: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLS {what} file {path} does not contain PEM data")
    return data


def tls_from_config(*, ca: Path | None, cert: Path | None, key: Path | None, plaintext: bool, daemon: str) -> TlsFiles | None:
    """The TLS files a daemon's config names, or None when it explicitly asked
    for plaintext; ConfigError for anything in between, so TLS is never off by
    accident."""
    from runtimes.config import ConfigError

    given = [p for p in (ca, cert, key) if p is not None]
    if plaintext:
        if given:
            raise ConfigError("plaintext = true and TLS files are both given: choose one")
        return None
    if len(given) != 3:
        raise ConfigError(f"{daemon} needs tls_ca, tls_cert and tls_key (tandem-certs creates them), "
                          "or plaintext = true to run without TLS")
    return TlsFiles(ca=ca, cert=cert, key=key)


def warn_plaintext(daemon: str, address: str) -> None:
    logger.warning("*** %s on %s is PLAINTEXT: no encryption, no authentication; anyone on the network can call "
                   "it or read its traffic (plaintext = true). Use tls_ca/tls_cert/tls_key outside a lab. ***",
                   daemon, address)
