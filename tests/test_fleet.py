"""Several cloud nodes: discovery on loopback, mutual TLS, load-aware choice, node loss."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_agent import sdk
from offload_tune.cli import main as tune
from pki import certs
from protos import codec
from protos import tandem_pb2 as pb
from protos import tandem_pb2_grpc as pb_grpc
from runtimes import launch

LOOPBACK_ADVERT = ["--advertise", "true", "--advertise-interfaces", "127.0.0.1"]
# The link is given, not probed: two nodes on loopback are then predicted equal,
# as two nodes on one LAN would be, instead of differing by probe noise.
LOOPBACK_BROWSE = ["--discovery", "true", "--discover-plaintext", "true", "--discovery-interfaces", "127.0.0.1", "--forget-after-s", "1",
                   "--refresh-s", "0.5", "--uplink-mbps", "1000", "--downlink-mbps", "1000", "--rtt-ms", "1"]


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 224, 224)).astype(np.float32)


def wait_for(condition, what: str, tries: int = 100, pause_s: float = 0.1):
    """Poll ``condition`` a bounded number of times; its last truthy value, else fail naming ``what``."""
    for _ in range(tries):
        value = condition()
        if value:
            return value
        time.sleep(pause_s)
    pytest.fail(f"timed out waiting for {what}")


def offload_nodes(client: sdk.EdgeClient, model: str = "mobilenet") -> set[str]:
    return {c.node for c in client.explain(model).candidates if c.plan != "local"}


def test_discovered_nodes_join_leave_and_no_request_is_lost(model_dir: Path) -> None:
    x = image()
    expected = None
    with launch.cloud_node(model_dir, *LOOPBACK_ADVERT, "--node-id", "node-a") as a, \
            launch.cloud_node(model_dir, *LOOPBACK_ADVERT, "--node-id", "node-b") as b, \
            launch.edge_agent(model_dir, [], *LOOPBACK_BROWSE) as agent, sdk.EdgeClient(agent.address) as client:
        wait_for(lambda: offload_nodes(client) == {a.address, b.address}, "both adverts in the table")
        assert "discovered node node-a" in agent.log() and "discovered node node-b" in agent.log()
        expected = client.infer("mobilenet", {"input": x}, plan="local").outputs["logits"]
        with ThreadPoolExecutor(8) as pool:  # equal nodes share a concurrent load
            results = list(pool.map(lambda _: client.infer("mobilenet", {"input": x}, plan="remote"), range(24)))
        for result in results:
            np.testing.assert_allclose(result.outputs["logits"], expected, rtol=1e-5, atol=1e-5)
        assert {r.node for r in results} == {a.address, b.address}
        a.kill()  # no goodbye: the agent must notice by itself
        for i in range(20):  # every request is answered, by b or (at worst) locally, never lost
            result = client.infer("mobilenet", {"input": x}, plan="remote")
            np.testing.assert_allclose(result.outputs["logits"], expected, rtol=1e-5, atol=1e-5)
            assert result.node in ("", b.address)
        wait_for(lambda: offload_nodes(client) == {b.address}, "the killed node to leave the table")
        assert client.infer("mobilenet", {"input": x}, plan="remote").node == b.address
        b.stop()  # a clean stop withdraws the advert
        wait_for(lambda: not offload_nodes(client), "the stopped node to leave the table")
        assert client.infer("mobilenet", {"input": x}).plan == "local"


def test_a_node_with_a_long_queue_gets_no_work_while_another_is_free(model_dir: Path) -> None:
    x = image(1)
    with launch.cloud_node(model_dir, "--max-concurrency", "1", "--max-queue", "64") as busy, \
            launch.cloud_node(model_dir) as free, \
            launch.edge_agent(model_dir, [busy.address, free.address], "--refresh-s", "0.3") as agent, \
            sdk.EdgeClient(agent.address) as client, grpc.insecure_channel(busy.address) as channel:
        stub = pb_grpc.CloudNodeStub(channel)
        digest = next(m.digest for m in stub.Status(pb.StatusRequest(), timeout=5).models if m.name == "resnet")
        from protos import codec

        heavy = pb.ModelRequest(model="resnet", model_digest=digest,
                                inputs=[codec.encode(np.zeros((16, 3, 224, 224), np.float32), "input")])
        with ThreadPoolExecutor(8) as pool:  # another tenant keeps the busy node's one worker queued up
            futures = [pool.submit(stub.RunModel, heavy, timeout=120) for _ in range(12)]
            wait_for(lambda: stub.Status(pb.StatusRequest(), timeout=5).load.queue_delay_ms > 50, "a measured queue")

            def busy_predicted_slower() -> bool:  # the agent's status refresh has seen the queue
                remote = {c.node: c.predicted["total_ms"] for c in client.explain("mobilenet").candidates if c.plan == "remote"}
                return remote[busy.address] > 1.2 * remote[free.address]

            wait_for(busy_predicted_slower, "the busy node's queue in the agent's prediction")
            nodes = {client.infer("mobilenet", {"input": x}, plan="remote").node for _ in range(5)}
            for f in futures:
                f.result()
        assert nodes == {free.address}


def make_pki(directory: Path) -> dict[str, Path]:
    """A deployment CA with one node and two devices, plus a foreign CA's device."""
    ca_cert, ca_key = certs.create_ca("test deployment")
    other_cert, other_key = certs.create_ca("someone else")
    files = {}
    for stem, (cert, key) in {
        "ca": (ca_cert, ca_key),
        "node": certs.create_node(ca_cert, ca_key, "node-1", ["127.0.0.1"]),
        "rogue": certs.create_node(other_cert, other_key, "node-1", ["127.0.0.1"]),
        "device": certs.create_device(ca_cert, ca_key, "pi-kitchen"),
        "revoked": certs.create_device(ca_cert, ca_key, "pi-stolen"),
        "foreign": certs.create_device(other_cert, other_key, "pi-kitchen"),
    }.items():
        certs.write_pair(directory, stem, cert, key)
        files[stem] = directory / f"{stem}.crt"
    return files


def tls_args(files: dict[str, Path], who: str) -> list[str]:
    return ["--tls-ca", str(files["ca"]), "--tls-cert", str(files[who]), "--tls-key", str(files[who].with_suffix(".key"))]


def call_status(address: str, files: dict[str, Path], device: str | None) -> grpc.StatusCode:
    ca = files["ca"].read_bytes()
    key = files[device].with_suffix(".key").read_bytes() if device else None
    cert = files[device].read_bytes() if device else None
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [("grpc.ssl_target_name_override", "node-1")]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        try:
            pb_grpc.CloudNodeStub(channel).Status(pb.StatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_mutual_tls_admits_only_the_deployments_devices(tmp_path: Path, model_dir: Path, capsys) -> None:
    files = make_pki(tmp_path)
    serial = certs.identity(files["revoked"].read_bytes())[1]
    with launch.cloud_node(model_dir, *tls_args(files, "node"), "--deny", "pi-stolen") as node:
        assert call_status(node.address, files, "device") == grpc.StatusCode.OK
        assert call_status(node.address, files, None) == grpc.StatusCode.UNAVAILABLE       # no certificate
        assert call_status(node.address, files, "foreign") == grpc.StatusCode.UNAVAILABLE  # another CA
        assert call_status(node.address, files, "revoked") == grpc.StatusCode.PERMISSION_DENIED
        # an agent holding the device certificate is served end to end
        with launch.edge_agent(model_dir, [node.address], *tls_args(files, "device")) as agent, \
                sdk.EdgeClient(agent.address) as client:
            result = client.infer("mobilenet", {"input": image()}, plan="remote")
            assert result.plan == "remote" and not result.fell_back
        assert "PLAINTEXT" not in node.log()
        # offload-tune reaches a TLS node with a device's certificate
        assert tune(["link", node.address, *tls_args(files, "device"), "--tls-name", "node-1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["node_id"] == "node-1"
    # revoking by serial works as well
    with launch.cloud_node(model_dir, *tls_args(files, "node"), "--deny", serial) as node:
        assert call_status(node.address, files, "revoked") == grpc.StatusCode.PERMISSION_DENIED
        assert call_status(node.address, files, "device") == grpc.StatusCode.OK


def device_channel(address: str, files: dict[str, Path], device: str) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=files["ca"].read_bytes(),
                                               private_key=files[device].with_suffix(".key").read_bytes(),
                                               certificate_chain=files[device].read_bytes())
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "node-1"),
                                                               ("grpc.max_send_message_length", 1 << 28)])


def test_a_device_flooding_a_node_keeps_to_its_share_and_another_is_served_in_turn(tmp_path: Path,
                                                                                   model_dir: Path) -> None:
    files = make_pki(tmp_path)

    def request(batch: int) -> pb.ModelRequest:
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        return pb.ModelRequest(model="resnet", inputs=[codec.encode(x, "input")])

    # One long request holds the node's one slot while every shorter call
    # arrives, so who waits, who is refused and who goes next does not depend
    # on timing: batch 192 (110 MiB) on one onnxruntime thread, about 0.4 s of
    # compute here after its read (batch 96 on every thread, about 0.1 s, was
    # outlasted by the calls' arrival on an idle machine, 2 runs in 3). The
    # shorter ones (batch 8) still take long enough each that their replies
    # reach this process in the order the node served them.
    long, small = request(192), request(8)
    limits = ("--max-concurrency", "1", "--max-queue", "8", "--max-queue-per-device", "4", "--threads", "1",
              "--max-message-mb", "256")
    with launch.cloud_node(model_dir, *tls_args(files, "node"), *limits) as node, \
            device_channel(node.address, files, "device") as kitchen, device_channel(node.address, files, "revoked") as hall:
        flooder, other = pb_grpc.CloudNodeStub(kitchen), pb_grpc.CloudNodeStub(hall)
        flooder.RunModel(long, timeout=120)  # warm: the sessions exist before the flood
        other.Status(pb.StatusRequest(), timeout=30)  # and the other device's connection is up
        load = lambda: flooder.Status(pb.StatusRequest(), timeout=10).load  # noqa: E731
        first = flooder.RunModel.future(long, timeout=300)
        wait_for(lambda: load().in_flight == 1, "the long request running", tries=300)
        floods = [flooder.RunModel.future(small, timeout=300) for _ in range(7)]
        wait_for(lambda: sum(f.done() for f in floods) == 3, "3 of the flood refused at once", tries=300)
        assert load().queued == 4 and not first.done()
        others = [other.RunModel.future(small, timeout=300) for _ in range(2)]
        wait_for(lambda: load().queued == 6, "the other device's calls queued", tries=300)
        assert not first.done(), "the long request must still hold the slot: the order below depends on it"
        done: list[str] = []
        for name, calls in (("kitchen", [first, *floods]), ("hall", others)):
            for call in calls:
                call.add_done_callback(lambda f, name=name: done.append(name) if f.code() == grpc.StatusCode.OK else None)
        refused = [f for f in floods if f.exception() is not None]
        assert len(refused) == 3
        for call in refused:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "its share 4" in call.details(), call.details()
        assert all(call.exception() is None for call in others)  # the other device is never refused
        wait_for(lambda: len(done) == 7, "every admitted call answered", tries=300)
    # One slot serves them one at a time. First come first served would answer
    # the flood's 4 waiting calls before the other device's 2; in turn, the
    # other device's calls alternate with the flood's.
    assert done == ["kitchen", "hall", "kitchen", "hall", "kitchen", "kitchen", "kitchen"]


def test_a_spoofed_advert_is_never_used(tmp_path: Path, model_dir: Path) -> None:
    files = make_pki(tmp_path)
    with launch.cloud_node(model_dir, *tls_args(files, "node"), *LOOPBACK_ADVERT) as real, \
            launch.cloud_node(model_dir, *tls_args(files, "rogue"), *LOOPBACK_ADVERT, "--node-id", "node-1-rogue") as rogue:
        # the rogue node's certificate is another CA's: right service name, wrong certificate
        with launch.edge_agent(model_dir, [], *LOOPBACK_BROWSE, *tls_args(files, "device")) as agent, \
                sdk.EdgeClient(agent.address) as client:
            wait_for(lambda: offload_nodes(client) == {real.address}, "the real node in the table")
            wait_for(lambda: "ignoring advert node-1-rogue" in agent.log(), "the rogue advert to be refused")
            assert rogue.address not in offload_nodes(client)
            assert client.infer("mobilenet", {"input": image()}, plan="remote").node == real.address


def test_a_plaintext_agent_uses_no_discovered_node_unless_told(model_dir: Path) -> None:
    """Any host on the LAN can advertise: without TLS nothing shows it is ours."""
    at = LOOPBACK_BROWSE.index("--discover-plaintext")
    browse = LOOPBACK_BROWSE[:at] + LOOPBACK_BROWSE[at + 2:]
    with launch.cloud_node(model_dir, *LOOPBACK_ADVERT, "--node-id", "stranger") as stranger, \
            launch.edge_agent(model_dir, [], *browse) as agent, sdk.EdgeClient(agent.address) as client:
        wait_for(lambda: "ignoring advert stranger" in agent.log(), "the advert to be refused", tries=200)
        assert "runs plaintext, so nothing shows the advert is a node of ours" in agent.log()
        result = client.infer("mobilenet", {"input": image()}, plan="remote")
        assert result.fell_back and stranger.address not in offload_nodes(client)


def test_an_app_port_reachable_from_other_machines_needs_the_owners_say_so(model_dir: Path) -> None:
    refused = launch.Daemon("edge_agent.main", ["--listen", "0.0.0.0:0", "--models", str(model_dir), "--plaintext", "true",
                                                "--discovery", "false"])
    with pytest.raises(RuntimeError, match="exited with 2"):
        refused.wait_ready(timeout_s=60)
    assert "no authentication" in refused.log() and "listen_anywhere" in refused.log()
    refused.stop()


def test_plaintext_is_explicit_and_loud(tmp_path: Path, model_dir: Path) -> None:
    with launch.cloud_node(model_dir) as node:  # launch passes --plaintext true for tests
        assert "PLAINTEXT" in node.log()
    refused = launch.Daemon("cloud_node.main", ["--listen", "127.0.0.1:0", "--models", str(model_dir)])
    with pytest.raises(RuntimeError, match="exited with 2"):
        refused.wait_ready(timeout_s=60)
    assert "needs tls_ca, tls_cert and tls_key" in refused.log()
    refused.stop()


def test_a_node_stopping_mid_burst_loses_no_request(model_dir: Path) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait

    x = image(2)
    with launch.cloud_node(model_dir, *LOOPBACK_ADVERT, "--node-id", "node-c", "--grace-s", "20") as c, \
            launch.cloud_node(model_dir, *LOOPBACK_ADVERT, "--node-id", "node-d") as d, \
            launch.edge_agent(model_dir, [], *LOOPBACK_BROWSE, "--max-concurrency", "8") as agent, \
            sdk.EdgeClient(agent.address, timeout=60) as client:
        wait_for(lambda: offload_nodes(client, "resnet") == {c.address, d.address}, "both nodes in the table")
        expected = client.infer("resnet", {"input": x}, plan="local").outputs["logits"]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client.infer, "resnet", {"input": x}, plan="remote") for _ in range(16)]
            wait(futures, timeout=60, return_when=FIRST_COMPLETED)
            c.stop()  # withdraws its advert, then drains what it accepted
            results = [f.result() for f in futures]  # a lost request would raise DeadlineExceeded here
        for result in results:
            np.testing.assert_allclose(result.outputs["logits"], expected, rtol=1e-5, atol=1e-5)
        assert {r.node for r in results} <= {c.address, d.address, ""}


def test_a_node_known_statically_and_by_advert_is_one_entry(model_dir: Path) -> None:
    with launch.cloud_node(model_dir, *LOOPBACK_ADVERT, "--node-id", "node-e") as e:
        static = "localhost:" + e.address.rpartition(":")[2]  # another name for the same node
        with launch.edge_agent(model_dir, [static], *LOOPBACK_BROWSE) as agent, sdk.EdgeClient(agent.address) as client:
            wait_for(lambda: "already in the table" in agent.log(), "the advert matched to the static entry")
            assert offload_nodes(client) == {static}


def test_an_advert_lists_every_address_in_order() -> None:
    from edge_agent.discovery import parse_advert

    advert = parse_advert("n._tandem._tcp.local.", ["10.9.9.9", "127.0.0.1"], 50052,
                          {b"v": b"1", b"id": b"n", b"models": b"a,b,...", b"fp": b""})
    assert advert.addresses == ("10.9.9.9:50052", "127.0.0.1:50052") and advert.address == "10.9.9.9:50052"
    assert advert.models == ("a", "b")
    assert parse_advert("old", ["127.0.0.1"], 1, {b"v": b"0"}) == "protocol version '0', this agent speaks 1"
