"""``tandem-certs``: create the deployment CA, node and device certificates, and show what a cert holds.

    tandem-certs ca --dir pki/ [--name NAME]
    tandem-certs node --dir pki/ --id node-1 --host 10.0.0.5 --host node1.lan
    tandem-certs device --dir pki/ --id pi4-kitchen
    tandem-certs show pki/node-node-1.crt

Bad input (an invalid id, missing CA files, an existing output without
``--force``) is reported on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from pki import certs

USAGE_ERROR = 2
DEFAULT_CA_NAME = "Tandem deployment CA"


class UsageError(Exception):
    """Something the operator can fix; printed without a traceback."""


def _id_argument(kind: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        try:
            return certs.check_id(value, kind=kind)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found (create it with `tandem-certs ca --dir {path.parent}`)") from None
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror}") from None


def _load_ca(directory: Path) -> tuple[bytes, bytes]:
    return _read(directory / "ca.crt", "CA certificate"), _read(directory / "ca.key", "CA key")


def _write(args: argparse.Namespace, stem: str, pair: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = pair
    try:
        cert_path, key_path = certs.write_pair(args.dir, stem, cert_pem, key_pem, overwrite=args.force)
    except FileExistsError as error:
        raise UsageError(str(error)) from None
    common_name, serial = certs.identity(cert_pem)
    print(f"wrote {cert_path} and {key_path}")
    print(f"  CN={common_name} serial={serial} sha256={certs.fingerprint(cert_pem)}")


def _cmd_ca(args: argparse.Namespace) -> None:
    _write(args, "ca", certs.create_ca(args.name, days=args.days))


def _cmd_node(args: argparse.Namespace) -> None:
    ca_cert, ca_key = _load_ca(args.dir)
    _write(args, f"node-{args.id}", certs.create_node(ca_cert, ca_key, args.id, args.host, days=args.days))


def _cmd_device(args: argparse.Namespace) -> None:
    ca_cert, ca_key = _load_ca(args.dir)
    _write(args, f"device-{args.id}", certs.create_device(ca_cert, ca_key, args.id, days=args.days))


def _cmd_show(args: argparse.Namespace) -> None:
    cert_pem = _read(args.file, "certificate")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise UsageError(f"{args.file} is not a PEM certificate") from None
    common_name, serial = certs.identity(cert_pem)
    print(f"file:        {args.file}")
    print(f"common name: {common_name}")
    print(f"serial:      {serial}")
    print(f"sha256:      {certs.fingerprint(cert_pem)}")
    print(f"valid from:  {cert.not_valid_before_utc.isoformat()}")
    print(f"valid until: {cert.not_valid_after_utc.isoformat()}")
    print(f"issuer:      {cert.issuer.rfc4514_string()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem-certs", description="Certificates for mutual TLS between edge agents and cloud nodes.")
    commands = parser.add_subparsers(dest="command", required=True)

    def issuing_command(name: str, help_text: str, default_days: int) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--dir", type=Path, required=True, help="directory holding ca.crt/ca.key and the new files")
        command.add_argument("--days", type=int, default=default_days, help=f"validity in days (default {default_days})")
        command.add_argument("--force", action="store_true", help="replace existing output files")
        return command

    ca = issuing_command("ca", "create DIR/ca.crt and DIR/ca.key", 3650)
    ca.add_argument("--name", default=DEFAULT_CA_NAME, help=f"CA common name (default {DEFAULT_CA_NAME!r})")
    ca.set_defaults(run=_cmd_ca)

    node = issuing_command("node", "create DIR/node-ID.crt/.key, a server cert signed by DIR/ca.*", 825)
    node.add_argument("--id", required=True, type=_id_argument("node id"), help="node id: the CN and a DNS name in the cert")
    node.add_argument("--host", action="append", default=[], help="DNS name or IP address clients use (repeatable)")
    node.set_defaults(run=_cmd_node)

    device = issuing_command("device", "create DIR/device-ID.crt/.key, a client cert signed by DIR/ca.*", 825)
    device.add_argument("--id", required=True, type=_id_argument("device id"), help="device id: the CN nodes see")
    device.set_defaults(run=_cmd_device)

    show = commands.add_parser("show", help="print a certificate's CN, serial, fingerprint, validity and issuer")
    show.add_argument("file", type=Path, help="a .crt file")
    show.set_defaults(run=_cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; argparse itself exits with 2 on malformed arguments."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, ValueError) as error:
        print(f"tandem-certs: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
