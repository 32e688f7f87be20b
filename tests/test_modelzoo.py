"""modelzoo: the branchy, dynamic-shape reference models are valid, run where real ones run,
fail where real ones fail, are seeded, cut cleanly, and say what shape to profile them at."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from modelzoo import build
from modelzoo.build import (
    MODELS,
    PROFILE_SHAPES_KEY,
    build_all,
    build_branchy,
    build_detector,
    read_profile_shapes,
)
from partitioner.graph import ModelGraph, analyze, prefix_model, suffix_model

TOL = {"rtol": 1e-4, "atol": 1e-5}
# Far below float32 overflow, far above what these seeded models produce (|x| < 20):
# a value beyond it means an init or BN choice made activations blow up with depth.
SANE = 1e3


@dataclass(frozen=True)
class Case:
    builder: Callable[[int], onnx.ModelProto]
    sizes: tuple[tuple[int, int], ...]        # (H, W) the model must run at
    split_size: tuple[int, int]               # non-square (H, W) for the cut checks
    expected: Callable[[int, int, int], dict[str, tuple[int, ...]]]   # (N, H, W) -> output shapes


def _detector_shapes(n: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    anchors = 3 * sum((h // s) * (w // s) for s in (8, 16, 32))   # 3 anchors per level, strides 8/16/32
    return {"scores": (n, anchors, 80), "boxes": (n, anchors, 4)}


def _branchy_shapes(n: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    return {"logits": (n, math.ceil(w / 4), 37)}   # two stride-2 convs on W, 26 letters + 10 digits + blank


CASES = {
    "detector": Case(build_detector, ((32, 32), (96, 160), (224, 128)), (64, 96), _detector_shapes),
    "branchy": Case(build_branchy, ((32, 32), (32, 100), (32, 320)), (32, 72), _branchy_shapes),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request: pytest.FixtureRequest) -> tuple[str, onnx.ModelProto]:
    return request.param, CASES[request.param].builder(0)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1   # the machine is shared; one thread gives the same values
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _images(n: int, h: int, w: int, *, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)


def test_models_pass_the_full_checker_and_declare_dynamic_dims(built: tuple[str, onnx.ModelProto]) -> None:
    name, model = built
    onnx.checker.check_model(model, full_check=True)
    (image,) = model.graph.input
    dims = image.type.tensor_type.shape.dim
    assert image.name == "images"
    assert dims[0].dim_param == "N" and dims[1].dim_value == 3
    assert dims[3].dim_param == "W"
    if name == "detector":
        assert dims[2].dim_param == "H"
    else:
        assert dims[2].dim_value == 32   # a text recogniser sees lines of one fixed height


@pytest.mark.parametrize("batch", [1, 2])
def test_models_run_at_several_sizes_with_sane_outputs_of_the_expected_shapes(
    built: tuple[str, onnx.ModelProto], batch: int,
) -> None:
    name, model = built
    case = CASES[name]
    session = _session(model)
    for h, w in case.sizes:
        x = _images(batch, h, w)
        out = _run(session, {"images": x})
        assert {k: v.shape for k, v in out.items()} == case.expected(batch, h, w), (h, w)
        for key, value in out.items():
            assert np.isfinite(value).all() and np.abs(value).max() < SANE, (key, h, w)
            assert value.std() > 1e-3, (key, h, w)   # not collapsed to a constant either
        if batch == 2:
            # Samples do not mix: the second image alone gives the second row.
            alone = _run(session, {"images": x[1:]})
            for key in out:
                np.testing.assert_allclose(out[key][1:], alone[key], **TOL, err_msg=f"{key} at {(h, w)}")
    if name == "detector":
        scores = out["scores"]
        assert (scores >= 0).all() and (scores <= 1).all()   # a Sigmoid ends the class branch


@pytest.mark.parametrize("size", [(80, 96), (320, 336), (1, 1)])
def test_detector_fails_in_the_neck_at_sizes_that_are_not_multiples_of_32(size: tuple[int, int]) -> None:
    session = _session(build_detector(0))
    with pytest.raises(Fail, match="p4_concat|p3_add"):
        session.run(None, {"images": _images(1, *size)})


def test_same_seed_writes_the_same_bytes_and_another_seed_other_weights(tmp_path: Path) -> None:
    names = sorted(CASES)
    first = build_all(tmp_path / "a", names=names)
    again = build_all(tmp_path / "b", names=names)
    other = build_all(tmp_path / "c", seed=1, names=names)
    assert sorted(first) == names
    for name in names:
        assert first[name].read_bytes() == again[name].read_bytes(), name
        a, c = onnx.load(str(first[name])), onnx.load(str(other[name]))
        assert a.graph.node == c.graph.node   # same architecture ...
        assert a.graph.initializer != c.graph.initializer, name   # ... other weights


# sha256 of the files as written before the detector and branchy models existed (onnx 1.x
# protobuf serialisation): profile caches and deployed policies are keyed by these digests.
_LEGACY_DIGESTS = {
    "mobilenet": "e2761e6c4742708eb17ff923a6e57b9ce69e8491486608dda0261b1ea2bf73a2",
    "resnet": "ad37b96035c912a6217ec43e4e6b47304cb22af1e369178633be27a634c2037e",
}


def test_mobilenet_and_resnet_files_are_byte_identical_to_earlier_builds(tmp_path: Path) -> None:
    paths = build_all(tmp_path, names=list(_LEGACY_DIGESTS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mobilenet.onnx", "resnet.onnx"]
    for name, digest in _LEGACY_DIGESTS.items():
        assert hashlib.sha256(paths[name].read_bytes()).hexdigest() == digest, name
        assert read_profile_shapes(onnx.load(str(paths[name]))) == {}


def _run_split(graph: ModelGraph, feeds: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """Every cut's prefix then suffix, the way the edge and the cloud run them: cut index -> outputs."""
    results = {}
    for cut in graph.cuts:
        pre, post = _session(prefix_model(graph, cut)), _session(suffix_model(graph, cut))
        edge = _run(pre, {i.name: feeds[i.name] for i in pre.get_inputs()})
        shipped = {t: feeds[t] if t in cut.passthrough else edge[t] for t in cut.tensors}
        out = _run(post, shipped)
        out.update({o: edge[o] for o in cut.edge_outputs})
        results[cut.index] = out
    return results


def test_every_cut_composes_to_the_whole_model_at_a_non_square_size(built: tuple[str, onnx.ModelProto]) -> None:
    name, model = built
    graph = analyze(model)
    assert len(graph.cuts) > 20, name
    # Branches that rejoin: some cuts must ship several tensors at once.
    assert max(len(c.tensors) for c in graph.cuts) >= 3, name
    feeds = {"images": _images(1, *CASES[name].split_size, seed=1)}
    expected = _run(_session(model), feeds)
    for index, got in _run_split(graph, feeds).items():
        assert set(got) == set(graph.outputs), index
        for key in graph.outputs:
            np.testing.assert_allclose(got[key], expected[key], **TOL, err_msg=f"{name} cut {index}: {key}")


def test_detector_cuts_carry_shape_tensors_and_the_skips() -> None:
    graph = analyze(build_detector(0))
    shipped = {t for cut in graph.cuts for t in cut.tensors}
    assert "up5_nc_dims" in shipped or "up5_hw_dims" in shipped   # a cut inside the Shape subgraph
    # Between the P4 lateral and its Concat, the cut ships the lateral, P5 (or its upsample
    # and shape pieces) and C3, which waits for its own lateral further down the neck.
    inside_neck = [c for c in graph.cuts if "lat4_silu" in c.tensors]
    assert inside_neck
    for cut in inside_neck:
        assert "stage2_block_add" in cut.tensors, cut
        assert {"lat5_silu", "up5"} & set(cut.tensors), cut


def test_declared_profile_shapes_parse_and_run(built: tuple[str, onnx.ModelProto]) -> None:
    name, model = built
    shapes = read_profile_shapes(model)
    assert shapes == {"images": (1, 3, 320, 320)} if name == "detector" else {"images": (1, 3, 32, 320)}
    raw = {p.key: p.value for p in model.metadata_props}[PROFILE_SHAPES_KEY]
    assert json.loads(raw) == {k: list(v) for k, v in shapes.items()}
    n, _, h, w = shapes["images"]
    out = _run(_session(model), {"images": _images(n, h, w)})
    assert {k: v.shape for k, v in out.items()} == CASES[name].expected(n, h, w)


@pytest.mark.parametrize(("value", "why"), [
    ("not json", "not JSON"),
    ('[1, 3, 32, 32]', "must map input names to shapes"),
    ('{"pixels": [1, 3, 32, 32]}', "no input named 'pixels'"),
    ('{"images": [1, 3, -32, 32]}', "dims >= 1"),
    ('{"images": "1x3x32x32"}', "list of whole numbers"),
    ('{"images": [1, 3, 48, 32]}', "dim 2 is fixed at 32"),
])
def test_a_malformed_profile_shapes_entry_is_refused_with_the_reason(value: str, why: str) -> None:
    model = build_branchy(0)
    helper.set_model_props(model, {PROFILE_SHAPES_KEY: value})
    with pytest.raises(ValueError, match=why):
        read_profile_shapes(model)


def test_build_all_writes_every_registered_model_or_the_named_ones(tmp_path: Path) -> None:
    assert set(MODELS) == {"mobilenet", "resnet", "detector", "branchy"}
    written = build_all(tmp_path / "one", names=["branchy", "branchy"])
    assert list(written) == ["branchy"] and [p.name for p in (tmp_path / "one").iterdir()] == ["branchy.onnx"]
    with pytest.raises(ValueError, match="'yolo'.*known: mobilenet, resnet, detector, branchy"):
        build_all(tmp_path / "bad", names=["yolo"])
    assert not (tmp_path / "bad").exists()


def test_command_line_only_selects_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build.main([str(tmp_path), "--only", "branchy", "--only", "resnet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["branchy.onnx", "resnet.onnx"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "branchy.onnx"), str(tmp_path / "resnet.onnx")]
    with pytest.raises(SystemExit):
        build.main([str(tmp_path), "--only", "yolo"])
