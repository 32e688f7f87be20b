"""Issue and inspect the deployment's certificates: one CA, node (server) and device (client) identities.

Everything goes through the ``cryptography`` library. Keys are EC P-256: small,
fast to generate on a device, and accepted by both gRPC's BoringSSL and
Python's ``ssl``. The extensions follow what strict verifiers (Python 3.13's
``VERIFY_X509_STRICT``, BoringSSL) ask for: critical BasicConstraints and
KeyUsage, subject and authority key identifiers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

# Node and device ids become a CN, a DNS SAN and part of a file name: keep them
# to characters that are valid in all three.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

# Certificates start a little in the past so a device whose clock lags the
# CA's by a few minutes still accepts them.
_CLOCK_SKEW = dt.timedelta(minutes=5)


def check_id(value: str, *, kind: str = "id") -> str:
    """Return ``value`` if it is a usable node or device id, else raise ValueError saying why."""
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(f"invalid {kind} {value!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _key_usage(*, key_cert_sign: bool = False) -> x509.KeyUsage:
    """digitalSignature always (ECDHE-ECDSA handshakes need it); certificate and CRL signing for the CA only."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    now = dt.datetime.now(dt.timezone.utc)
    return builder.not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(name: str, *, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed CA that signs node and device certificates; returns (cert PEM, key PEM)."""
    if not name.strip():
        raise ValueError("CA name must not be empty")
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
    )
    cert = _validity(builder, days).sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_ca(ca_cert_pem: bytes, ca_key_pem: bytes) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA pair, refusing a key that does not belong to the cert (its leaves would never verify)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("CA key is not an EC key; create the CA with create_ca")
    if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():
        raise ValueError("CA key does not match the CA certificate")
    return ca_cert, ca_key


def _issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    alt_names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> tuple[bytes, bytes]:
    """A leaf certificate for one identity and one purpose (server or client auth), signed by the CA."""
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    cert = _validity(builder, days).sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _host_name(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise ValueError("host must not be empty")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def create_node(ca_cert_pem: bytes, ca_key_pem: bytes, node_id: str, hosts: list[str], *, days: int = 825) -> tuple[bytes, bytes]:
    """A cloud node's server certificate for ``hosts`` (DNS names or IPs).

    ``node_id`` is always a DNS name too, so a client that reaches the node by
    an address not listed can still verify it with a target-name override.
    """
    check_id(node_id, kind="node id")
    alt_names: list[x509.GeneralName] = [x509.DNSName(node_id)]
    for host in hosts:
        name = _host_name(host)
        if name not in alt_names:
            alt_names.append(name)
    return _issue(ca_cert_pem, ca_key_pem, node_id, alt_names, ExtendedKeyUsageOID.SERVER_AUTH, days)


def create_device(ca_cert_pem: bytes, ca_key_pem: bytes, device_id: str, *, days: int = 825) -> tuple[bytes, bytes]:
    """An edge device's client certificate; nodes read ``device_id`` back from its CN."""
    check_id(device_id, kind="device id")
    return _issue(ca_cert_pem, ca_key_pem, device_id, [x509.DNSName(device_id)], ExtendedKeyUsageOID.CLIENT_AUTH, days)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the DER encoding, lowercase hex: what operators pin and compare."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def identity(cert_pem: bytes) -> tuple[str, str]:
    """(common name, serial as lowercase hex): who the peer is, and which of its certs it used."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    return common_name, format(cert.serial_number, "x")


def chains_to(cert_pem: bytes, ca_cert_pem: bytes) -> bool:
    """Whether ``ca_cert_pem`` issued and signed ``cert_pem`` (no validity-period or usage checks)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_pair(directory: Path, stem: str, cert_pem: bytes, key_pem: bytes, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``stem.crt`` (0644) and ``stem.key`` (0600); returns their paths.

    Both files are checked before either is written, so a refusal never leaves
    a new cert next to an old key.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    if not overwrite:
        existing = [str(path) for path in (cert_path, key_path) if path.exists()]
        if existing:
            raise FileExistsError(f"refusing to overwrite {' and '.join(existing)} (pass overwrite=True / --force to replace)")
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert_pem, 0o644)
    logger.info("wrote %s and %s", cert_path, key_path)
    return cert_path, key_path
