"""Build Tandem's seeded reference tensor models.

No machine may fetch weights from a model hub, so tests and benchmarks use these:
real ONNX graphs with realistic per-layer cost and tensor sizes, and seeded weights
so the same seed always writes byte-identical files.

Models (``MODELS``, name -> builder; ``build_all`` writes ``<name>.onnx``):

- ``mobilenet``: a MobileNet-v1-style chain, static 1x3x224x224.
- ``resnet``: a ResNet-style DAG with a dynamic batch and a Shape-driven flatten.
- ``detector``: a YOLO-style detector, input ``images`` [N, 3, H, W] with N, H, W
  dynamic; a strided backbone with residual bottlenecks and an SPPF block, an FPN neck
  (Resize x2 by Shape-computed ``sizes`` and by ``scales``, Concat and Add with the
  laterals), a class and a box branch per level, Shape-driven Reshape/Transpose/Concat
  into ``scores`` [N, anchors, 80] and ``boxes`` [N, anchors, 4]. H and W must be
  multiples of 32: at most other sizes (80, 336, ...) an upsampled level no longer
  matches its lateral and onnxruntime fails in the neck, as real detectors do.
- ``branchy``: a CRNN-style text recogniser, input ``images`` [N, 3, 32, W] with N, W
  dynamic; Inception blocks (1x1, 3x3, two 3x3, pool branches concatenated) and a
  per-column head: ``logits`` [N, ceil(W / 4), 37].

Metadata: models with dynamic image dimensions carry ``metadata_props`` key
``tandem.profile_shapes`` (``PROFILE_SHAPES_KEY``) whose value is a JSON object
mapping each graph input to the concrete shape its app would send, e.g.
``{"images": [1, 3, 320, 320]}``; a profiler should measure at these shapes, since
every dynamic dimension set to 1 fails or mispredicts on such graphs.
``read_profile_shapes`` parses it. mobilenet and resnet carry no metadata (their
files stay byte-identical to earlier builds; resnet's only dynamic dimension is N).
"""

from __future__ import annotations

import argparse
import json
import logging
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from partitioner.shapes import METADATA_KEY, check_shapes, declared_inputs, metadata_shapes

logger = logging.getLogger(__name__)

OPSET = 17
# IR 8 is the version that shipped with opset 17 (onnx 1.12); onnxruntime 1.32 accepts it.
IR_VERSION = 8
NUM_CLASSES = 1000
IMAGE_SIZE = 224
PROFILE_SHAPES_KEY = METADATA_KEY

# MobileNet v1 (Howard et al. 2017, Table 1) with two of the five 14x14 512-channel
# blocks dropped: (pointwise output channels, depthwise stride) before the width
# multiplier. 11 blocks give 2 cut points each, plus 3 in the head = 25 cuts; at
# full width the model runs in ~5.5 ms on two x86 cores (measured on the dev VM).
_MOBILENET_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
_MOBILENET_WIDTH = 1.0
_MOBILENET_STEM = 32

# ResNet-18 layout (He et al. 2016) at a quarter of the width to stay light on a Pi.
_RESNET_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
_RESNET_BLOCKS_PER_STAGE = 2

# Detector: a YOLOv5-style layout (Ultralytics YOLOv5: strided 3x3 convs, residual
# bottlenecks, SPPF, SiLU, 3 anchors per level, 80 COCO classes) at about YOLOv5n's
# cost: YOLOv5n is 4.5 GFLOPs at 640x640 (YOLOv5 README table), so ~1.1 at 320x320
# (FLOPs scale with pixels). This one: 1.15 GFLOPs (partitioner.work count) and 1.41 M
# parameters (5.7 MB) at 320x320; onnxruntime 12.7 ms best / 25 ms median of 50 runs,
# one thread, on the 2-vCPU dev VM under load from other jobs.
_DETECTOR_STEM = 16
_DETECTOR_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)   # stages at strides 4, 8, 16, 32
_DETECTOR_NECK = 64
_DETECTOR_ANCHORS = 3
_DETECTOR_CLASSES = 80
# What the app sends: a quarter of the pixels of Ultralytics' default 640 export size,
# our choice for a Pi-class CPU (a multiple of the /32 stride, as every input must be).
_DETECTOR_PROFILE_SIZE = 320

# Recogniser: CRNN's fixed 32-pixel text-line height (Shi, Bai, Yao, TPAMI 2017) and
# 37 classes (26 letters + 10 digits + the CTC blank, as CRNN's lexicon-free setting);
# width 320 as PP-OCR's recogniser input (rec_image_shape 3,48,320).
_RECOGNISER_HEIGHT = 32
_RECOGNISER_PROFILE_WIDTH = 320
_RECOGNISER_CLASSES = 37
# Inception blocks (Szegedy et al. 2015; two 3x3 for the 5x5 as in Inception v3):
# (1x1, 3x3 reduce, 3x3, double-3x3 reduce, double-3x3, pool projection) channels.
# Each block is followed by a (2, 1) max pool, so H goes 8 -> 4 -> 2 -> 1 and W stays W/4.
_INCEPTION_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (32, 32, 48, 16, 24, 24),
    (64, 48, 96, 32, 48, 48),
    (64, 48, 96, 32, 48, 48),
)

Shape = Sequence[int | str]


class _Builder:
    """Accumulates nodes and seeded initializers for one graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        self._names.add(name)
        return name

    def shared_weight(self, name: str, values: Sequence[float] | float) -> str:
        """A float constant used by several nodes (Clip bounds, Resize scales), added once."""
        if name not in self._names:
            self.weight(name, np.array(values))
        return name

    def int64(self, *values: int) -> str:
        """A shared int64 1-D constant (Slice bounds, Reshape targets), added once per value."""
        name = "i64_" + "_".join(str(v).replace("-", "m") for v in values)
        if name not in self._names:
            self.initializers.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
            self._names.add(name)
        return name

    def node(self, op_type: str, inputs: Sequence[str], name: str, **attrs: object) -> str:
        """Add a single-output node whose output tensor is named after the node."""
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def conv(
        self, x: str, name: str, *, in_channels: int, out_channels: int, kernel: int,
        stride: int | tuple[int, int] = 1, group: int = 1, bias: bool = False,
    ) -> str:
        """Conv, He-initialised; without bias unless no BatchNormalization follows (a head).

        He init (std = sqrt(2 / fan_in)) keeps the activation scale roughly constant
        through ReLU layers, so 30 layers of random weights neither vanish nor explode.
        """
        fan_in = in_channels // group * kernel * kernel
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (out_channels, in_channels // group, kernel, kernel))
        inputs = [x, self.weight(f"{name}.weight", w)]
        if bias:
            inputs.append(self.weight(f"{name}.bias", self.rng.normal(0.0, 0.01, out_channels)))
        strides = [stride, stride] if isinstance(stride, int) else list(stride)
        pad = kernel // 2
        return self.node(
            "Conv", inputs, name,
            kernel_shape=[kernel, kernel], strides=strides, pads=[pad] * 4, group=group,
        )

    def batchnorm(self, x: str, name: str, *, channels: int, gamma: tuple[float, float] = (0.8, 1.2)) -> str:
        """Inference-mode BN with plausible trained statistics (kept unfolded on purpose)."""
        self.weight(f"{name}.scale", self.rng.uniform(*gamma, channels))
        self.weight(f"{name}.bias", self.rng.normal(0.0, 0.1, channels))
        self.weight(f"{name}.mean", self.rng.normal(0.0, 0.1, channels))
        self.weight(f"{name}.var", self.rng.uniform(0.5, 1.5, channels))
        return self.node(
            "BatchNormalization",
            [x, f"{name}.scale", f"{name}.bias", f"{name}.mean", f"{name}.var"],
            name, epsilon=1e-5,
        )

    def activation(self, x: str, name: str, kind: str) -> str:
        """Node names end in the activation: relu, relu6 (Clip), or silu (x * Sigmoid(x), as torch exports it)."""
        if kind == "relu":
            return self.node("Relu", [x], f"{name}_relu")
        if kind == "relu6":
            return self.node("Clip", [x, *self.relu6_bounds()], f"{name}_relu6")
        if kind == "silu":
            gate = self.node("Sigmoid", [x], f"{name}_sigmoid")
            return self.node("Mul", [x, gate], f"{name}_silu")
        raise ValueError(f"unknown activation {kind!r}; known: relu, relu6, silu")

    def relu6_bounds(self) -> tuple[str, str]:
        """The Clip bounds, shared by every ReLU6 and added once."""
        return self.shared_weight("relu6.min", 0.0), self.shared_weight("relu6.max", 6.0)

    def conv_bn_act(
        self, x: str, name: str, *, act: str, gamma: tuple[float, float] = (0.8, 1.2), **conv: int,
    ) -> str:
        y = self.conv(x, name, **conv)
        y = self.batchnorm(y, f"{name}_bn", channels=conv["out_channels"], gamma=gamma)
        return self.activation(y, name, act)

    def shape_slice(self, x: str, name: str, start: int, end: int) -> str:
        """Dimensions [start, end) of x at run time, as exporters write `x.shape[start:end]`."""
        shape = self.node("Shape", [x], f"{name}_shape")
        return self.node("Slice", [shape, self.int64(start), self.int64(end), self.int64(0)], f"{name}_dims")

    def classifier(self, x: str, *, features: int) -> str:
        # std 1/sqrt(fan_in) keeps logits O(1), so absolute tolerances in tests mean something.
        self.weight("fc.weight", self.rng.normal(0.0, 1.0 / np.sqrt(features), (NUM_CLASSES, features)))
        self.weight("fc.bias", self.rng.normal(0.0, 0.01, NUM_CLASSES))
        self.nodes.append(helper.make_node(
            "Gemm", [x, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1,
        ))
        return "logits"

    def model(
        self, name: str, inputs: Mapping[str, Shape], outputs: Mapping[str, Shape], *,
        profile_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs.items()],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph, producer_name="tandem.modelzoo", opset_imports=[helper.make_opsetid("", OPSET)],
        )
        model.ir_version = IR_VERSION
        if profile_shapes is not None:
            value = json.dumps({k: list(v) for k, v in profile_shapes.items()}, sort_keys=True, separators=(",", ":"))
            helper.set_model_props(model, {PROFILE_SHAPES_KEY: value})
        onnx.checker.check_model(model, full_check=True)
        return model


def read_profile_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The input shapes a model declares under PROFILE_SHAPES_KEY ({} when it declares none).

    partitioner.shapes owns the key and its parser (the profiler reads it there);
    ShapeError (a ValueError) when the entry is malformed or names no real input.
    """
    declared = metadata_shapes(model)
    return {} if declared is None else check_shapes(declared_inputs(model), declared, f"{PROFILE_SHAPES_KEY} of {model.graph.name!r}")


def build_chain(seed: int = 0) -> onnx.ModelProto:
    """MobileNet-v1-style chain ("mobilenet"): every cut crosses exactly one tensor."""
    b = _Builder(seed)
    b.relu6_bounds()  # first in the file, as the models written before the shared helpers had them
    channels = int(_MOBILENET_STEM * _MOBILENET_WIDTH)
    x = b.conv_bn_act("input", "stem", act="relu6", in_channels=3, out_channels=channels, kernel=3, stride=2)
    for i, (out, stride) in enumerate(_MOBILENET_BLOCKS, start=1):
        out = int(out * _MOBILENET_WIDTH)
        x = b.conv_bn_act(
            x, f"block{i}_dw", act="relu6", in_channels=channels, out_channels=channels, kernel=3,
            stride=stride, group=channels,
        )
        x = b.conv_bn_act(x, f"block{i}_pw", act="relu6", in_channels=channels, out_channels=out, kernel=1)
        channels = out
    x = b.node("GlobalAveragePool", [x], "avgpool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    b.classifier(x, features=channels)
    return b.model("mobilenet", {"input": [1, 3, IMAGE_SIZE, IMAGE_SIZE]}, {"logits": [1, NUM_CLASSES]})


def build_dag(seed: int = 0) -> onnx.ModelProto:
    """ResNet-style DAG ("resnet") with a dynamic batch: cuts inside blocks cross the skip too."""
    b = _Builder(seed)

    def basic_block(x: str, name: str, *, in_channels: int, out_channels: int, stride: int) -> str:
        y = b.conv(x, f"{name}_conv1", in_channels=in_channels, out_channels=out_channels, kernel=3, stride=stride)
        y = b.batchnorm(y, f"{name}_bn1", channels=out_channels)
        y = b.node("Relu", [y], f"{name}_relu1")
        y = b.conv(y, f"{name}_conv2", in_channels=out_channels, out_channels=out_channels, kernel=3)
        # Small gammas on the last BN of a residual branch, as trained ResNets have
        # (and "zero-init residual" starts from): without them the variance doubles
        # at every Add and random logits reach the hundreds.
        y = b.batchnorm(y, f"{name}_bn2", channels=out_channels, gamma=(0.1, 0.3))
        skip = x
        if stride != 1 or in_channels != out_channels:
            skip = b.conv(
                x, f"{name}_down", in_channels=in_channels, out_channels=out_channels, kernel=1, stride=stride,
            )
            skip = b.batchnorm(skip, f"{name}_down_bn", channels=out_channels)
        y = b.node("Add", [y, skip], f"{name}_add")
        return b.node("Relu", [y], f"{name}_relu2")

    channels = _RESNET_WIDTHS[0]
    x = b.conv("input", "stem_conv", in_channels=3, out_channels=channels, kernel=7, stride=2)
    x = b.batchnorm(x, "stem_bn", channels=channels)
    x = b.node("Relu", [x], "stem_relu")
    x = b.node("MaxPool", [x], "stem_pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for stage, width in enumerate(_RESNET_WIDTHS, start=1):
        for block in range(1, _RESNET_BLOCKS_PER_STAGE + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            x = basic_block(x, f"layer{stage}_{block}", in_channels=channels, out_channels=width, stride=stride)
            channels = width
    x = b.node("GlobalAveragePool", [x], "avgpool")
    # Flatten the way torch.onnx writes `x.view(x.size(0), -1)`: shape arithmetic in the graph.
    b.nodes.append(helper.make_node(
        "Constant", [], ["flatten_index"], name="flatten_index",
        value=helper.make_tensor("flatten_index", TensorProto.INT64, [], [0]),
    ))
    b.nodes.append(helper.make_node(
        "Constant", [], ["flatten_axes"], name="flatten_axes",
        value=helper.make_tensor("flatten_axes", TensorProto.INT64, [1], [0]),
    ))
    b.nodes.append(helper.make_node(
        "Constant", [], ["flatten_rest"], name="flatten_rest",
        value=helper.make_tensor("flatten_rest", TensorProto.INT64, [1], [-1]),
    ))
    shape = b.node("Shape", [x], "flatten_shape")
    batch = b.node("Gather", [shape, "flatten_index"], "flatten_batch", axis=0)
    batch = b.node("Unsqueeze", [batch, "flatten_axes"], "flatten_batch_1d")
    target = b.node("Concat", [batch, "flatten_rest"], "flatten_target", axis=0)
    x = b.node("Reshape", [x, target], "flatten")
    b.classifier(x, features=channels)
    return b.model("resnet", {"input": ["N", 3, IMAGE_SIZE, IMAGE_SIZE]}, {"logits": ["N", NUM_CLASSES]})


def build_detector(seed: int = 0) -> onnx.ModelProto:
    """YOLO-style detector ("detector") with dynamic N, H, W: branches, FPN neck, Shape subgraphs.

    What real detectors bring that the chain and the ResNet do not: parallel branches
    that rejoin (SPPF pools, the neck's upsample + lateral), tensors whose size follows
    the input's H and W, shape arithmetic that cuts must carry, and two outputs.
    """
    b = _Builder(seed)
    act = "silu"

    def bottleneck(x: str, name: str, *, channels: int) -> str:
        """YOLOv5's Bottleneck (1x1 to half width, 3x3 back, shortcut Add)."""
        y = b.conv_bn_act(x, f"{name}_cv1", act=act, in_channels=channels, out_channels=channels // 2, kernel=1)
        # Small gammas on the branch's last BN, as in build_dag: the Add must not double the variance.
        y = b.conv_bn_act(
            y, f"{name}_cv2", act=act, gamma=(0.1, 0.3), in_channels=channels // 2, out_channels=channels, kernel=3,
        )
        return b.node("Add", [x, y], f"{name}_add")

    def sppf(x: str, name: str, *, channels: int) -> str:
        """YOLOv5's SPPF: three chained 5x5 max pools, all four tensors concatenated."""
        hidden = channels // 2
        y = b.conv_bn_act(x, f"{name}_cv1", act=act, in_channels=channels, out_channels=hidden, kernel=1)
        pooled = [y]
        for k in range(1, 4):
            pooled.append(b.node(
                "MaxPool", [pooled[-1]], f"{name}_pool{k}", kernel_shape=[5, 5], strides=[1, 1], pads=[2] * 4,
            ))
        y = b.node("Concat", pooled, f"{name}_concat", axis=1)
        return b.conv_bn_act(y, f"{name}_cv2", act=act, in_channels=4 * hidden, out_channels=channels, kernel=1)

    def upsample_by_sizes(x: str, name: str) -> str:
        """Nearest x2 with `sizes` from the run-time shape, as torch writes interpolate(size=...)."""
        batch_channels = b.shape_slice(x, f"{name}_nc", 0, 2)
        height_width = b.shape_slice(x, f"{name}_hw", 2, 4)
        doubled = b.node("Mul", [height_width, b.int64(2)], f"{name}_hw2")
        sizes = b.node("Concat", [batch_channels, doubled], f"{name}_sizes", axis=0)
        return b.node(
            "Resize", [x, "", "", sizes], name,
            mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor",
        )

    def upsample_by_scales(x: str, name: str) -> str:
        """Nearest x2 with constant `scales`, as torch writes nn.Upsample(scale_factor=2)."""
        scales = b.shared_weight("upsample.scales", [1.0, 1.0, 2.0, 2.0])
        return b.node(
            "Resize", [x, "", scales], name,
            mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor",
        )

    def flatten_predictions(x: str, name: str, *, per_anchor: int) -> str:
        """[N, A*K, h, w] -> [N, A*h*w, K] the way YOLOv5's export writes view/permute/reshape."""
        batch = b.shape_slice(x, f"{name}_n", 0, 1)
        split = b.node("Concat", [batch, b.int64(_DETECTOR_ANCHORS, per_anchor, -1)], f"{name}_split_shape", axis=0)
        y = b.node("Reshape", [x, split], f"{name}_split")
        y = b.node("Transpose", [y], f"{name}_transpose", perm=[0, 1, 3, 2])
        rows = b.node("Concat", [batch, b.int64(-1, per_anchor)], f"{name}_rows_shape", axis=0)
        return b.node("Reshape", [y, rows], f"{name}_rows")

    def head(x: str, name: str, *, per_anchor: int) -> str:
        y = b.conv_bn_act(x, f"{name}_conv", act=act, in_channels=_DETECTOR_NECK, out_channels=_DETECTOR_NECK, kernel=3)
        y = b.conv(
            y, f"{name}_pred", in_channels=_DETECTOR_NECK, out_channels=_DETECTOR_ANCHORS * per_anchor, kernel=1,
            bias=True,
        )
        return flatten_predictions(y, name, per_anchor=per_anchor)

    # Backbone: a strided 3x3 conv per stage, then a bottleneck; SPPF at stride 32.
    x = b.conv_bn_act("images", "stem", act=act, in_channels=3, out_channels=_DETECTOR_STEM, kernel=3, stride=2)
    channels = _DETECTOR_STEM
    features: list[tuple[str, int]] = []
    for stage, width in enumerate(_DETECTOR_WIDTHS, start=1):
        x = b.conv_bn_act(
            x, f"stage{stage}_down", act=act, in_channels=channels, out_channels=width, kernel=3, stride=2,
        )
        x = bottleneck(x, f"stage{stage}_block", channels=width)
        channels = width
        features.append((x, width))
    c5 = sppf(features[3][0], "sppf", channels=channels)
    (c3, c3_width), (c4, c4_width) = features[1], features[2]

    # FPN neck, top-down: 1x1 laterals; P4 = smooth(Concat(up(P5), lat4)), P3 = smooth(up(P4) + lat3).
    neck = _DETECTOR_NECK
    p5 = b.conv_bn_act(c5, "lat5", act=act, in_channels=channels, out_channels=neck, kernel=1)
    lat4 = b.conv_bn_act(c4, "lat4", act=act, in_channels=c4_width, out_channels=neck, kernel=1)
    p4 = b.node("Concat", [upsample_by_sizes(p5, "up5"), lat4], "p4_concat", axis=1)
    p4 = b.conv_bn_act(p4, "p4_smooth", act=act, in_channels=2 * neck, out_channels=neck, kernel=3)
    lat3 = b.conv_bn_act(c3, "lat3", act=act, in_channels=c3_width, out_channels=neck, kernel=1)
    p3 = b.node("Add", [upsample_by_scales(p4, "up4"), lat3], "p3_add")
    p3 = b.conv_bn_act(p3, "p3_smooth", act=act, in_channels=neck, out_channels=neck, kernel=3)

    # Heads: a class and a box branch per level, all levels' rows concatenated.
    levels = (("p3", p3), ("p4", p4), ("p5", p5))
    classes = [head(p, f"{level}_cls", per_anchor=_DETECTOR_CLASSES) for level, p in levels]
    boxes = [head(p, f"{level}_box", per_anchor=4) for level, p in levels]
    class_logits = b.node("Concat", classes, "class_logits", axis=1)
    b.node("Sigmoid", [class_logits], "scores")
    b.node("Concat", boxes, "boxes", axis=1)
    size = _DETECTOR_PROFILE_SIZE
    return b.model(
        "detector",
        {"images": ["N", 3, "H", "W"]},
        {"scores": ["N", "anchors", _DETECTOR_CLASSES], "boxes": ["N", "anchors", 4]},
        profile_shapes={"images": [1, 3, size, size]},
    )


def build_branchy(seed: int = 0) -> onnx.ModelProto:
    """CRNN-style text recogniser ("branchy") with dynamic N and W: Inception blocks, per-column head.

    Every Inception block forks into four branches that rejoin in a Concat, so most
    positions inside a block ship several tensors; the head's size follows W.
    """
    b = _Builder(seed)
    act = "relu"

    def inception(
        x: str, name: str, *, in_channels: int, widths: tuple[int, int, int, int, int, int],
    ) -> tuple[str, int]:
        one, three_reduce, three, double_reduce, double, pool_proj = widths
        branch1 = b.conv_bn_act(x, f"{name}_1x1", act=act, in_channels=in_channels, out_channels=one, kernel=1)
        branch3 = b.conv_bn_act(
            x, f"{name}_3x3_reduce", act=act, in_channels=in_channels, out_channels=three_reduce, kernel=1,
        )
        branch3 = b.conv_bn_act(branch3, f"{name}_3x3", act=act, in_channels=three_reduce, out_channels=three, kernel=3)
        branch5 = b.conv_bn_act(
            x, f"{name}_5x5_reduce", act=act, in_channels=in_channels, out_channels=double_reduce, kernel=1,
        )
        branch5 = b.conv_bn_act(
            branch5, f"{name}_5x5_a", act=act, in_channels=double_reduce, out_channels=double, kernel=3,
        )
        branch5 = b.conv_bn_act(branch5, f"{name}_5x5_b", act=act, in_channels=double, out_channels=double, kernel=3)
        pooled = b.node("MaxPool", [x], f"{name}_pool", kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4)
        pooled = b.conv_bn_act(
            pooled, f"{name}_pool_proj", act=act, in_channels=in_channels, out_channels=pool_proj, kernel=1,
        )
        joined = b.node("Concat", [branch1, branch3, branch5, pooled], f"{name}_concat", axis=1)
        return joined, one + three + double + pool_proj

    x = b.conv_bn_act("images", "stem1", act=act, in_channels=3, out_channels=32, kernel=3, stride=2)
    x = b.conv_bn_act(x, "stem2", act=act, in_channels=32, out_channels=64, kernel=3, stride=2)
    channels = 64
    for i, widths in enumerate(_INCEPTION_BLOCKS, start=1):
        x, channels = inception(x, f"mixed{i}", in_channels=channels, widths=widths)
        # Halve H only: text lines keep their horizontal resolution (CRNN's 2x1 pooling).
        x = b.node("MaxPool", [x], f"mixed{i}_squeeze", kernel_shape=[2, 1], strides=[2, 1])

    # Im2Seq, the way exporters write it: [N, C, 1, T] -> Reshape to [N, C, T] from the
    # run-time shape -> [N, T, C]; then a per-column linear classifier.
    batch_channels = b.shape_slice(x, "im2seq_nc", 0, 2)
    target = b.node("Concat", [batch_channels, b.int64(-1)], "im2seq_target", axis=0)
    x = b.node("Reshape", [x, target], "im2seq")
    x = b.node("Transpose", [x], "columns", perm=[0, 2, 1])
    b.weight("ctc.weight", b.rng.normal(0.0, 1.0 / np.sqrt(channels), (channels, _RECOGNISER_CLASSES)))
    b.weight("ctc.bias", b.rng.normal(0.0, 0.01, _RECOGNISER_CLASSES))
    x = b.node("MatMul", [x, "ctc.weight"], "ctc_matmul")
    b.node("Add", [x, "ctc.bias"], "logits")
    return b.model(
        "branchy",
        {"images": ["N", 3, _RECOGNISER_HEIGHT, "W"]},
        {"logits": ["N", "T", _RECOGNISER_CLASSES]},
        profile_shapes={"images": [1, 3, _RECOGNISER_HEIGHT, _RECOGNISER_PROFILE_WIDTH]},
    )


# Name -> builder: the file name, the name daemons serve the model under, and --only's choices.
MODELS: Mapping[str, Callable[[int], onnx.ModelProto]] = types.MappingProxyType({
    "mobilenet": build_chain,
    "resnet": build_dag,
    "detector": build_detector,
    "branchy": build_branchy,
})


def build_all(out_dir: Path, *, seed: int = 0, names: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``<name>.onnx`` for every model in MODELS (or only `names`) into out_dir; returns name -> path."""
    selected = list(MODELS) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in selected if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(map(repr, unknown))}; known: {', '.join(MODELS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in selected:
        path = out_dir / f"{name}.onnx"
        onnx.save(MODELS[name](seed), path)
        logger.info("wrote %s", path)
        paths[name] = path
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modelzoo.build", description="Write Tandem's seeded reference ONNX models.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write <name>.onnx into, one file per model")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; same seed, same bytes")
    parser.add_argument(
        "--only", nargs="+", action="extend", choices=list(MODELS), metavar="NAME",
        help=f"write only these models (repeatable); default: all of {', '.join(MODELS)}",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in build_all(args.out_dir, seed=args.seed, names=args.only).values():
        print(path)


if __name__ == "__main__":
    main()
