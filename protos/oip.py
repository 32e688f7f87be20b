"""The KServe v2 / Open Inference Protocol contract, as Tandem uses it on both
sides: the agent's OIP frontend, its client for OIP nodes (Triton, KServe,
MLServer) and the model repository offload-tune exports for them.

The messages and stubs are the ones tritonclient generates from the official
definition (grpc_service.proto, model_config.proto); we take them from there
rather than write our own copy.
"""

from __future__ import annotations

import re

import numpy as np
import onnx

# tritonclient.grpc's package __init__ imports its client, which needs the
# `packaging` module; the generated modules themselves need only protobuf.
from tritonclient.grpc import model_config_pb2 as model_config
from tritonclient.grpc import service_pb2 as messages
from tritonclient.grpc import service_pb2_grpc as services

__all__ = ["messages", "services", "model_config", "DTYPES", "DATATYPES", "CONTENTS_FIELD", "datatype_or_none",
           "onnx_tensor", "typed_array", "suffix_name", "parse_suffix_name"]

# OIP datatypes as numpy dtypes; on the wire every tensor is little-endian.
# BYTES (strings) and BF16 have no numpy counterpart Tandem's models take.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES: dict[np.dtype, str] = {dtype.newbyteorder("="): name for name, dtype in DTYPES.items()}


# The typed field of InferTensorContents each datatype travels in (the
# definition's comments); FP16 has none: it travels raw only.
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def datatype_or_none(dtype: np.dtype) -> str | None:
    """The OIP datatype of a numpy dtype, None where the protocol has none."""
    return DATATYPES.get(np.dtype(dtype).newbyteorder("="))


def onnx_tensor(value: onnx.ValueInfoProto) -> tuple[str | None, tuple[int | None, ...] | None]:
    """An ONNX tensor's OIP datatype (None where the protocol has none) and
    dims (None where one is dynamic; no tuple where the rank is unknown)."""
    tensor = value.type.tensor_type
    datatype = datatype_or_none(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))) \
        if tensor.elem_type else None
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim) \
        if tensor.HasField("shape") else None
    return datatype, dims


def typed_array(what: str, datatype: str, contents: messages.InferTensorContents, count: int) -> np.ndarray:
    """A tensor sent as typed contents (not raw bytes), as a flat array of its
    datatype; ValueError naming ``what`` for contents that do not fit it."""
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise ValueError(f"{what} is {datatype}, which travels in raw contents only")
    values = getattr(contents, field)
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} values in {field}; its shape holds {count}")
    dtype = DTYPES[datatype]
    wide = np.array(values, dtype=np.float64 if dtype.kind == "f" else np.bool_ if dtype.kind == "b"
                    else np.uint64 if dtype.kind == "u" else np.int64)
    if dtype.kind in "iu" and wide.size and (wide.min() < np.iinfo(dtype).min or wide.max() > np.iinfo(dtype).max):
        raise ValueError(f"{what} has values outside {datatype}'s range")
    return wide.astype(dtype)


# A SPLIT suffix is deployed as its own model: the cloud side of chain cut k
# (k segments on the device) of model M is the model "M__from_k". The name is
# the contract between `offload-tune export-suffixes` and the agent.
SUFFIX_SEPARATOR = "__from_"
_SUFFIX = re.compile(r"(?P<model>.+)__from_(?P<cut>[1-9][0-9]{0,5})")


def suffix_name(model: str, cut: int) -> str:
    return f"{model}{SUFFIX_SEPARATOR}{cut}"


def parse_suffix_name(name: str) -> tuple[str, int] | None:
    """(model, cut) of a suffix's model name, None for any other name."""
    match = _SUFFIX.fullmatch(name)
    return (match["model"], int(match["cut"])) if match else None
