"""A real NVIDIA Triton server serving ONNX models, for the OIP (KServe v2) node tests.

Tandem's cloud node speaks the Open Inference Protocol; these tests need a genuine
third-party peer on loopback rather than our own implementation talking to itself.
This script runs the tritonserver binary bundled in the ``nvidia-pytriton`` wheel
(CPU only, Python backend) and serves every model of a Triton-style repository
(``DIR/<name>/<version>/model.onnx``, highest numeric version; config.pbtxt ignored)
through onnxruntime.

It runs under its OWN virtualenv (pytriton pins numpy<2), so it imports only the
stdlib, numpy, onnx, onnxruntime and pytriton::

    python tests/peers/pytriton_onnx.py --repository DIR --grpc-port N --http-port M \
        [--metrics-port K] [--access-token T] [--workspace W]

It binds 127.0.0.1 only, prints ``READY grpc=N http=M`` on stdout once every model is
loaded, logs to stderr (tritonserver's own log included) and stops on SIGTERM/SIGINT.
Without --access-token no Triton endpoint is restricted; with it, pytriton's default
set (statistics, model-repository, shared-memory, trace, logging) needs the header
``triton-access-token: T`` over HTTP and ``triton-grpc-protocol-triton-access-token: T``
over gRPC. Stop it with SIGTERM (a few seconds, cleans up). For a hard kill start it
with start_new_session=True and SIGKILL the process group: a SIGKILL of this process
alone leaves tritonserver running until its PR_SET_PDEATHSIG SIGTERM shutdown ends.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy, TritonSecurityConfig

logger = logging.getLogger("pytriton_onnx")

_NP_DTYPES: dict[int, type[np.generic]] = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}

InferFunc = Callable[[list[Any]], list[dict[str, np.ndarray]]]


def find_models(repository: Path) -> dict[str, tuple[int, Path]]:
    """Name -> (highest numeric version, its model.onnx) for every model directory in repository."""
    models: dict[str, tuple[int, Path]] = {}
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = [int(v.name) for v in model_dir.iterdir() if v.name.isdigit() and (v / "model.onnx").is_file()]
        if versions:
            models[model_dir.name] = (max(versions), model_dir / str(max(versions)) / "model.onnx")
        else:
            logger.warning("skipping %s: no <version>/model.onnx", model_dir)
    return models


def tensors(values: Sequence[onnx.ValueInfoProto]) -> list[Tensor]:
    """pytriton tensors with the ONNX names, dtypes and shapes (-1 for every non-fixed dimension)."""
    out = []
    for value in values:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in _NP_DTYPES:
            raise ValueError(f"{value.name}: unsupported ONNX element type {tensor_type.elem_type}")
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim)
        out.append(Tensor(name=value.name, dtype=_NP_DTYPES[tensor_type.elem_type], shape=shape))
    return out


def make_infer(path: Path, delay_s: float = 0.0) -> InferFunc:
    """An unbatched pytriton callable: a list of requests in, one dict of all outputs per request out;
    ``delay_s`` more per request, to stand for a slower (busier, older) server."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        if delay_s:
            time.sleep(delay_s * len(requests))
        return [dict(zip(names, session.run(names, dict(request.items())))) for request in requests]

    return infer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True, help="DIR/<name>/<version>/model.onnx")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here (default: off)")
    parser.add_argument("--access-token", help="restrict pytriton's default endpoints to this token (default: none)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added to every request's compute (a slower server)")
    parser.add_argument("--workspace", type=Path, help="pytriton workspace (default: a new dir in $PYTRITON_HOME)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    # pytriton print()s tritonserver's log to stdout: keep stdout for the READY line only.
    ready_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    # The Python-backend stub links libpython3.X.so; a pyenv build keeps it off the loader path.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    if libdir and libdir not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in (os.environ.get("LD_LIBRARY_PATH"), libdir) if p)

    # A signal only sets `stop`: interrupting pytriton's start-up orphans the backend stubs, so a
    # SIGTERM during start-up lets it finish, skips READY and stops cleanly.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    config = TritonConfig(
        http_address="127.0.0.1", http_port=args.http_port,
        grpc_address="127.0.0.1", grpc_port=args.grpc_port,
        allow_metrics=args.metrics_port is not None, allow_cpu_metrics=args.metrics_port is not None,
        allow_gpu_metrics=False, metrics_address="127.0.0.1", metrics_port=args.metrics_port,
        allow_sagemaker=False, allow_vertex_ai=False, exit_timeout_secs=5,
    )
    security = TritonSecurityConfig(access_token=args.access_token, restricted_endpoints=None if args.access_token else [])
    # A local model store: Triton loads the generated models from its repository at start-up, so the
    # repository index lists them (pytriton's default loads them by API and the index comes back empty).
    policy = TritonLifecyclePolicy(launch_triton_on_startup=True, local_model_store=True)
    triton = Triton(config=config, workspace=args.workspace, triton_lifecycle_policy=policy, security_config=security)
    try:
        for name, (version, path) in find_models(args.repository).items():
            graph = onnx.load(str(path), load_external_data=False).graph
            initializers = {i.name for i in graph.initializer}
            triton.bind(
                model_name=name, model_version=version, infer_func=make_infer(path, args.delay_ms / 1e3),
                inputs=tensors([i for i in graph.input if i.name not in initializers]), outputs=tensors(graph.output),
                config=ModelConfig(batching=False),
            )
            logger.info("bound %s version %d from %s", name, version, path)
        triton.run()
        if not stop.is_set():
            print(f"READY grpc={args.grpc_port} http={args.http_port}", file=ready_out, flush=True)
        while not stop.wait(1.0) and triton.is_alive():
            pass
        if not stop.is_set():
            logger.error("tritonserver or a model proxy died")
            sys.exit(1)
    finally:
        logger.info("stopping")
        triton.stop()


if __name__ == "__main__":
    main()
