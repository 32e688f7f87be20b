"""Start a daemon as a child process and wait until it serves.

Used by the demo, the benchmarks and the tests: each starts real
``cloud-node`` / ``edge-agent`` processes on loopback with port 0, learns the
bound address from the ready file, and waits for grpc.health SERVING.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

START_TIMEOUT_S = 300.0  # first start profiles every model


class Daemon:
    def __init__(self, module: str, args: list[str], *, env: dict[str, str] | None = None, log_path: Path | None = None,
                 wrap: Callable[[list[str]], list[str]] | None = None, check_health: bool = True) -> None:
        """``wrap`` turns the daemon's argv into the one to run (inside a network
        namespace, under a CPU quota: see ``emulation``);
        ``check_health`` False when this process cannot reach the daemon's
        address (another network namespace): the ready file, written once the
        daemon serves, is then the readiness signal."""
        self.module = module
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-daemon-")
        self.ready_file = Path(self._tmp.name) / "ready.json"
        self.log_path = log_path or Path(self._tmp.name) / "daemon.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            (wrap or list)([sys.executable, "-m", module, *args, "--ready-file", str(self.ready_file)]),
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.address = ""
        self.ready: dict = {}  # the ready file: address, pid, and the metrics and HTTP URLs where served
        self.check_health = check_health

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "Daemon":
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.module} not ready after {timeout_s:.0f} s:\n{self.log()}")
            time.sleep(0.05)
        self.ready = json.loads(self.ready_file.read_text())
        self.address = self.ready["address"]
        if not self.check_health:
            return self
        with grpc.insecure_channel(self.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=max(deadline - time.monotonic(), 1.0), wait_for_ready=True
            )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{self.module} at {self.address} reports {reply.status}")
        return self

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """Die abruptly, as a crashed or unplugged node would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        self._tmp.cleanup()
        return self.process.returncode

    def __enter__(self) -> "Daemon":
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def lab_defaults(extra: tuple[str, ...], *, announce: str) -> list[str]:
    """Tests and the demo run plaintext and keep off the network's multicast
    unless the caller says otherwise (TLS files, ``--advertise``/``--discovery``)."""
    defaults = []
    if not any(arg.startswith(("--tls-", "--plaintext")) for arg in extra):
        defaults += ["--plaintext", "true"]
    if not any(arg.startswith(announce) for arg in extra):
        defaults += [announce, "false"]
    return defaults


def cloud_node(models: Path, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    # A TLS node admits device certificates only: the ready file is the signal then.
    tls = any(arg.startswith("--tls-") for arg in extra)
    return Daemon("cloud_node.main", ["--listen", "127.0.0.1:0", "--models", str(models),
                                      *lab_defaults(extra, announce="--advertise"), *extra], env=env, check_health=not tls)


def edge_agent(models: Path, clouds: list[str], *extra: str, env: dict[str, str] | None = None) -> Daemon:
    cloud_args = [arg for address in clouds for arg in ("--cloud", address)]
    return Daemon("edge_agent.main", ["--listen", "127.0.0.1:0", "--models", str(models), *cloud_args,
                                      *lab_defaults(extra, announce="--discovery"), *extra], env=env)


def wait_profiled(client, model: str, shape: tuple[int, ...] | list[int], *, timeout_s: float = 300.0) -> None:
    """Wait until the agent behind ``client`` (an ``edge_agent.sdk.EdgeClient``) lists
    ``model`` as profiled at ``shape`` (its first input): readiness, not a sleep.
    Shapes a request taught it are profiled off the request path, after the reply."""
    wanted = list(shape)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = next(m for m in client.models() if m.name == model)
        if any(list(p.inputs[0].shape) == wanted for p in info.profiled):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{model} was not profiled at {wanted} within {timeout_s:.0f} s")
