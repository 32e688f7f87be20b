"""The deployment PKI: the tandem-certs CLI, the certificate library, and mutual TLS over real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pki import certs
from runtimes import tls

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 5.0
NODE_ID = "node-1"
DEVICE_ID = "pi4-kitchen"
WHOAMI = "/tandem.test.Identity/WhoAmI"

Pair = tuple[bytes, bytes]


@dataclass(frozen=True)
class Deployment:
    ca: Pair
    node: Pair
    device: Pair
    other_ca: Pair
    rogue_device: Pair  # a device cert from other_ca


@pytest.fixture(scope="module")
def deployment() -> Deployment:
    ca, other_ca = certs.create_ca("Tandem test CA"), certs.create_ca("Someone else's CA")
    return Deployment(
        ca=ca,
        # 192.0.2.10 (TEST-NET-1) stands for the node's real address: clients on
        # 127.0.0.1 can verify it only through the node id and a target-name override.
        node=certs.create_node(*ca, NODE_ID, ["192.0.2.10", "node1.lan"]),
        device=certs.create_device(*ca, DEVICE_ID),
        other_ca=other_ca,
        rogue_device=certs.create_device(*other_ca, DEVICE_ID),
    )


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pki.cli", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S * 4
    )


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the CLI ----------------------------------------------------------------


def test_cli_creates_a_ca_node_and_device_that_chain(tmp_path: Path) -> None:
    assert run_cli("ca", "--dir", tmp_path, "--name", "CLI CA").returncode == 0
    node = run_cli("node", "--dir", tmp_path, "--id", NODE_ID, "--host", "127.0.0.1", "--host", "node1.lan")
    device = run_cli("device", "--dir", tmp_path, "--id", DEVICE_ID)
    assert node.returncode == 0, node.stderr
    assert device.returncode == 0, device.stderr

    ca_pem = (tmp_path / "ca.crt").read_bytes()
    for stem, common_name in [(f"node-{NODE_ID}", NODE_ID), (f"device-{DEVICE_ID}", DEVICE_ID)]:
        cert_pem = (tmp_path / f"{stem}.crt").read_bytes()
        assert certs.chains_to(cert_pem, ca_pem)
        assert certs.identity(cert_pem)[0] == common_name
        assert file_mode(tmp_path / f"{stem}.key") == 0o600
    assert file_mode(tmp_path / "ca.key") == 0o600

    shown = run_cli("show", tmp_path / f"node-{NODE_ID}.crt")
    node_pem = (tmp_path / f"node-{NODE_ID}.crt").read_bytes()
    assert shown.returncode == 0, shown.stderr
    assert certs.fingerprint(node_pem) in shown.stdout
    assert certs.identity(node_pem)[1] in shown.stdout
    assert "CN=CLI CA" in shown.stdout


def test_cli_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert run_cli("ca", "--dir", tmp_path).returncode == 0
    first = (tmp_path / "ca.crt").read_bytes()

    again = run_cli("ca", "--dir", tmp_path)
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr
    assert (tmp_path / "ca.crt").read_bytes() == first

    assert run_cli("ca", "--dir", tmp_path, "--force").returncode == 0
    assert (tmp_path / "ca.crt").read_bytes() != first


@pytest.mark.parametrize("bad_id", ["", "-leading-dash", "has/slash", "has space", "x" * 64])
def test_cli_rejects_bad_ids(tmp_path: Path, bad_id: str) -> None:
    assert run_cli("ca", "--dir", tmp_path).returncode == 0
    result = run_cli("device", "--dir", tmp_path, f"--id={bad_id}")  # "=" so argparse takes "-x" as a value
    assert result.returncode == 2
    assert "invalid device id" in result.stderr
    assert list(tmp_path.glob("device-*")) == []


def test_cli_without_ca_files_exits_2(tmp_path: Path) -> None:
    result = run_cli("node", "--dir", tmp_path, "--id", NODE_ID)
    assert result.returncode == 2
    assert "ca.crt" in result.stderr and "not found" in result.stderr


# --- the library ------------------------------------------------------------


def test_certs_chain_only_to_their_own_ca(deployment: Deployment) -> None:
    ca_pem, other_ca_pem = deployment.ca[0], deployment.other_ca[0]
    assert certs.chains_to(deployment.node[0], ca_pem)
    assert certs.chains_to(deployment.device[0], ca_pem)
    assert not certs.chains_to(deployment.node[0], other_ca_pem)
    assert not certs.chains_to(deployment.rogue_device[0], ca_pem)


def test_a_ca_with_the_same_name_but_another_key_does_not_verify(deployment: Deployment) -> None:
    impostor_pem, _ = certs.create_ca("Tandem test CA")
    assert not certs.chains_to(deployment.node[0], impostor_pem)


def test_fingerprint_and_identity(deployment: Deployment) -> None:
    node_pem = deployment.node[0]
    digest = certs.fingerprint(node_pem)
    assert digest == certs.fingerprint(node_pem)
    assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    assert digest != certs.fingerprint(deployment.device[0])

    common_name, serial = certs.identity(node_pem)
    assert common_name == NODE_ID
    assert int(serial, 16) == x509.load_pem_x509_certificate(node_pem).serial_number
    assert serial == serial.lower()


def test_node_cert_names_its_id_and_hosts(deployment: Deployment) -> None:
    cert = x509.load_pem_x509_certificate(deployment.node[0])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [NODE_ID, "node1.lan"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.10")]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]


def test_issuing_with_a_key_from_another_ca_is_refused(deployment: Deployment) -> None:
    with pytest.raises(ValueError, match="does not match"):
        certs.create_device(deployment.ca[0], deployment.other_ca[1], DEVICE_ID)


def test_write_pair_is_private_and_refuses_overwrite(tmp_path: Path, deployment: Deployment) -> None:
    cert_path, key_path = certs.write_pair(tmp_path, "device-x", *deployment.device)
    assert file_mode(key_path) == 0o600
    assert cert_path.read_bytes() == deployment.device[0]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        certs.write_pair(tmp_path, "device-x", *deployment.rogue_device)
    certs.write_pair(tmp_path, "device-x", *deployment.rogue_device, overwrite=True)
    assert cert_path.read_bytes() == deployment.rogue_device[0]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_tls_files_name_the_missing_or_bad_file(tmp_path: Path, deployment: Deployment) -> None:
    ca_path, _ = certs.write_pair(tmp_path, "ca", *deployment.ca)
    cert_path, key_path = certs.write_pair(tmp_path, "device", *deployment.device)
    assert tls.TlsFiles(ca_path, cert_path, key_path).load() == (deployment.ca[0], *deployment.device)

    missing = tmp_path / "nope.crt"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        tls.TlsFiles(ca_path, missing, key_path).load()
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    with pytest.raises(ValueError, match=f"{garbage}.*PEM"):
        tls.TlsFiles(ca_path, cert_path, garbage).load()


# --- mutual TLS over gRPC ---------------------------------------------------


async def _who_am_i(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Echo back the identity the server sees, so tests can check what a handler would get."""
    peer = tls.peer_identity(context)
    return b"" if peer is None else " ".join(peer).encode()


def _identity_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("tandem.test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i)})


@dataclass(frozen=True)
class Ports:
    tls: int
    plaintext: int


@contextlib.asynccontextmanager
async def node_server(deployment: Deployment) -> AsyncIterator[Ports]:
    """A grpc.aio node on 127.0.0.1: mutual TLS on one port, plaintext on another, with the health service."""
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers((_identity_handler(),))
    node_cert, node_key = deployment.node
    tls_port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(node_cert, node_key, deployment.ca[0]))
    plaintext_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Ports(tls=tls_port, plaintext=plaintext_port)
    finally:
        await server.stop(grace=None)


def _secure_channel(port: int, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", NODE_ID)])


async def _call(channel: grpc.aio.Channel) -> tuple[int, bytes]:
    """Health status (readiness) then the identity the node saw."""
    stub = health_pb2_grpc.HealthStub(channel)
    status = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)).status
    who = await channel.unary_unary(WHOAMI)(b"", timeout=TIMEOUT_S)
    return status, who


def test_device_from_the_ca_is_served_and_identified(deployment: Deployment) -> None:
    async def scenario() -> None:
        async with node_server(deployment) as ports:
            async with _secure_channel(ports.tls, tls.channel_credentials(deployment.ca[0], *deployment.device)) as channel:
                status, who = await _call(channel)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.plaintext}") as plaintext:
                _, anonymous = await _call(plaintext)
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert who.decode().split() == list(certs.identity(deployment.device[0]))
        assert anonymous == b""

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "client",
    ["no client cert", "device cert from another CA", "client trusts another CA"],
)
def test_clients_outside_the_deployment_are_refused(deployment: Deployment, client: str) -> None:
    credentials = {
        "no client cert": lambda: grpc.ssl_channel_credentials(root_certificates=deployment.ca[0]),
        "device cert from another CA": lambda: tls.channel_credentials(deployment.ca[0], *deployment.rogue_device),
        "client trusts another CA": lambda: tls.channel_credentials(deployment.other_ca[0], *deployment.device),
    }[client]()

    async def scenario() -> None:
        async with node_server(deployment) as ports:
            async with _secure_channel(ports.tls, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _call(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_server_fingerprint_verifies_against_the_ca(deployment: Deployment) -> None:
    def fingerprint_as_device(port: int, ca_pem: bytes) -> str:
        device_cert, device_key = deployment.device
        return tls.server_fingerprint(
            "127.0.0.1", port, ca_pem, timeout_s=TIMEOUT_S, client_cert_pem=device_cert, client_key_pem=device_key
        )

    async def scenario() -> None:
        async with node_server(deployment) as ports:
            seen = await asyncio.to_thread(fingerprint_as_device, ports.tls, deployment.ca[0])
            assert seen == certs.fingerprint(deployment.node[0])
            with pytest.raises(ConnectionError, match="does not chain to the deployment CA"):
                await asyncio.to_thread(fingerprint_as_device, ports.tls, deployment.other_ca[0])

    asyncio.run(scenario())


def test_server_fingerprint_reports_an_unreachable_node(deployment: Deployment) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(ConnectionError, match=f"127.0.0.1:{closed_port}"):
            tls.server_fingerprint("127.0.0.1", closed_port, deployment.ca[0], timeout_s=TIMEOUT_S)
