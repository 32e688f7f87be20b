"""The models a daemon serves, loaded from a directory of ``.onnx`` files."""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from partitioner.graph import GraphError
from protos import codec
from protos import tandem_pb2 as pb
from runtimes.onnx_exec import InputError, OnnxModel, TensorSpec
from runtimes.rpc import UnknownModel

logger = logging.getLogger(__name__)


def _spec_msg(spec: TensorSpec) -> pb.TensorSpec:
    shape = [] if spec.shape is None else [-1 if d is None else d for d in spec.shape]
    return pb.TensorSpec(name=spec.name, dtype=codec.dtype_to_pb(spec.dtype), shape=shape)


def decode_all(tensors, read_shared: Callable[[pb.Tensor], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Decode request tensors; a name given twice is refused, not silently
    overwritten. ``read_shared`` fetches the bytes of a tensor held in shared memory."""
    feeds: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.name in feeds:
            raise InputError(f"tensor {tensor.name!r} is given more than once")
        shared = read_shared is not None and tensor.HasField("shared")
        feeds[tensor.name] = codec.decode(tensor, read_shared(tensor) if shared else None)
    return feeds


_FILE_KINDS = (  # what a path in --models can be besides a regular file, in words
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
MAX_REASON_CHARS = 240  # a reason is one log line and one field in ListModels, not a dump


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be a model file, decided from its metadata alone:
    opening a FIFO blocks until a writer comes and reading a device may
    never end, so nothing here opens the file. None: a non-empty regular
    file this process may read."""
    path = Path(path)
    link = f" (symlink to {os.readlink(path)})" if path.is_symlink() else ""
    try:
        info = os.stat(path)  # follows symlinks: the kind of what would be read
    except FileNotFoundError:
        return f"dangling symlink to {os.readlink(path)}" if link else "no such file"
    except OSError as exc:  # a symlink loop, a name too long, a directory we may not search
        return f"cannot stat it: {exc.strerror or exc}"
    for is_kind, kind in _FILE_KINDS:
        if is_kind(info.st_mode):
            return f"{kind}{link}, not a regular file"
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file{link}"
    if info.st_size == 0:
        return f"empty file (0 bytes){link}"
    if not os.access(path, os.R_OK):
        return f"not readable by this process (permission denied){link}"
    return None


# onnxruntime's messages for the refusals users meet most, reworded to name what is missing.
_ORT_REFUSALS = (
    (re.compile(r"No Op registered for (?P<op>\S+) with domain_version of (?P<opset>\d+)"),
     "onnxruntime {version} has no operator {op} at opset {opset}"),
    (re.compile(r"(?P<domain>[\w.]*):(?P<op>\w+)\(-?\d+\) is not a registered function/op"),
     "onnxruntime {version} has no operator {op} in domain {domain!r}"),
    (re.compile(r"Opset (?P<opset>\d+) is under development.*?support for domain (?P<domain>\S+) is till opset (?P<latest>\d+)",
                re.DOTALL),
     "opset {opset} of {domain} is newer than onnxruntime {version} supports (up to {latest})"),
)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : (?P<code>\w+) : (?:/\S+:\d+ )?")


def load_failure_reason(exc: BaseException, path: Path) -> str:
    """A short, true reason from whatever building the model at ``path``
    raised (onnx, onnxruntime, the graph analysis, the OS), without the path:
    callers name the file themselves."""
    text = str(exc).strip()
    for pattern, template in _ORT_REFUSALS:
        found = pattern.search(text)
        if found:
            return template.format(version=ort.__version__, **found.groupdict())
    ort_error = _ORT_PREFIX.match(text)
    if ort_error:
        text = f"onnxruntime refuses it ({ort_error['code']}): {text[ort_error.end():]}"
    elif text.startswith(str(path)):
        text = text[len(str(path)):].lstrip(" :").removeprefix("is ")
    text = text.replace(str(path), path.name).splitlines()[0] if text else ""
    if not text:
        text = type(exc).__name__  # MemoryError and friends carry no message
    elif not isinstance(exc, (GraphError, OSError)) and not ort_error:
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"


class ModelStore:
    def __init__(self, models: dict[str, OnnxModel], skipped: dict[str, str] | None = None) -> None:
        self.models = models
        self.skipped = skipped or {}  # file name in the models directory -> why it is not served

    @classmethod
    def from_dir(cls, directory: Path, *, threads: int | None = None, spinning: bool | None = None) -> "ModelStore":
        """Every ``*.onnx`` in ``directory``, named by file stem. Any file that
        is not a usable model, for any reason, is skipped and recorded with
        that reason, so one bad file never takes the daemon down."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"models directory {directory} does not exist")  # the operator's to fix: exit 2
        models: dict[str, OnnxModel] = {}
        skipped: dict[str, str] = {}
        for path in sorted(directory.glob("*.onnx")):
            reason = unreadable_reason(path)
            if reason is None:
                try:
                    models[path.stem] = OnnxModel(path.stem, path, threads=threads, spinning=spinning)
                except Exception as exc:  # noqa: BLE001 -- onnx, onnxruntime and the OS fail in many ways; all mean "skip it"
                    reason = load_failure_reason(exc, path)
                    logger.debug("loading %s failed", path, exc_info=True)  # the whole story, for a bug report
            if reason is not None:
                skipped[path.name] = reason
                logger.error("skipping model file %s: %s", path, reason)
        logger.info("loaded %d models from %s: %s", len(models), directory, ", ".join(models) or "none")
        if skipped:
            logger.warning("%d files in %s are not served: %s", len(skipped), directory, ", ".join(skipped))
        if not models:
            logger.warning("no usable .onnx model in %s: this daemon serves no tensor model", directory)
        return cls(models, skipped)

    def get(self, name: str) -> OnnxModel:
        try:
            return self.models[name]
        except KeyError:
            file = f"{name}.onnx"
            why = f": {file} is in the models directory but not served ({self.skipped[file]})" if file in self.skipped else ""
            raise UnknownModel(f"unknown model {name!r}{why}; this daemon serves {sorted(self.models)}") from None

    def model_infos(self) -> list[pb.ModelInfo]:
        return [
            pb.ModelInfo(
                name=name, digest=model.digest, kind="onnx", num_cuts=model.num_cuts,
                inputs=[_spec_msg(s) for s in model.inputs], outputs=[_spec_msg(s) for s in model.outputs],
            )
            for name, model in self.models.items()
        ]

    def skipped_infos(self) -> list[pb.SkippedFile]:
        return [pb.SkippedFile(file=file, reason=reason) for file, reason in self.skipped.items()]
