"""Build the two reference tensor models (a MobileNet-style chain, a ResNet-style DAG).

No machine may fetch weights from a model hub, so tests and benchmarks use these:
real ONNX graphs with realistic per-layer cost and tensor sizes, and seeded weights
so the same seed always writes byte-identical files.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

OPSET = 17
# IR 8 is the version that shipped with opset 17 (onnx 1.12); onnxruntime 1.32 accepts it.
IR_VERSION = 8
NUM_CLASSES = 1000
IMAGE_SIZE = 224

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


class _Builder:
    """Accumulates nodes and seeded initializers for one graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], name: str, **attrs: object) -> str:
        """Add a single-output node whose output tensor is named after the node."""
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def conv(
        self, x: str, name: str, *, in_channels: int, out_channels: int, kernel: int,
        stride: int = 1, group: int = 1,
    ) -> str:
        """Conv without bias (BatchNormalization follows), He-initialised.

        He init (std = sqrt(2 / fan_in)) keeps the activation scale roughly constant
        through ReLU layers, so 30 layers of random weights neither vanish nor explode.
        """
        fan_in = in_channels // group * kernel * kernel
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (out_channels, in_channels // group, kernel, kernel))
        self.weight(f"{name}.weight", w)
        pad = kernel // 2
        return self.node(
            "Conv", [x, f"{name}.weight"], name,
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4, group=group,
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

    def classifier(self, x: str, *, features: int) -> str:
        # std 1/sqrt(fan_in) keeps logits O(1), so absolute tolerances in tests mean something.
        self.weight("fc.weight", self.rng.normal(0.0, 1.0 / np.sqrt(features), (NUM_CLASSES, features)))
        self.weight("fc.bias", self.rng.normal(0.0, 0.01, NUM_CLASSES))
        self.nodes.append(helper.make_node(
            "Gemm", [x, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1,
        ))
        return "logits"

    def model(
        self, name: str, input_shape: Sequence[int | str], output_shape: Sequence[int | str],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(output_shape))],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph, producer_name="tandem.modelzoo", opset_imports=[helper.make_opsetid("", OPSET)],
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model


def build_chain(seed: int = 0) -> onnx.ModelProto:
    """MobileNet-v1-style chain ("mobilenet"): every cut crosses exactly one tensor."""
    b = _Builder(seed)
    b.weight("relu6.min", np.array(0.0))
    b.weight("relu6.max", np.array(6.0))

    def conv_bn_relu6(x: str, name: str, **conv: int) -> str:
        y = b.conv(x, name, **conv)
        y = b.batchnorm(y, f"{name}_bn", channels=conv["out_channels"])
        return b.node("Clip", [y, "relu6.min", "relu6.max"], f"{name}_relu6")

    channels = int(_MOBILENET_STEM * _MOBILENET_WIDTH)
    x = conv_bn_relu6("input", "stem", in_channels=3, out_channels=channels, kernel=3, stride=2)
    for i, (out, stride) in enumerate(_MOBILENET_BLOCKS, start=1):
        out = int(out * _MOBILENET_WIDTH)
        x = conv_bn_relu6(
            x, f"block{i}_dw", in_channels=channels, out_channels=channels, kernel=3,
            stride=stride, group=channels,
        )
        x = conv_bn_relu6(x, f"block{i}_pw", in_channels=channels, out_channels=out, kernel=1)
        channels = out
    x = b.node("GlobalAveragePool", [x], "avgpool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    b.classifier(x, features=channels)
    return b.model("mobilenet", [1, 3, IMAGE_SIZE, IMAGE_SIZE], [1, NUM_CLASSES])


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
    return b.model("resnet", ["N", 3, IMAGE_SIZE, IMAGE_SIZE], ["N", NUM_CLASSES])


def build_all(out_dir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write mobilenet.onnx and resnet.onnx into out_dir; returns model name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, build in (("mobilenet", build_chain), ("resnet", build_dag)):
        path = out_dir / f"{name}.onnx"
        onnx.save(build(seed), path)
        logger.info("wrote %s", path)
        paths[name] = path
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modelzoo.build", description="Write Tandem's seeded reference ONNX models.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write mobilenet.onnx and resnet.onnx into")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; same seed, same bytes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in build_all(args.out_dir, seed=args.seed).values():
        print(path)


if __name__ == "__main__":
    main()
