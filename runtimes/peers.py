"""Real third-party servers Tandem interoperates with, started on loopback for
tests and benchmarks: NVIDIA Triton (the build the ``nvidia-pytriton`` wheel
bundles, CPU, serving ONNX through onnxruntime in its Python backend) and
llama-cpp-python's OpenAI-compatible server.

pytriton pins numpy < 2, so it lives in a virtualenv of its own
(``make peers`` builds ``.venv-triton``; ``TANDEM_TRITON_PYTHON`` names
another interpreter) and runs ``tests/peers/pytriton_onnx.py``.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRITON_SCRIPT = ROOT / "tests" / "peers" / "pytriton_onnx.py"
TRITON_START_TIMEOUT_S = 180.0  # Triton loads every model's Python stub at start


class PeerUnavailable(RuntimeError):
    """The peer cannot run on this machine; the message says what is missing."""


def triton_python() -> Path:
    named = os.environ.get("TANDEM_TRITON_PYTHON")
    python = Path(named) if named else ROOT / ".venv-triton" / "bin" / "python"
    if not python.exists() or not (named or (ROOT / ".venv-triton" / ".installed").exists()):
        raise PeerUnavailable(f"no Triton virtualenv at {python} (make peers builds it; TANDEM_TRITON_PYTHON names "
                              "another interpreter with nvidia-pytriton, onnxruntime and onnx)")
    return python


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _PeerProcess:
    """A peer server as a child in its own session (a kill reaches its
    children too), logging into a temporary directory removed on stop."""

    name = "peer"

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"tandem-{self.name}-")
        self.home = Path(self._tmp.name)
        self.log_path = self.home / "server.log"
        self._log = open(self.log_path, "wb")
        self._killed = False

    def _start(self, argv: list[str], *, stdout: int | None = None, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(argv, stdout=stdout or self._log, stderr=self._log if stdout else subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, **(env or {})})

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Die abruptly, with every child, as a crashed host would."""
        self._signal(signal.SIGKILL)
        self._killed = True
        self.process.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # whatever of the group is left
        self.process.wait()
        self._cleanup()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        self._tmp.cleanup()

    def _cleanup(self) -> None:
        """What the server leaves outside its directory."""

    def wait_ready(self, timeout_s: float):
        raise NotImplementedError

    def __enter__(self):
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TritonPeer(_PeerProcess):
    """A Triton serving ``repository`` (the layout offload-tune export-suffixes writes)."""

    name = "triton"

    def __init__(self, repository: Path, *, delay_ms: float = 0.0) -> None:
        """``delay_ms``: added to every request's compute, for a slower server."""
        python = triton_python()
        super().__init__()
        self.grpc_port, self.http_port = free_port(), free_port()
        self._shm_before = set(Path("/dev/shm").glob("psm_*"))
        self._start([str(python), str(TRITON_SCRIPT), "--repository", str(repository), "--grpc-port", str(self.grpc_port),
                     "--http-port", str(self.http_port), "--delay-ms", str(delay_ms), "--workspace", str(self.home / "ws")],
                    stdout=subprocess.PIPE, env={"PYTRITON_HOME": str(self.home / "home")})
        self.address = f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout_s: float = TRITON_START_TIMEOUT_S) -> "TritonPeer":
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(timeout=0.5):
                    line = self.process.stdout.readline().decode(errors="replace")
                    if line.startswith("READY"):
                        return self
                    if not line:  # stdout closed: it exited
                        break
        self.stop()
        raise RuntimeError(f"Triton did not start within {timeout_s:.0f} s (exit {self.process.returncode}):\n{self.log()}")

    def _cleanup(self) -> None:
        # A killed pytriton leaves its models' shared memory behind: its own named by its pid,
        # its proxies' by multiprocessing (psm_*, no pid: those that appeared while it ran).
        leftovers = set(Path("/dev/shm").glob(f"pytrtion{self.process.pid}-*"))
        if self._killed:
            leftovers |= set(Path("/dev/shm").glob("psm_*")) - self._shm_before
        for segment in leftovers:
            segment.unlink(missing_ok=True)


class LlamaServerPeer(_PeerProcess):
    """llama-cpp-python's own OpenAI-compatible server (``python -m
    llama_cpp.server``, its [server] extra) serving a GGUF as ``alias``."""

    name = "llama-server"

    def __init__(self, model: Path, *, alias: str, threads: int = 1, ctx: int = 2048, api_key: str | None = None) -> None:
        try:
            import llama_cpp.server  # noqa: F401 -- only to say what is missing
        except ImportError as exc:
            raise PeerUnavailable(f"llama-cpp-python's server is not installed ({exc}): "
                                  "pip install 'llama-cpp-python[server]'") from None
        super().__init__()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._start([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", alias,
                     "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", str(threads),
                     "--n_ctx", str(ctx), "--verbose", "False", *(["--api_key", api_key] if api_key else [])])

    def wait_ready(self, timeout_s: float = 120.0) -> "LlamaServerPeer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=1.0) as reply:
                    if reply.status == 200:
                        return self
            except urllib.error.HTTPError:
                return self  # it answers (401 without its key)
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not start within {timeout_s:.0f} s:\n{self.log()}")
