"""protos.codec: round trips, documented error bounds, zero-copy decode, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from protos import codec
from protos import tandem_pb2 as pb
from protos.codec import CodecError

RNG_SEED = 20240611

ALL_DTYPES = {
    pb.DTYPE_FLOAT32: np.float32,
    pb.DTYPE_FLOAT16: np.float16,
    pb.DTYPE_FLOAT64: np.float64,
    pb.DTYPE_INT8: np.int8,
    pb.DTYPE_UINT8: np.uint8,
    pb.DTYPE_INT16: np.int16,
    pb.DTYPE_INT32: np.int32,
    pb.DTYPE_INT64: np.int64,
    pb.DTYPE_BOOL: np.bool_,
}
FLOATS = (np.float16, np.float32, np.float64)
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 4)]
ENCODINGS = (pb.ENCODING_UNSPECIFIED, pb.ENCODING_RAW, pb.ENCODING_FP16, pb.ENCODING_INT8)


def sample(dtype, shape, *, seed: int = RNG_SEED) -> np.ndarray:
    """Deterministic values spanning the dtype's range."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)
    return (rng.standard_normal(size=shape) * 10).astype(dt)


def roundtrip(array: np.ndarray, encoding: int = pb.ENCODING_RAW, name: str = "t") -> np.ndarray:
    """Encode, go through the wire format, decode."""
    wire = codec.encode(array, name, encoding).SerializeToString()
    return codec.decode(pb.Tensor.FromString(wire))


def fp16_bound(x: np.ndarray) -> np.ndarray:
    """The documented per-element FP16 bound: max(|x| 2^-11, 2^-25)."""
    return np.maximum(np.abs(x.astype(np.float64)) * 2.0**-11, 2.0**-25)


# ------------------------------------------------------------------ RAW --


@pytest.mark.parametrize("enum", list(ALL_DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_raw_roundtrip_every_dtype_and_shape(enum, shape):
    array = sample(ALL_DTYPES[enum], shape)
    msg = codec.encode(array, "t")
    assert msg.dtype == enum
    assert msg.encoding == pb.ENCODING_RAW
    assert tuple(msg.shape) == shape
    out = roundtrip(array)
    assert out.dtype == codec.pb_to_dtype(enum)
    assert out.shape == shape
    assert np.array_equal(out, array)


def test_raw_float32_is_bit_exact_including_specials():
    array = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4028235e38, -1.5], np.float32)
    out = roundtrip(array)
    assert out.tobytes() == array.tobytes()


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2", ">i2", ">i4", ">i8"])
def test_big_endian_input_goes_little_endian(dtype):
    array = sample(np.dtype(dtype).newbyteorder("="), (3, 5)).astype(dtype)
    msg = codec.encode(array, "t")
    little = np.dtype(dtype).newbyteorder("<")
    assert msg.payload == array.astype(little).tobytes()
    out = codec.decode(msg)
    assert out.dtype == little
    assert np.array_equal(out, array)


@pytest.mark.parametrize("enum", list(ALL_DTYPES))
def test_non_contiguous_input(enum):
    base = sample(ALL_DTYPES[enum], (6, 8))
    for view in (base[::2, 1::3], base.T, base[:, ::-1]):
        assert not view.flags.c_contiguous
        out = roundtrip(view)
        assert out.shape == view.shape
        assert np.array_equal(out, view)


def test_numpy_scalar_encodes_as_0d():
    out = roundtrip(np.float32(2.5))
    assert out.shape == ()
    assert out == np.float32(2.5)


def test_unspecified_encoding_means_raw():
    array = sample(np.float32, (4,))
    msg = codec.encode(array, "t", pb.ENCODING_UNSPECIFIED)
    assert msg.encoding == pb.ENCODING_RAW
    msg.encoding = pb.ENCODING_UNSPECIFIED
    assert np.array_equal(codec.decode(msg), array)


# ------------------------------------------------------- zero-copy decode --


def payload_owner(array: np.ndarray) -> object:
    while isinstance(array, np.ndarray):
        assert array.flags.owndata is False
        array = array.base
    return array


@pytest.mark.parametrize("enum", list(ALL_DTYPES))
def test_raw_decode_is_a_read_only_view_of_the_payload(enum):
    msg = codec.encode(sample(ALL_DTYPES[enum], (4, 5)), "t")
    out = codec.decode(msg)
    assert out.flags.owndata is False
    assert out.flags.writeable is False
    assert isinstance(payload_owner(out), bytes)


def test_fp16_tensor_as_fp16_decodes_as_view():
    msg = codec.encode(sample(np.float16, (9,)), "t", pb.ENCODING_FP16)
    assert msg.encoding == pb.ENCODING_RAW  # same bytes, recorded as lossless
    msg.encoding = pb.ENCODING_FP16  # a peer may still declare it
    out = codec.decode(msg)
    assert out.dtype == np.float16 and out.flags.owndata is False


@pytest.mark.parametrize("encoding", [pb.ENCODING_FP16, pb.ENCODING_INT8])
def test_lossy_decode_returns_a_writeable_array_of_the_tensor_dtype(encoding):
    out = roundtrip(sample(np.float32, (4, 4)), encoding)
    assert out.dtype == np.float32
    assert out.flags.writeable


# ----------------------------------------------------------------- FP16 --


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sigma", [1e-6, 1e-3, 1.0, 1e2, 1e4])
def test_fp16_within_documented_bound(dtype, sigma):
    rng = np.random.default_rng(RNG_SEED)
    x = (rng.standard_normal(200_000) * sigma).astype(dtype)
    x = x[np.abs(x) < codec.FP16_MAX]  # the 1e4 case has a few 4-sigma tails beyond half range
    out = roundtrip(x, pb.ENCODING_FP16)
    assert out.dtype == dtype
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= fp16_bound(x))
    assert err.max() <= codec.max_abs_error(x, pb.ENCODING_FP16)
    normal = np.abs(x) >= 2.0**-14
    if normal.any():
        relative = err[normal] / np.abs(x[normal].astype(np.float64))
        assert relative.max() <= codec.FP16_RELATIVE_ERROR
        assert relative.max() >= codec.FP16_RELATIVE_ERROR / 2  # tight
    if (~normal).any():
        assert err[~normal].max() <= codec.FP16_SUBNORMAL_ABS_ERROR


def test_fp16_edges_of_the_half_range():
    x = np.array([65504.0, -65504.0, 65519.0, 2.0**-24, 2.0**-26, 0.0, -0.0], np.float32)
    out = roundtrip(x, pb.ENCODING_FP16)
    assert np.all(np.isfinite(out))
    assert out[2] == 65504.0
    assert np.all(np.abs(out.astype(np.float64) - x) <= fp16_bound(x))


def test_fp16_carries_nan_and_inf():
    x = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    out = roundtrip(x, pb.ENCODING_FP16)
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf and out[3] == 1.0


@pytest.mark.parametrize("value", [65520.0, -7e4, 1e30])
def test_fp16_refuses_values_that_would_become_inf(value):
    x = np.zeros((2, 3), np.float64)
    x[1, 2] = value
    with pytest.raises(CodecError, match=r"tensor 'big'.*index \[1, 2\] is beyond float16 range"):
        codec.encode(x, "big", pb.ENCODING_FP16)
    with pytest.raises(CodecError, match="float16 range"):
        codec.max_abs_error(x, pb.ENCODING_FP16)


def test_fp16_from_big_endian_and_strided_input():
    base = sample(np.float32, (8, 6)).astype(">f4")[::2, ::-1]
    out = roundtrip(base, pb.ENCODING_FP16)
    assert out.dtype == np.dtype("<f4")
    assert np.all(np.abs(out.astype(np.float64) - base.astype(np.float64)) <= fp16_bound(base))


# ----------------------------------------------------------------- INT8 --


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("sigma", "mean"), [(1e-3, 0.0), (1.0, 0.0), (1.0, 3.0), (50.0, -10.0), (1e3, 0.0)])
def test_int8_within_documented_bound_and_tight(dtype, sigma, mean):
    rng = np.random.default_rng(RNG_SEED)
    x = (rng.standard_normal(100_000) * sigma + mean).astype(dtype)
    msg = codec.encode(x, "t", pb.ENCODING_INT8)
    assert msg.encoding == pb.ENCODING_INT8
    out = codec.decode(msg)
    assert out.dtype == dtype
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    documented = (hi - lo) / 510  # scale / 2
    assert msg.scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert 0 <= msg.zero_point <= 255
    bound = codec.max_abs_error(x, pb.ENCODING_INT8)
    slack = 1e-4 if dtype != np.float16 else 2 * codec.FP16_RELATIVE_ERROR * max(abs(lo), hi) / documented
    assert documented <= bound <= documented * (1 + slack) + (2.0**-25 if dtype == np.float16 else 0.0)
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    assert err.max() <= bound
    assert err.max() >= bound / 4  # the bound is not loose


def test_int8_min_maps_to_zero_and_zero_stays_exact():
    rng = np.random.default_rng(RNG_SEED)
    x = np.maximum(rng.standard_normal((64, 64)).astype(np.float32), 0)  # ReLU output
    x[0, 0] = -0.25
    msg = codec.encode(x, "t", pb.ENCODING_INT8)
    q = np.frombuffer(msg.payload, np.uint8).reshape(x.shape)
    assert q[0, 0] == 0
    out = codec.decode(msg)
    assert np.all(out[x == 0] == 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("value", [3.7, -2.2, 0.0, 1e-30, -6.5e4, 1e-7])
def test_int8_constant_tensor_is_exact(dtype, value):
    x = np.full((5, 3), value, dtype)
    out = roundtrip(x, pb.ENCODING_INT8)
    assert np.array_equal(out, x)
    assert codec.max_abs_error(x, pb.ENCODING_INT8) == 0.0


def test_int8_float64_constant_comes_back_as_float32_value():
    x = np.full(4, 0.1, np.float64)
    out = roundtrip(x, pb.ENCODING_INT8)
    assert out.dtype == np.float64
    assert np.all(out == float(np.float32(0.1)))
    assert codec.max_abs_error(x, pb.ENCODING_INT8) == pytest.approx(abs(0.1 - float(np.float32(0.1))))


def test_int8_float16_full_range_does_not_overflow():
    x = np.array([-65504, 65504, 0, 1000], np.float16)
    out = roundtrip(x, pb.ENCODING_INT8)
    assert np.all(np.isfinite(out))
    assert np.abs(out.astype(np.float64) - x).max() <= codec.max_abs_error(x, pb.ENCODING_INT8)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_refuses_non_finite(bad):
    x = np.ones(10, np.float32)
    x[3] = bad
    with pytest.raises(CodecError, match=r"tensor 'act'.*non-finite.*meaningless"):
        codec.encode(x, "act", pb.ENCODING_INT8)


def test_int8_refuses_range_beyond_float32_scale():
    x = np.array([-1e300, 1e300])
    with pytest.raises(CodecError, match="too wide"):
        codec.encode(x, "w", pb.ENCODING_INT8)


# ------------------------------------------------ empty, non-float, lossless --


@pytest.mark.parametrize("enum", list(ALL_DTYPES))
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", [(0,), (2, 0, 5)])
def test_empty_tensors_every_encoding(enum, encoding, shape):
    x = np.zeros(shape, ALL_DTYPES[enum])
    out = roundtrip(x, encoding)
    assert out.shape == shape and out.dtype == codec.pb_to_dtype(enum)
    assert codec.max_abs_error(x, encoding) == 0.0


@pytest.mark.parametrize("enum", [e for e, t in ALL_DTYPES.items() if np.dtype(t).kind != "f"])
@pytest.mark.parametrize("encoding", [pb.ENCODING_FP16, pb.ENCODING_INT8])
def test_integer_and_bool_tensors_are_never_quantised(enum, encoding):
    x = sample(ALL_DTYPES[enum], (3, 7))
    msg = codec.encode(x, "idx", encoding)
    assert msg.encoding == pb.ENCODING_RAW
    assert np.array_equal(codec.decode(msg), x)
    assert codec.max_abs_error(x, encoding) == 0.0


# ------------------------------------------------------------ wire_bytes --


@pytest.mark.parametrize("enum", list(ALL_DTYPES))
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_wire_bytes_matches_payload(enum, encoding, shape):
    x = sample(ALL_DTYPES[enum], shape)
    size = len(codec.encode(x, "t", encoding).payload)
    dt = np.dtype(ALL_DTYPES[enum])
    assert codec.wire_bytes(shape, dt, encoding) == size
    assert codec.wire_bytes(list(shape), dt.name, encoding) == size  # partitioner passes names
    assert codec.wire_bytes(shape, enum, encoding) == size  # or pb.DType values
    assert codec.wire_bytes(shape, dt.newbyteorder(">"), encoding) == size


def test_wire_bytes_refuses_dynamic_dims_and_unknown_things():
    with pytest.raises(CodecError, match="negative dimension"):
        codec.wire_bytes((-1, 3), "float32", pb.ENCODING_RAW)
    with pytest.raises(CodecError, match="no wire representation"):
        codec.wire_bytes((2,), "complex64", pb.ENCODING_RAW)
    with pytest.raises(CodecError, match="unknown Encoding value 7"):
        codec.wire_bytes((2,), "float32", 7)


# ---------------------------------------------------------- dtype mapping --


@pytest.mark.parametrize("enum", list(ALL_DTYPES))
def test_dtype_mapping_roundtrip(enum):
    dt = codec.pb_to_dtype(enum)
    assert dt == np.dtype(ALL_DTYPES[enum])
    assert dt.byteorder in "<|="
    assert codec.dtype_to_pb(dt) == enum
    assert codec.dtype_to_pb(dt.newbyteorder(">")) == enum


@pytest.mark.parametrize("value", [pb.DTYPE_UNSPECIFIED, 42])
def test_pb_to_dtype_refuses_unknown(value):
    with pytest.raises(CodecError, match=f"DType value {value}"):
        codec.pb_to_dtype(value)


@pytest.mark.parametrize(
    "array",
    [
        np.array([object(), 1], dtype=object),
        np.array([1 + 2j], np.complex64),
        np.array(["ab"]),
        np.array([b"ab"]),
        np.array([1], np.uint16),
        np.array([1], np.uint64),
        np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]),
        np.array(["2024-01-01"], "datetime64[D]"),
    ],
    ids=["object", "complex", "str", "bytes", "uint16", "uint64", "structured", "datetime"],
)
def test_encode_refuses_unsupported_dtypes(array):
    with pytest.raises(CodecError, match=r"tensor 'odd'.*no wire representation"):
        codec.encode(array, "odd")


def test_encode_refuses_non_arrays_and_unknown_encodings():
    with pytest.raises(CodecError, match=r"tensor 'l'.*numpy array.*list"):
        codec.encode([1.0, 2.0], "l")
    with pytest.raises(CodecError, match=r"tensor 'x'.*unknown Encoding value 9"):
        codec.encode(np.ones(2, np.float32), "x", 9)


# ------------------------------------------------------- malformed messages --


def good(encoding: int = pb.ENCODING_RAW, dtype=np.float32, shape=(2, 3)) -> pb.Tensor:
    return codec.encode(sample(dtype, shape), "bad", encoding)


def set_fields(**fields):
    def mutate(msg: pb.Tensor) -> None:
        for key, value in fields.items():
            if key == "shape":
                del msg.shape[:]
                msg.shape.extend(value)
            else:
                setattr(msg, key, value)

    return mutate


MALFORMED = [
    ("dtype-unspecified", good, set_fields(dtype=0), "dtype is unspecified"),
    ("dtype-unknown", good, set_fields(dtype=99), "unknown DType value 99"),
    ("encoding-unknown", good, set_fields(encoding=12), "unknown Encoding value 12"),
    ("negative-dim", good, set_fields(shape=[2, -3]), "negative dimension -3 at axis 1"),
    ("huge-dim", good, set_fields(shape=[2**40, 0]), "exceeds the cap"),
    ("too-many-elements", good, set_fields(shape=[2**16, 2**16, 2]), "8589934592 elements, over the cap"),
    ("payload-over-2GiB", good, set_fields(shape=[2**30, 2]), "over the cap of 2147483648 bytes"),
    ("too-many-dims", good, set_fields(shape=[1] * 33), "rank 33"),
    ("payload-short", good, set_fields(payload=b"\0" * 20), "payload is 20 bytes, expected 24 bytes"),
    ("payload-long", good, set_fields(payload=b"\0" * 28), "payload is 28 bytes, expected 24 bytes"),
    ("shape-mismatch", good, set_fields(shape=[7]), "payload is 24 bytes, expected 28 bytes"),
    (
        "fp16-size",
        lambda: good(pb.ENCODING_FP16),
        set_fields(shape=[3, 3]),
        "payload is 12 bytes, expected 18 bytes",
    ),
    ("int8-size", lambda: good(pb.ENCODING_INT8), set_fields(shape=[7]), "payload is 6 bytes, expected 7 bytes"),
    ("int8-scale-nan", lambda: good(pb.ENCODING_INT8), set_fields(scale=float("nan")), "scale must be finite"),
    ("int8-scale-inf", lambda: good(pb.ENCODING_INT8), set_fields(scale=float("inf")), "scale must be finite"),
    ("int8-scale-zero", lambda: good(pb.ENCODING_INT8), set_fields(scale=0.0), "finite and positive, got 0.0"),
    ("int8-scale-negative", lambda: good(pb.ENCODING_INT8), set_fields(scale=-1.0), "positive, got -1.0"),
    ("int8-zp-low", lambda: good(pb.ENCODING_INT8), set_fields(zero_point=-1), "zero_point -1 is outside [0, 255]"),
    ("int8-zp-high", lambda: good(pb.ENCODING_INT8), set_fields(zero_point=256), "zero_point 256 is outside"),
    (
        "fp16-on-int32",
        lambda: good(dtype=np.int32),
        set_fields(encoding=pb.ENCODING_FP16, payload=b"\0" * 12),
        "ENCODING_FP16 declared for DTYPE_INT32",
    ),
    (
        "int8-on-bool",
        lambda: good(dtype=np.bool_),
        set_fields(encoding=pb.ENCODING_INT8, scale=1.0),
        "ENCODING_INT8 declared for DTYPE_BOOL",
    ),
    ("bool-not-0-1", lambda: good(dtype=np.bool_), set_fields(payload=b"\0\1\2\0\1\0"), "other than 0 and 1"),
]


@pytest.mark.parametrize(("make", "mutate", "words"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_message_raises_codec_error(make, mutate, words):
    msg = make()
    mutate(msg)
    msg = pb.Tensor.FromString(msg.SerializeToString())  # as received
    with pytest.raises(CodecError) as caught:
        codec.decode(msg)
    assert words in str(caught.value)
    assert str(caught.value).startswith("tensor 'bad': ")


def test_codec_error_is_a_value_error_and_unnamed_tensors_say_so():
    assert issubclass(CodecError, ValueError)
    msg = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], payload=b"\0")
    with pytest.raises(CodecError, match="^unnamed tensor: payload is 1 bytes, expected 8 bytes"):
        codec.decode(msg)
