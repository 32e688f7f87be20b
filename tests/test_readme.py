"""The README's "Using it" section, run as a newcomer copies it: the daemons
it starts, every offload-tune line and the SDK example. Only the ports
differ (the test takes free ones), so a README that drifts from the code
fails here instead of in a new user's first hour."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

README = Path(__file__).resolve().parent.parent / "README.md"
README_PORTS = ("50051", "50052", "8000")  # the agent's, the node's and the agent's HTTP port, as the README writes them


def section_blocks(section: str, language: str) -> list[str]:
    body = README.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def serving(address: str, timeout_s: float) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s,
                                                          wait_for_ready=True)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


class Section:
    """A README section run as written, on free ports instead of the ones it names."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name, self.tmp_path = name, tmp_path
        self.ports = {port: free_port() for port in README_PORTS}
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.daemons: list[subprocess.Popen] = []

    def ours(self, text: str) -> str:
        for written, free in self.ports.items():
            text = text.replace(written, free)
        return text

    def start(self, block: str) -> None:
        """Run the block's commands; those ending in ``&`` stay running as daemons, awaited until serving."""
        for line in self.ours(block).splitlines():
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            if argv[-1] == "&":
                with open(self.tmp_path / f"{argv[0]}.log", "wb") as log:  # the child keeps its own descriptor
                    self.daemons.append(subprocess.Popen(argv[:-1], cwd=self.tmp_path, env=self.env, stdout=log,
                                                         stderr=subprocess.STDOUT))
            else:
                done = subprocess.run(argv, cwd=self.tmp_path, env=self.env, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, (line, done.stderr[-2000:])
        assert len(self.daemons) == 2, f"the {self.name} section starts a node and an agent"
        for port in (self.ports["50051"], self.ports["50052"]):
            serving(f"127.0.0.1:{port}", timeout_s=300)

    def run_python(self, block: str) -> str:
        done = subprocess.run([sys.executable, "-c", self.ours(block)], cwd=self.tmp_path, env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def test_the_using_it_section_runs_as_written(tmp_path: Path) -> None:
    section = Section("Using it", tmp_path)
    start, tune = section_blocks("Using it", "sh")[:2]
    (example,) = section_blocks("Using it", "python")
    env, ours = section.env, section.ours
    try:
        section.start(start)
        for line in ours(tune).splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, (line, done.stdout[-2000:], done.stderr[-2000:])
        assert (tmp_path / "sweep.png").stat().st_size > 0 and (tmp_path / "policy.toml").stat().st_size > 0
        assert section.run_python(example).strip(), "the generation printed its tokens"
    finally:
        section.stop()


def test_the_openai_and_kserve_section_runs_as_written(tmp_path: Path) -> None:
    section = Section("From OpenAI and KServe clients", tmp_path)
    (start,) = section_blocks(section.name, "sh")
    (example,) = section_blocks(section.name, "python")
    try:
        section.start(start)
        printed = section.run_python(example).splitlines()
        assert printed[-1] == "(1, 1000) split:13", printed
    finally:
        section.stop()
