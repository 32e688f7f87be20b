"""The emulation harness does what it claims: kernel rate shaping, relay delay and faults, CPU quota, clean teardown.

Needs root, `ip netns` and cgroups; skips with the harness's own reason where they are missing.
"""

from __future__ import annotations

import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from emulation import cpu, netns, relay
from emulation.cpu import CpuQuota
from emulation.netns import Testbed
from emulation.relay import Relay

NETNS_REASON = netns.available()
CPU_REASON = cpu.available()
needs_netns = pytest.mark.skipif(NETNS_REASON is not None, reason=f"netns emulation unavailable: {NETNS_REASON}")
needs_cgroup = pytest.mark.skipif(CPU_REASON is not None, reason=f"CPU quota unavailable: {CPU_REASON}")

PY = sys.executable
PORT = 5201

# Counts bytes per connection from first byte to EOF; prints "<bytes> <seconds>" per connection.
SINK = """
import socket, sys, time
addr, port, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(); print("ready", flush=True)
for _ in range(conns):
    c, _ = s.accept(); total = 0; first = None
    while data := c.recv(1 << 16):
        first = first or time.monotonic(); total += len(data)
    print(total, time.monotonic() - first, flush=True); c.close()
"""

SOURCE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(b"x" * int(sys.argv[3])); s.shutdown(socket.SHUT_WR); s.recv(1)
"""

ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := c.recv(4096):
    c.sendall(data)
"""

# Median RTT in ms of 9 small request/responses; prints it.
PINGER = """
import socket, statistics, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(9):
    t = time.perf_counter(); s.sendall(b"p" * 16); got = b""
    while len(got) < 16:
        got += s.recv(16 - len(got))
    rtts.append((time.perf_counter() - t) * 1000)
print(statistics.median(rtts))
"""


def _ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"helper did not start: {line!r}"


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


# -- kernel rate shaping ---------------------------------------------------


def test_tbf_params_pass_a_full_frame_at_low_rate_and_scale_at_high_rate():
    _, burst, limit = netns.tbf_params(0.25)
    assert burst >= netns.FRAME_BYTES and limit > burst
    rate, burst, _ = netns.tbf_params(100)
    assert rate == 100_000_000 and burst >= 100e6 / 8 * netns.BURST_SECONDS


@needs_netns
def test_uplink_rate_is_shaped_and_changes_live():
    measured = {}
    with Testbed(uplink_mbps=5, downlink_mbps=50) as bed:
        sink = bed.popen("cloud", [PY, "-c", SINK, bed.cloud_addr, str(PORT), "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _ready(sink)
        for mbps, size in ((5, 2_500_000), (20, 6_000_000)):
            bed.set_rate(uplink_mbps=mbps, downlink_mbps=50)
            bed.run("edge", [PY, "-c", SOURCE, bed.cloud_addr, str(PORT), str(size)])
            total, seconds = sink.stdout.readline().split()
            assert int(total) == size
            measured[mbps] = int(total) * 8 / float(seconds) / 1e6
        sink.wait(timeout=10)
    print(f"measured uplink goodput: {measured}")
    for mbps, got in measured.items():
        assert got == pytest.approx(mbps, rel=0.20), measured


@needs_netns
def test_relay_across_namespaces_adds_delay_on_the_shaped_path():
    delay_ms = 15
    with Testbed(uplink_mbps=20, downlink_mbps=20) as bed:
        echo = bed.popen("cloud", [PY, "-c", ECHO, bed.cloud_addr, str(PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _ready(echo)
        with Relay((bed.cloud_addr, PORT), delay_ms=delay_ms, listen_netns=bed.edge_ns, target_netns=bed.cloud_ns) as rel:
            host, port = rel.address
            rtt_ms = float(bed.run("edge", [PY, "-c", PINGER, host, str(port)]).stdout)
    print(f"edge->relay->cloud RTT {rtt_ms:.1f} ms for delay {delay_ms} ms")
    assert rtt_ms == pytest.approx(2 * delay_ms, abs=5)


# -- teardown --------------------------------------------------------------


@needs_netns
@needs_cgroup
def test_teardown_removes_everything_when_the_body_raises():
    with pytest.raises(ValueError, match="body failed"):
        with Testbed(uplink_mbps=1) as bed, CpuQuota(0.5) as quota:
            sleeper = bed.popen("edge", ["sh", "-c", "echo ready; exec sleep 60"], cpu_quota=quota, stdout=subprocess.PIPE, text=True)
            _ready(sleeper)  # printed after the wrapper joined the group
            assert quota.pids() == [sleeper.pid]
            names, group = (bed.edge_ns, bed.cloud_ns), quota.path
            assert all(name in _namespaces() for name in names)
            raise ValueError("body failed")
    assert sleeper.wait(timeout=5) is not None
    listed = _namespaces()
    assert not any(name in listed for name in names)
    assert "tdm-edge" not in _root_links() and "tdm-cloud" not in _root_links()
    assert not group.exists()


@needs_netns
def test_teardown_after_a_failure_halfway_through_setup():
    name = f"tdm-clash-{id(object())}"
    subprocess.run(["ip", "netns", "add", f"{name}-cloud"], check=True)  # makes the second `ip netns add` fail
    try:
        with pytest.raises(netns.CommandError, match="netns add"):
            with Testbed(name=name):
                pass
        assert f"{name}-edge" not in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", f"{name}-cloud"], check=True)


# -- relay on loopback -----------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()
    server.server_close()


def _connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _assert_reset(address: tuple[str, int]) -> None:
    """The relay resets right after accepting: the RST may beat connect() or arrive at recv()."""
    with pytest.raises(ConnectionResetError):
        with _connect(address) as sock:
            sock.recv(1)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise EOFError(f"closed after {len(got)} of {n} bytes")
        got += chunk
    return bytes(got)


def _median_rtt_ms(sock: socket.socket, rounds: int = 9) -> float:
    rtts = []
    for _ in range(rounds):
        start = time.perf_counter()
        sock.sendall(b"p" * 16)
        _recv_exactly(sock, 16)
        rtts.append((time.perf_counter() - start) * 1000)
    return statistics.median(rtts)


def test_relay_rtt_is_twice_the_delay_and_changes_live(echo_server):
    assert relay.available() is None
    with Relay(echo_server, delay_ms=20) as rel, _connect(rel.address) as sock:
        at_20 = _median_rtt_ms(sock)
        rel.set_delay(5)
        _median_rtt_ms(sock, rounds=2)  # chunks stamped under the old delay drain first
        at_5 = _median_rtt_ms(sock)
    print(f"relay RTT: {at_20:.1f} ms at 20 ms delay, {at_5:.1f} ms at 5 ms")
    assert at_20 == pytest.approx(40, abs=5)
    assert at_5 == pytest.approx(10, abs=5)


def test_relay_is_pipelined_not_serialised(echo_server):
    """8 MB through a 20 ms relay takes far less than one delay per chunk would."""
    payload = bytes(range(256)) * (8 * 4096)
    with Relay(echo_server, delay_ms=20) as rel, _connect(rel.address) as sock:
        start = time.perf_counter()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = _recv_exactly(sock, len(payload))
        sender.join(timeout=10)
        seconds = time.perf_counter() - start
    assert echoed == payload
    assert seconds < 0.020 * len(payload) / relay.CHUNK_BYTES / 4, seconds


def test_stall_holds_data_and_resume_delivers_all(echo_server):
    payload = bytes(range(256)) * 1024  # 256 KiB: fits the relay's buffers, so sendall returns
    with Relay(echo_server, delay_ms=1) as rel, _connect(rel.address) as sock:
        rel.stall()
        sock.sendall(payload)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # nothing passes while stalled (bounded wait: a negative check)
        assert rel.open_connections == 1
        rel.resume()
        sock.settimeout(5)
        assert _recv_exactly(sock, len(payload)) == payload


def test_reset_gives_the_client_econnreset(echo_server):
    with Relay(echo_server) as rel, _connect(rel.address) as sock:
        sock.sendall(b"hi")
        assert _recv_exactly(sock, 2) == b"hi"
        assert rel.reset_all() == 1
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_drop_closes_quietly(echo_server):
    with Relay(echo_server) as rel, _connect(rel.address) as sock:
        sock.sendall(b"hi")
        assert _recv_exactly(sock, 2) == b"hi"
        assert rel.drop_all() == 1
        assert sock.recv(1) == b""


def test_refuse_resets_new_connections_until_lifted(echo_server):
    with Relay(echo_server) as rel:
        rel.refuse(True)
        _assert_reset(rel.address)
        rel.refuse(False)
        with _connect(rel.address) as sock:
            sock.sendall(b"ok")
            assert _recv_exactly(sock, 2) == b"ok"


def test_unreachable_target_resets_the_client():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()  # bound, not listening: connections are refused
        with Relay(dead) as rel:
            _assert_reset(rel.address)


def test_grpc_health_check_through_the_relay_survives_a_reset():
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Relay(("127.0.0.1", port), delay_ms=10) as rel:
            host, relay_port = rel.address
            with grpc.insecure_channel(f"{host}:{relay_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest()
                assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
                assert rel.reset_all() == 1
                # A call sent before the channel sees the reset dies with the connection
                # (UNAVAILABLE, "Stream removed"): gRPC retries only calls never sent. The
                # channel itself must reconnect, so the one after succeeds.
                for attempt in range(2):
                    try:
                        reply = stub.Check(request, timeout=5, wait_for_ready=True)
                        break
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE and attempt == 0, exc
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=None)


# -- CPU quota -------------------------------------------------------------

SPIN = ("import time; t, c = time.perf_counter(), time.process_time(); sum(i * i for i in range(3_000_000)); "
        "print(time.perf_counter() - t, time.process_time() - c)")


def _spin_seconds(argv: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one single-threaded CPU-bound loop."""
    wall, cpu_s = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout.split()
    return float(wall), float(cpu_s)


@needs_cgroup
def test_cpu_quota_slows_cpu_bound_work_and_is_removed():
    # Wall over CPU time: a busy machine slows the free loop as well, but only
    # a quota of 0.25 CPU holds a loop to at most 0.25 s of CPU per second.
    free_wall, free_cpu = _spin_seconds([PY, "-c", SPIN])
    with CpuQuota(0.25) as quota:
        wall, cpu_s = _spin_seconds(quota.wrap([PY, "-c", SPIN]))
        path = quota.path
        assert path.exists()
    print(f"CPU-bound loop: {free_wall:.2f} s wall / {free_cpu:.2f} s CPU free, {wall:.2f} / {cpu_s:.2f} at 0.25 CPU")
    assert wall / cpu_s > 3.0  # 4.0 if the quota binds exactly; periods at the edges count less
    assert not path.exists()


@needs_cgroup
def test_cpu_quota_moves_members_out_before_removal():
    with CpuQuota(0.5) as quota:
        proc = subprocess.Popen(["sleep", "30"])
        quota.add(proc.pid)
        assert quota.pids() == [proc.pid]
        quota.set(1.5)
        path = quota.path
    try:
        assert not path.exists()
        own = Path(f"/proc/{proc.pid}/cgroup").read_text()
        assert path.name not in own
    finally:
        proc.kill()
        proc.wait(timeout=5)
