"""numpy arrays to and from ``tandem.v1.Tensor``, with as few copies as numpy allows.

Encodings (``msg.encoding`` records the one actually applied):

RAW
    Little-endian bytes of the array's dtype; lossless. Encoding is one copy
    (``tobytes`` also makes non-contiguous input contiguous); big-endian input
    is byte-swapped first, one more copy. Decoding is zero-copy: the array is a
    read-only ``np.frombuffer`` view of the payload ``bytes`` and keeps it
    alive. onnxruntime accepts read-only arrays as inputs (checked with
    onnxruntime 1.32); call ``.copy()`` before writing into one.
FP16
    float32/float64 tensors travel as IEEE half floats and are cast back to
    their dtype on decode (a fresh, writeable array). Worst-case error, per
    element, with round-to-nearest-even:

    - ``|x|`` in the normal half range [2**-14 ~ 6.1e-5, 65504]: relative
      error <= 2**-11 (half the spacing of an 11-bit significand);
    - ``|x| < 2**-14`` (half subnormals, spacing 2**-24): absolute error
      <= 2**-25;
    - together: ``|error| <= max(|x| * 2**-11, 2**-25)``;
    - finite ``|x| >= 65520`` would round to inf: refused with CodecError
      (values in (65504, 65520) round to 65504, within the relative bound);
    - NaN and +-inf already in the input are carried as they are.

INT8
    Per-tensor affine quantisation to uint8 ``q``; ``value = scale * (q -
    zero_point)``. The grid always contains 0 (``zero_point`` in [0, 255] by
    contract), so the range quantised is ``lo = min(min(x), 0)``, ``hi =
    max(max(x), 0)``: zeros (ReLU outputs, padding) stay exact, ``min(x)`` maps
    to q = 0 whenever ``min(x) <= 0``, and a tensor whose values are all on one
    side of 0 spends its 256 levels on [0, max] or [min, 0].
    ``scale = (hi - lo) / 255`` (rounded up to float32), ``zero_point =
    round(-lo / scale)``, ``q = clip(round(x / scale) + zero_point, 0, 255)``.
    Worst-case absolute error: ``scale / 2 = (hi - lo) / 510``, plus float
    rounding slack ``scale * 510 * u`` (``u`` = 2**-24 for float16/float32
    tensors, 2**-53 for float64: about 3e-5 of a step for float32), plus, for
    float16 tensors, the final cast to half (``max((|x| + scale) * 2**-11,
    2**-25)``). A constant tensor (min == max == c) round-trips exactly for
    float16/float32 (``scale = |c|``, ``q - zero_point = +-1``); a float64
    constant comes back as float32(c). NaN or inf input is refused: it has no
    place on the grid. ``max_abs_error`` gives the bound for a given array.

Integer and bool tensors (shape tensors, indices, masks) are never
quantised: FP16 or INT8 requested for them sends RAW, lossless. A float16
tensor with FP16 requested is sent RAW too (same bytes).

Every problem with an array or a message raises ``CodecError`` (a
``ValueError``) naming the tensor and saying what is wrong.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from protos import tandem_pb2 as pb

logger = logging.getLogger(__name__)

__all__ = [
    "FP16_MAX",
    "FP16_OVERFLOW",
    "FP16_RELATIVE_ERROR",
    "FP16_SUBNORMAL_ABS_ERROR",
    "MAX_ELEMENTS",
    "MAX_PAYLOAD_BYTES",
    "MAX_RANK",
    "CodecError",
    "decode",
    "dtype_to_pb",
    "effective_encoding",
    "encode",
    "max_abs_error",
    "pb_to_dtype",
    "wire_bytes",
]

# IEEE 754 binary16: 11-bit significand, smallest normal 2**-14, largest finite 65504.
FP16_RELATIVE_ERROR = 2.0**-11  # half an ulp, relative, normal range
FP16_SUBNORMAL_ABS_ERROR = 2.0**-25  # half the subnormal spacing 2**-24
FP16_MAX = 65504.0
FP16_OVERFLOW = 65520.0  # halfway to 2**16: from here round-to-nearest-even gives inf

# Sanity caps on what a message may declare. protobuf refuses messages of
# 2 GiB or more, so no genuine payload is larger; the element cap keeps a
# forged shape from making us allocate (INT8/FP16 decode to a wider dtype).
MAX_ELEMENTS = 2**31
MAX_PAYLOAD_BYTES = 2**31
# numpy < 2 supports at most 32 dimensions (pyproject allows numpy >= 1.26).
MAX_RANK = 32


class CodecError(ValueError):
    """An array cannot be encoded, or a message does not describe a valid tensor."""


# pb.DType -> little-endian numpy dtype of the decoded tensor.
_NUMPY_OF: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_INT16: np.dtype("<i2"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_BOOL: np.dtype("?"),
}
# (kind, itemsize) -> pb.DType; kind and size ignore byte order.
_PB_OF: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): enum for enum, dt in _NUMPY_OF.items()}

_ENCODINGS = frozenset({pb.ENCODING_UNSPECIFIED, pb.ENCODING_RAW, pb.ENCODING_FP16, pb.ENCODING_INT8})

# The names users write in configs, flags and SDK calls.
ENCODING_BY_NAME = {"raw": pb.ENCODING_RAW, "fp32": pb.ENCODING_RAW, "fp16": pb.ENCODING_FP16, "int8": pb.ENCODING_INT8}
_HALF = np.dtype("<f2")
_QUANT = np.dtype("u1")


def _label(name: str) -> str:
    return f"tensor {name!r}" if name else "unnamed tensor"


def _encoding_name(encoding: int) -> str:
    try:
        return pb.Encoding.Name(encoding)
    except ValueError:
        return str(encoding)


def _unit_roundoff(dtype: np.dtype) -> float:
    return float(np.finfo(dtype).eps) / 2


def dtype_to_pb(dtype: npt.DTypeLike) -> int:
    """The ``pb.DType`` for a numpy dtype (any byte order); CodecError if the wire has none."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise CodecError(f"not a numpy dtype: {dtype!r}") from exc
    enum = _PB_OF.get((dt.kind, dt.itemsize))
    if enum is None or dt.fields is not None:
        supported = ", ".join(str(d) for d in _NUMPY_OF.values())
        raise CodecError(f"dtype {dt} has no wire representation; supported: {supported}")
    return enum


def pb_to_dtype(dtype: int) -> np.dtype:
    """The little-endian numpy dtype for a ``pb.DType`` value; CodecError if unknown."""
    try:
        return _NUMPY_OF[dtype]
    except KeyError:
        raise CodecError(f"unknown or unspecified DType value {dtype}") from None


def effective_encoding(dtype: npt.DTypeLike | int, encoding: int) -> int:
    """The encoding actually applied when ``encoding`` is asked for a tensor of ``dtype``.

    Non-float tensors always go RAW (never quantise indices or shapes), as does
    float16 asked for FP16. ``dtype`` is a numpy dtype (or its name) or a
    ``pb.DType`` value.
    """
    if encoding not in _ENCODINGS:
        raise CodecError(f"unknown Encoding value {encoding}")
    dt = pb_to_dtype(dtype) if isinstance(dtype, (int, np.integer)) else np.dtype(dtype)
    if encoding == pb.ENCODING_UNSPECIFIED or dt.kind != "f":
        return pb.ENCODING_RAW
    if encoding == pb.ENCODING_FP16 and dt.itemsize == 2:
        return pb.ENCODING_RAW
    return encoding


def _wire_itemsize(dtype: np.dtype, encoding: int) -> int:
    if encoding == pb.ENCODING_FP16:
        return 2
    if encoding == pb.ENCODING_INT8:
        return 1
    return dtype.itemsize


def _checked_shape(shape: Iterable[int], label: str) -> tuple[tuple[int, ...], int]:
    """The shape as ints and its element count, within the sanity caps."""
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_RANK:
        raise CodecError(f"{label}: rank {len(dims)} exceeds the limit of {MAX_RANK} dimensions")
    for axis, dim in enumerate(dims):
        if dim < 0:
            raise CodecError(
                f"{label}: negative dimension {dim} at axis {axis} of shape {list(dims)} "
                "(dynamic dimensions must be resolved to concrete sizes)"
            )
        if dim > MAX_ELEMENTS:
            raise CodecError(f"{label}: dimension {dim} at axis {axis} exceeds the cap of {MAX_ELEMENTS} elements")
    count = math.prod(dims)  # Python ints: exact, cannot overflow
    if count > MAX_ELEMENTS:
        raise CodecError(f"{label}: shape {list(dims)} has {count} elements, over the cap of {MAX_ELEMENTS}")
    return dims, count


def _checked_payload_size(count: int, dtype: np.dtype, encoding: int, label: str) -> int:
    size = count * _wire_itemsize(dtype, encoding)
    if size > MAX_PAYLOAD_BYTES:
        raise CodecError(
            f"{label}: {count} x {dtype} as {_encoding_name(encoding)} is {size} payload bytes, "
            f"over the cap of {MAX_PAYLOAD_BYTES} bytes (2 GiB, protobuf's message limit)"
        )
    return size


def wire_bytes(shape: Iterable[int], dtype: npt.DTypeLike | int, encoding: int) -> int:
    """Bytes the payload of ``encode`` will have, without encoding anything.

    ``dtype`` is a numpy dtype (or its name, e.g. ``"float32"``) or a
    ``pb.DType`` value; ``encoding`` is the one requested (non-float tensors
    count as RAW, as ``encode`` sends them).
    """
    enum = int(dtype) if isinstance(dtype, (int, np.integer)) else dtype_to_pb(dtype)  # refuses what encode refuses
    dt = pb_to_dtype(enum)
    _, count = _checked_shape(shape, "wire_bytes")
    return count * _wire_itemsize(dt, effective_encoding(dt, encoding))


class _Int8Params(NamedTuple):
    scale: float
    zero_point: int
    constant: float | None  # the value of a constant tensor, else None


def _round_up_f32(value: float) -> float:
    """The smallest float32 >= value (so hi - lo <= 255 * scale holds after storing scale)."""
    with np.errstate(over="ignore"):
        rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


def _int8_params(array: np.ndarray, label: str) -> _Int8Params:
    if array.size == 0:
        return _Int8Params(1.0, 0, None)
    lo, hi = float(array.min()), float(array.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CodecError(
            f"{label}: holds NaN or inf; INT8 quantisation of non-finite values is meaningless "
            "(send it RAW or FP16)"
        )
    if lo == hi:
        # Constant: make the grid step |c| so q - zero_point = +-1 gives c back
        # exactly (for float32 c; a float64 c comes back as float32(c)).
        with np.errstate(over="ignore"):
            magnitude = float(np.float32(abs(lo)))  # the decoded value is float32(c)
        if not math.isfinite(magnitude):
            raise CodecError(f"{label}: constant {lo!r} is beyond float32 range; INT8 scale cannot hold it")
        if magnitude == 0.0:  # 0, or a float64 constant below float32's smallest subnormal
            return _Int8Params(1.0, 0, lo)
        return _Int8Params(magnitude, 0 if lo > 0 else 1, lo)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = _round_up_f32((hi - lo) / 255.0)
    if not math.isfinite(scale):
        raise CodecError(
            f"{label}: value range [{lo!r}, {hi!r}] is too wide for a float32 INT8 scale (send it RAW or FP16)"
        )
    # -lo / scale lies in [0, 255] because lo <= 0 and hi - lo <= 255 * scale.
    return _Int8Params(scale, int(round(-lo / scale)), None)


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """Arithmetic precision for quantising: float64 for float64 tensors, else float32."""
    return np.dtype(np.float64) if dtype.itemsize == 8 else np.dtype(np.float32)


def _quantise(array: np.ndarray, params: _Int8Params) -> np.ndarray:
    compute = _compute_dtype(array.dtype)
    steps = np.divide(array, compute.type(params.scale), out=np.empty(array.shape, compute))
    np.rint(steps, out=steps)
    steps += params.zero_point
    np.clip(steps, 0, 255, out=steps)
    return steps.astype(_QUANT)


def _to_half(array: np.ndarray, label: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        half = array.astype(_HALF)
    overflowed = np.isinf(half)
    if overflowed.any():
        overflowed &= np.isfinite(array)
        if overflowed.any():
            index = tuple(int(i) for i in np.argwhere(overflowed)[0])
            value = array[index]
            raise CodecError(
                f"{label}: value {float(value)!r} at index {list(index)} is beyond float16 range "
                f"(|x| >= {FP16_OVERFLOW:g} becomes inf; largest finite half is {FP16_MAX:g}); send it RAW or INT8"
            )
    return half


def encode(array: np.ndarray, name: str = "", encoding: int = pb.ENCODING_RAW) -> pb.Tensor:
    """Encode ``array`` as a ``pb.Tensor``; see the module docstring for the encodings and their error."""
    label = _label(name)
    if isinstance(array, np.generic):
        array = np.asarray(array)
    if not isinstance(array, np.ndarray):
        raise CodecError(f"{label}: expected a numpy array, got {type(array).__name__}")
    try:
        dtype_enum = dtype_to_pb(array.dtype)
    except CodecError as exc:
        raise CodecError(f"{label}: {exc}") from None
    if encoding not in _ENCODINGS:
        raise CodecError(f"{label}: unknown Encoding value {encoding}")
    wire_dtype = _NUMPY_OF[dtype_enum]
    applied = effective_encoding(wire_dtype, encoding)
    _, count = _checked_shape(array.shape, label)
    _checked_payload_size(count, wire_dtype, applied, label)

    msg = pb.Tensor(name=name, dtype=dtype_enum, shape=array.shape, encoding=applied)
    if applied == pb.ENCODING_RAW:
        values = array if array.dtype == wire_dtype else array.astype(wire_dtype)  # byte swap
        msg.payload = values.tobytes()  # one copy, C order, contiguous or not
    elif applied == pb.ENCODING_FP16:
        msg.payload = _to_half(array, label).tobytes()
    else:
        params = _int8_params(array, label)
        msg.scale = params.scale
        msg.zero_point = params.zero_point
        msg.payload = _quantise(array, params).tobytes()
    return msg


def decode(msg: pb.Tensor, payload: bytes | np.ndarray | None = None) -> np.ndarray:
    """The array ``msg`` carries, validated against everything it declares.

    RAW (and FP16 of a float16 tensor) returns a read-only, zero-copy view of
    the payload bytes; other encodings return a fresh writeable array.
    ``payload`` stands for ``msg.payload`` when the bytes came another way
    (a shared-memory region the message names).
    """
    label = _label(msg.name)
    if msg.dtype == pb.DTYPE_UNSPECIFIED:
        raise CodecError(f"{label}: dtype is unspecified")
    if msg.dtype not in _NUMPY_OF:
        raise CodecError(f"{label}: unknown DType value {msg.dtype}")
    dtype = _NUMPY_OF[msg.dtype]
    encoding = msg.encoding
    if encoding not in _ENCODINGS:
        raise CodecError(f"{label}: unknown Encoding value {encoding}")
    if encoding == pb.ENCODING_UNSPECIFIED:
        encoding = pb.ENCODING_RAW
    if encoding != pb.ENCODING_RAW and dtype.kind != "f":
        raise CodecError(
            f"{label}: {_encoding_name(encoding)} declared for {pb.DType.Name(msg.dtype)}; "
            "lossy encodings apply only to floating tensors"
        )
    shape, count = _checked_shape(msg.shape, label)
    expected = _checked_payload_size(count, dtype, encoding, label)
    if msg.HasField("shared") and payload is None:
        raise CodecError(f"{label}: its bytes are in shared memory, which only the edge agent's app port reads")
    # upb builds a new bytes object on every access to a bytes field: read it once.
    payload = msg.payload if payload is None else payload
    if len(payload) != expected:
        raise CodecError(
            f"{label}: payload is {len(payload)} bytes, expected {expected} bytes for shape {list(shape)} "
            f"{pb.DType.Name(msg.dtype)} as {_encoding_name(encoding)}"
        )

    if encoding == pb.ENCODING_RAW:
        if dtype.kind == "b" and count and np.frombuffer(payload, _QUANT).max() > 1:
            raise CodecError(f"{label}: BOOL payload holds bytes other than 0 and 1")
        return np.frombuffer(payload, dtype).reshape(shape)
    if encoding == pb.ENCODING_FP16:
        half = np.frombuffer(payload, _HALF).reshape(shape)
        return half if dtype == _HALF else half.astype(dtype)

    scale, zero_point = float(msg.scale), int(msg.zero_point)
    if not (math.isfinite(scale) and scale > 0):
        raise CodecError(f"{label}: INT8 scale must be finite and positive, got {scale!r}")
    if not 0 <= zero_point <= 255:
        raise CodecError(f"{label}: INT8 zero_point {zero_point} is outside [0, 255]")
    quantised = np.frombuffer(payload, _QUANT).reshape(shape)
    # The grid reaches scale * 255 at most; compute where it fits and clip to
    # the target dtype's finite range (the true values were inside it).
    reach = scale * max(zero_point, 255 - zero_point)
    compute = _compute_dtype(dtype)
    if reach > float(np.finfo(compute).max):
        compute = np.dtype(np.float64)
    values = quantised.astype(compute)
    values -= zero_point
    values *= compute.type(scale)
    limit = float(np.finfo(dtype).max)
    if reach > limit:
        np.clip(values, -limit, limit, out=values)
    return values.astype(dtype, copy=False)


def max_abs_error(array: np.ndarray, encoding: int) -> float:
    """Worst-case absolute error of decode(encode(array, encoding=encoding)), per element.

    0.0 for lossless cases (RAW, non-float tensors, float16 as FP16, empty
    tensors). FP16: ``max(max|x| * 2**-11, 2**-25)`` over finite x (per
    element the tighter ``max(|x| * 2**-11, 2**-25)`` holds). INT8:
    ``scale * (1/2 + 510 u)`` with u the unit roundoff of the arithmetic,
    plus the float16 cast for float16 tensors; 0 (or float32 rounding of a
    float64 value) for constant tensors. Raises CodecError where encode would.
    """
    label = "array"
    array = np.asarray(array)
    dtype_to_pb(array.dtype)
    applied = effective_encoding(array.dtype, encoding)
    if applied == pb.ENCODING_RAW or array.size == 0:
        return 0.0
    if applied == pb.ENCODING_FP16:
        magnitudes = np.abs(array)
        finite = magnitudes[np.isfinite(magnitudes)]
        largest = float(finite.max()) if finite.size else 0.0
        if largest >= FP16_OVERFLOW:
            raise CodecError(f"{label}: value {largest!r} is beyond float16 range (|x| >= {FP16_OVERFLOW:g})")
        return max(largest * FP16_RELATIVE_ERROR, FP16_SUBNORMAL_ABS_ERROR)

    params = _int8_params(array, label)
    if params.constant is not None:
        return abs(params.constant - float(np.float32(params.constant)))
    bound = params.scale * (0.5 + 510 * _unit_roundoff(_compute_dtype(array.dtype)))
    if array.dtype.itemsize == 2:
        largest = max(abs(float(array.min())), abs(float(array.max())))
        bound += max((largest + params.scale) * FP16_RELATIVE_ERROR, FP16_SUBNORMAL_ABS_ERROR)
    return bound
