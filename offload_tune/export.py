"""A Triton / KServe model repository of a model and its SPLIT suffixes, so an
engine operators already run can serve the cloud side of Tandem's plans.

Layout (Triton's, which KServe's Triton runtime and MLServer's onnx runtime read too):

    REPO/<model>/1/model.onnx            the whole model, byte for byte the device's copy (REMOTE)
    REPO/<model>/config.pbtxt
    REPO/<model>__from_<k>/1/model.onnx  the cloud side of chain cut k: inputs are the cut's tensors
    REPO/<model>__from_<k>/config.pbtxt

Each config is a ModelConfig message from Triton's own model_config.proto,
written with protobuf's text format: nothing hand-formatted.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf import text_format

from partitioner.graph import suffix_model
from protos.oip import model_config, onnx_tensor, suffix_name
from runtimes.onnx_exec import OnnxModel

logger = logging.getLogger(__name__)

VERSION = "1"
PLATFORM = "onnxruntime_onnx"
SOURCE_DIGEST = "tandem.source_digest"  # config parameter: sha256 of the device's copy it was cut from


class ExportError(ValueError):
    """A cut or model that cannot be written as a repository entry, with the reason."""


@dataclass(frozen=True)
class Exported:
    name: str        # the model name the server will serve it under
    cut: int         # 0: the whole model
    path: Path       # its directory in the repository
    inputs: tuple[str, ...]


def _tensor_configs(values: Iterable[onnx.ValueInfoProto], kind: type, what: str) -> list:
    configs = []
    for value in values:
        if not value.type.HasField("tensor_type"):
            raise ExportError(f"{what} {value.name!r} is not a tensor")
        datatype, dims = onnx_tensor(value)
        if datatype is None:
            raise ExportError(f"{what} {value.name!r} has an element type the Open Inference Protocol cannot carry")
        if dims is None:
            raise ExportError(f"{what} {value.name!r} has no known rank; a Triton config needs one")
        configs.append(kind(name=value.name, data_type=model_config.DataType.Value(f"TYPE_{datatype}"),
                            dims=[-1 if d is None else d for d in dims]))
    return configs


def config_text(name: str, graph: onnx.GraphProto, source_digest: str) -> str:
    """config.pbtxt: every dimension as the graph declares it (-1 where dynamic),
    max_batch_size 0 so the engine passes shapes through whole, as the agent sends them."""
    initializers = {init.name for init in graph.initializer}
    config = model_config.ModelConfig(
        name=name, platform=PLATFORM, max_batch_size=0,
        input=_tensor_configs((v for v in graph.input if v.name not in initializers), model_config.ModelInput, "input"),
        output=_tensor_configs(graph.output, model_config.ModelOutput, "output"),
    )
    config.parameters[SOURCE_DIGEST].string_value = source_digest
    return text_format.MessageToString(config)


def _write_entry(repository: Path, name: str, write_model: Callable[[Path], None], graph: onnx.GraphProto,
                 source_digest: str) -> Path:
    """Write one model's directory beside its final place, then swap it in: a
    failure leaves the previous entry (or none), never half of one."""
    final = repository / name
    config = config_text(name, graph, source_digest)
    staging = Path(tempfile.mkdtemp(dir=repository, prefix=f".{name}."))
    try:
        (staging / VERSION).mkdir()
        write_model(staging / VERSION / "model.onnx")
        (staging / "config.pbtxt").write_text(config)
        staging.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def export_repository(model: OnnxModel, repository: Path, cuts: Iterable[int] | None = None, *,
                      progress: Callable[[str], None] = lambda name: None) -> list[Exported]:
    """The whole model and the suffix of each chain cut in ``cuts`` (default:
    every chain cut) as repository entries. ExportError for a cut the model
    does not have (before anything is written) or cannot be written (naming
    the entries written before it, each of them whole)."""
    repository.mkdir(parents=True, exist_ok=True)
    graph = model.graph
    wanted = sorted(set(cuts)) if cuts is not None else list(range(1, model.num_segments))
    if wanted and graph is None:
        raise ExportError(f"{model.name} cannot be split ({model.cut_error}); export it whole with --cuts none")
    bad = [k for k in wanted if not 1 <= k < model.num_segments]
    if bad:
        raise ExportError(f"{model.name} has chain cuts 1..{model.num_segments - 1}; not {bad}")
    whole = onnx.load(str(model.path), load_external_data=False)
    exported = []
    path = _write_entry(repository, model.name, lambda target: shutil.copyfile(model.path, target), whole.graph,
                        model.digest)
    exported.append(Exported(model.name, 0, path, tuple(spec.name for spec in model.inputs)))
    progress(model.name)
    for k in wanted:  # one suffix in memory at a time: together they hold the weights about n/2 times over
        name, cut = suffix_name(model.name, k), model.cut(k)
        proto = suffix_model(graph, cut)
        try:
            path = _write_entry(repository, name, lambda target: onnx.save(proto, str(target)), proto.graph, model.digest)
        except ExportError as exc:
            raise ExportError(f"cut {k}: {exc} (written so far: {', '.join(e.name for e in exported)})") from None
        exported.append(Exported(name, k, path, tuple(cut.tensors)))
        progress(name)
    logger.info("exported %s and %d suffixes to %s", model.name, len(exported) - 1, repository)
    return exported
