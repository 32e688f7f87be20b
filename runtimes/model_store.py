"""The models a daemon serves, loaded from a directory of ``.onnx`` files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from partitioner.graph import GraphError
from protos import codec
from protos import tandem_pb2 as pb
from runtimes.onnx_exec import InputError, OnnxModel, TensorSpec
from runtimes.rpc import UnknownModel

logger = logging.getLogger(__name__)


def _spec_msg(spec: TensorSpec) -> pb.TensorSpec:
    shape = [] if spec.shape is None else [-1 if d is None else d for d in spec.shape]
    return pb.TensorSpec(name=spec.name, dtype=codec.dtype_to_pb(spec.dtype), shape=shape)


def decode_all(tensors) -> dict[str, np.ndarray]:
    """Decode request tensors; a name given twice is refused, not silently overwritten."""
    feeds: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name in feeds:
            raise InputError(f"tensor {tensor.name!r} is given more than once")
        feeds[tensor.name] = codec.decode(tensor)
    return feeds


class ModelStore:
    def __init__(self, models: dict[str, OnnxModel]) -> None:
        self.models = models

    @classmethod
    def from_dir(cls, directory: Path, *, threads: int | None = None, spinning: bool | None = None) -> "ModelStore":
        """Every ``*.onnx`` in ``directory``, named by file stem. A file that
        is not a usable model is skipped with the reason logged, so one bad
        file does not take the daemon down."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"models directory {directory} does not exist")
        models = {}
        for path in sorted(directory.glob("*.onnx")):
            try:
                models[path.stem] = OnnxModel(path.stem, path, threads=threads, spinning=spinning)
            except (GraphError, ValueError) as exc:
                logger.error("skipping %s: %s", path, exc)
        logger.info("loaded %d models from %s: %s", len(models), directory, ", ".join(models) or "none")
        return cls(models)

    def get(self, name: str) -> OnnxModel:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModel(f"unknown model {name!r}; this daemon serves {sorted(self.models)}") from None

    def model_infos(self) -> list[pb.ModelInfo]:
        return [
            pb.ModelInfo(
                name=name, digest=model.digest, kind="onnx", num_cuts=model.num_cuts,
                inputs=[_spec_msg(s) for s in model.inputs], outputs=[_spec_msg(s) for s in model.outputs],
            )
            for name, model in self.models.items()
        ]
