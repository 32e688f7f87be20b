"""What offload-tune plans with: one model on one board, a cloud, any link.

The board's per-segment times are this host's measured profile scaled by
the roofline (``runtimes.profiler.predicted_for``) unless the board is this
host; the cloud's are a running node's own measurement (``--cloud``) or,
without one, this host's (said in every output). Codec speed is this host's,
scaled by the board's memory bandwidth: encoding a tensor is a pass over
memory. Everything the agent would decide, ``decide`` decides with the same
partitioner, so the tool and the agent cannot disagree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from devices.detect import detect_board
from devices.profiles import RADIOS, DeviceProfile, get_device, measure_host
from edge_agent.offload import CloudNodeClient
from partitioner.costmodel import CloudOption, Decision, Link, ModelCosts, Power, choose
from partitioner.planning import CodecSpeed, cloud_option, model_costs, power_of, profiled_shapes
from partitioner.policy import Policy
from partitioner.profile import ModelProfile
from partitioner.shapes import ShapeError, profile_candidates
from partitioner.work import Work, concrete_shapes, node_work, segment_work
from protos import tandem_pb2 as pb
from runtimes.model_store import load_failure_reason, unreadable_reason
from runtimes.onnx_exec import OnnxModel
from runtimes.profile_book import memory_budget
from runtimes.profiler import ProfilingError, measure_codec_speed, model_proto, predicted_for, profile_first_fitting
from runtimes.tls import TlsFiles, channel_credentials

# Round trip assumed when none is given or measured: an assumption for the
# sweep's shape, not a reference figure (measure yours: offload-tune link).
DEFAULT_RTT_MS = 20.0


class ToolError(Exception):
    """Bad input to offload-tune: printed as is, exit code 2."""


def load_model(path: Path, *, whole_ok: bool = False) -> OnnxModel:
    """The model at ``path``; ToolError naming the file for anything that is
    not a usable model (checked without opening pipes or devices), and for
    one that cannot be cut unless the caller plans it whole."""
    reason = unreadable_reason(path)
    if reason is None:
        try:
            model = OnnxModel(path.stem, path)
        except Exception as exc:  # noqa: BLE001 -- onnx, onnxruntime and the OS refuse a file in many ways
            reason = load_failure_reason(exc, path)
    if reason is not None:
        raise ToolError(f"{path}: {reason}")
    if model.cut_error and not whole_ok:
        raise ToolError(f"{model.name} cannot be split: {model.cut_error}. It can still run LOCAL or REMOTE: "
                        "pass --whole to plan it as one segment.")
    return model


def device_named(name: str) -> DeviceProfile:
    try:
        return get_device(name)
    except ValueError as exc:
        raise ToolError(str(exc)) from None


def segment_works(model: OnnxModel, shapes: dict[str, tuple[int, ...]]) -> tuple[Work, ...]:
    """Each segment's work at the input shapes it was profiled at."""
    if model.graph is None:
        return (Work(0.0, 0.0, unknown=1),)
    return segment_work(model.graph, node_work(model.graph.model, concrete_shapes(model.graph.model, shapes)))


@dataclass(frozen=True)
class Board:
    """A model's profile as measured here and as the board would run it."""

    model: OnnxModel
    device: DeviceProfile
    measured: ModelProfile     # on this host
    profile: ModelProfile      # on the board (the measured one when the board is this host)
    works: tuple[Work, ...]

    @property
    def predicted(self) -> bool:
        return self.profile is not self.measured


def profile_board(model: OnnxModel, device: DeviceProfile, on_progress: Callable[[int, int], None] | None = None, *,
                  shapes: dict[str, tuple[int, ...]] | None = None) -> Board:
    """The model profiled at ``shapes`` (default: its declared shapes, else the
    conventional ones tried in turn, as the daemons do) and predicted for ``device``."""
    try:
        candidates = profile_candidates(model_proto(model), configured=shapes)
    except ShapeError as exc:
        raise ToolError(f"{model.path}: {exc}") from None
    try:
        measured, _ = profile_first_fitting(model, candidates, budget_bytes=memory_budget(0, device.memory_bytes),
                                            on_progress=on_progress)
    except ProfilingError as exc:
        raise ToolError(f"{model.path}: {exc}") from None
    here = device.name == "host" or device.name == detect_board()
    profile = measured if here else predicted_for(device, model, measured)
    return Board(model, device, measured, profile, segment_works(model, profiled_shapes(measured)))


@functools.cache
def _host_codec_speed() -> dict[int, CodecSpeed]:
    """Measured once per run: write-policy plans several models with it."""
    return measure_codec_speed()


def device_codec_speed(device: DeviceProfile, encoding: int) -> CodecSpeed:
    speed = _host_codec_speed()[encoding]
    if device.name == "host":
        return speed
    ratio = device.mem_bandwidth_gbs / measure_host().mem_bandwidth_gbs
    return CodecSpeed(speed.encode_mb_s * ratio, speed.decode_mb_s * ratio)


@dataclass(frozen=True)
class Scenario:
    """Everything but the link: decide for any bandwidth."""

    board: Board
    costs: ModelCosts
    cloud: ModelProfile
    cloud_source: str          # where the cloud's times come from, in words
    power: Power
    policy: Policy
    rtt_ms: float
    downlink_mbps: float | None  # None: the same as the uplink

    def link(self, uplink_mbps: float) -> Link:
        return Link(uplink_mbps=uplink_mbps, downlink_mbps=self.downlink_mbps or uplink_mbps, rtt_ms=self.rtt_ms)

    def cloud_at(self, uplink_mbps: float) -> CloudOption:
        return cloud_option("cloud", self.cloud, link=self.link(uplink_mbps), queue_ms=0.0)

    def decide(self, uplink_mbps: float) -> Decision:
        return choose(self.costs, [self.cloud_at(uplink_mbps)], self.power, objective=self.policy.objective,
                      weight_latency=self.policy.weight_latency, constraints=self.policy.constraints)

    def winner(self, uplink_mbps: float) -> str:
        decision = self.decide(uplink_mbps)
        chosen = decision.winner or decision.best_effort
        return chosen.label if chosen else "none"


def scenario(board: Board, policy: Policy, *, rtt_ms: float = DEFAULT_RTT_MS, downlink_mbps: float | None = None,
             radio: str | None = None, cloud: tuple[ModelProfile, str] | None = None) -> Scenario:
    power = power_of(board.device if radio is None else replace(board.device, radio=RADIOS[radio]))
    costs = model_costs(board.profile, encoding=policy.encoding, speed=device_codec_speed(board.device, policy.encoding),
                        output_encoding=pb.ENCODING_RAW)
    cloud_profile, source = cloud or (board.measured, "this host's measured profile (no --cloud node given)")
    if cloud_profile.num_segments != board.profile.num_segments:
        raise ToolError(f"the cloud's profile of {board.model.name} has {cloud_profile.num_segments} segments, "
                        f"this one {board.profile.num_segments}: not the same model file")
    return Scenario(board, costs, cloud_profile, source, power, policy, rtt_ms, downlink_mbps)


def break_even_points(sc: Scenario, bandwidths: list[float], *, steps: int = 40) -> list[dict]:
    """Where the chosen plan changes between neighbouring bandwidths, found by
    bisection in log-bandwidth to within 0.1 %."""
    points = []
    ordered = sorted(bandwidths)
    for low, high in zip(ordered, ordered[1:]):
        below, above = sc.winner(low), sc.winner(high)
        if below == above:
            continue
        lo, hi = math.log(low), math.log(high)
        for _ in range(steps):
            mid = (lo + hi) / 2
            if sc.winner(math.exp(mid)) == below:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-3:
                break
        points.append({"mbps": math.exp(hi), "from": below, "to": sc.winner(math.exp(hi))})
    return points



def node_credentials(args) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """TLS credentials from --tls-ca/--tls-cert/--tls-key (a device's, as the
    agent holds them), or none for a plaintext lab node; ToolError if half given."""
    files = [getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key")]
    if not any(files):
        return None, None
    if not all(files):
        raise ToolError("--tls-ca, --tls-cert and --tls-key go together (tandem-certs creates them)")
    try:
        ca, cert, key = TlsFiles(*(Path(f) for f in files)).load()
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    return channel_credentials(ca, cert, key), getattr(args, "tls_name", None)


async def reach_node(address: str, args=None) -> CloudNodeClient:
    """A cloud node's state, profiles and measured link, or ToolError."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ToolError(f"{address!r} is not HOST:PORT")
    credentials, name = node_credentials(args)
    node = CloudNodeClient(address, max_message_mb=64, credentials=credentials, node_name=name)
    try:
        state = await node.refresh(timeout_s=5.0, measure_link=True)
    finally:
        await node.close()
    if not state.reachable:
        raise ToolError(f"cloud node {address} unreachable: {state.error}")
    return node
