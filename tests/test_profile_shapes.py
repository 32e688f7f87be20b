"""Profiles at the shapes apps send: chosen from config, the model and requests; refused when too big."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent import sdk
from modelzoo.build import build_all, build_chain, build_detector
from partitioner import shapes as shape_rules
from partitioner.graph import analyze
from runtimes import launch
from runtimes.onnx_exec import OnnxModel
from runtimes.profiler import ProfilingError, load_or_measure

RTOL, ATOL = 1e-4, 1e-5
WAIT_S = 120.0  # bounded wait for background profiling under a busy machine


def two_dynamic_inputs() -> onnx.ModelProto:
    """Two inputs sharing the symbolic length T, one of them also dynamic in F."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "T", 16]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [16, "F"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "T", "F"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def fixed_pixels_model() -> onnx.ModelProto:
    """Dynamic H/W that only runs at 100x100 (a Reshape to a constant size): no conventional shape fits."""
    shape = numpy_helper.from_array(np.array([1, 30000], np.int64), "flat")
    w = numpy_helper.from_array(np.full((30000, 4), 1e-3, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Reshape", ["r", "flat"], ["f"], name="flatten"),
         helper.make_node("MatMul", ["f", "w"], ["y"], name="fc")],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [shape, w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def huge_input_model() -> onnx.ModelProto:
    """A tiny file that declares a 16384x16384 RGB input: profiling it would allocate 3 GiB."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["r"], ["y"], name="neg")],
        "huge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16384, 16384])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16384, 16384])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# --------------------------------------------------------------------------- choosing shapes (pure)


def test_a_static_model_is_profiled_at_its_own_shape() -> None:
    (only,) = shape_rules.profile_candidates(build_chain(0))
    assert only.as_dict() == {"input": (1, 3, 224, 224)} and only.source == "model"


def test_the_detector_declares_its_shape_and_config_overrides_it() -> None:
    model = build_detector(0)
    (declared,) = shape_rules.profile_candidates(model)
    assert declared.as_dict() == {"images": (1, 3, 320, 320)} and declared.source == "model"
    (configured,) = shape_rules.profile_candidates(model, configured={"images": [2, 3, 640, 480]})
    assert configured.as_dict() == {"images": (2, 3, 640, 480)} and configured.source == "config"
    with pytest.raises(shape_rules.ShapeError, match="dim 1 is fixed at 3"):
        shape_rules.profile_candidates(model, configured={"images": [1, 4, 320, 320]})
    with pytest.raises(shape_rules.ShapeError, match="no input named 'pixels'"):
        shape_rules.profile_candidates(model, configured={"pixels": [1, 3, 320, 320]})


def test_dynamic_dims_take_conventional_sizes_batch_one_and_shared_names_agree() -> None:
    model = build_detector(0)
    del model.metadata_props[:]  # as an exporter without our key writes it
    candidates = shape_rules.profile_candidates(model)
    first = candidates[0].as_dict()["images"]
    assert first == (1, 3, 224, 224) and candidates[0].source == "default"
    assert [c.as_dict()["images"][2] for c in candidates] == list(shape_rules.SPATIAL_SIZES)
    two = shape_rules.profile_candidates(two_dynamic_inputs())
    for c in two:
        shapes = c.as_dict()
        assert shapes["a"][0] == 1 and shapes["a"][2] == 16 and shapes["b"][0] == 16
    assert len({c.as_dict()["a"][1] for c in two}) > 1  # T is tried at several lengths


def test_buckets_round_dynamic_dims_up_to_powers_of_two() -> None:
    declared = {"images": ("N", 3, "H", "W")}
    assert shape_rules.bucket({"images": (1, 3, 320, 300)}, declared) == (("images", (1, 3, 512, 512)),)
    assert shape_rules.bucket({"images": (1, 3, 480, 260)}, declared) == (("images", (1, 3, 512, 512)),)
    assert shape_rules.bucket({"images": (2, 3, 640, 640)}, declared) == (("images", (2, 3, 1024, 1024)),)
    assert shape_rules.distance({"x": (1, 64)}, {"x": (1, 64)}) == 0
    assert shape_rules.distance({"x": (1, 64)}, {"x": (1, 256)}) == 2


# --------------------------------------------------------------------------- memory bound


def test_a_huge_declared_input_is_refused_by_name_before_anything_is_allocated(tmp_path: Path) -> None:
    onnx.save(huge_input_model(), tmp_path / "huge.onnx")
    model = OnnxModel("huge", tmp_path / "huge.onnx")
    with pytest.raises(ProfilingError, match=r"needs at least 3072 MiB \(inputs 3072 MiB"):
        load_or_measure(model, cache_dir=tmp_path, budget_bytes=512 * 2**20)


def test_the_footprint_counts_inputs_weights_and_the_largest_layer() -> None:
    model = build_chain(0)
    need = shape_rules.footprint(model, {"input": (1, 3, 224, 224)}, {"input": 4})
    assert need.inputs == 3 * 224 * 224 * 4 and need.known
    assert need.weights == sum(len(t.raw_data) for t in model.graph.initializer)
    # the stem conv reads 3x224x224 and writes 32x112x112 float32 values
    assert need.largest_node >= (3 * 224 * 224 + 32 * 112 * 112) * 4


# --------------------------------------------------------------------------- daemons


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("detector")
    build_all(directory, names=["detector"])
    onnx.save(fixed_pixels_model(), directory / "fixed.onnx")
    onnx.save(huge_input_model(), directory / "huge.onnx")
    return directory


def reference(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_the_detector_is_served_and_learns_the_shapes_apps_send(detector_dir: Path) -> None:
    path = detector_dir / "detector.onnx"
    x = np.random.default_rng(3).standard_normal((1, 3, 256, 384)).astype(np.float32)
    expected = reference(path, {"images": x})
    graph = analyze(onnx.load(str(path)))
    with launch.cloud_node(detector_dir) as node, launch.edge_agent(detector_dir, [node.address]) as agent, \
            sdk.EdgeClient(agent.address) as client:
        models = {m.name: m for m in client.models()}
        assert [list(p.inputs[0].shape) for p in models["detector"].profiled] == [[1, 3, 320, 320]]
        assert models["detector"].profiled[0].source == "model" and not models["detector"].plans_unavailable

        # a shape nobody profiled: LOCAL now, profiled off the request path, planned after
        first = client.infer("detector", {"images": x})
        assert first.plan == "local" and "profiling that shape" in first.reason
        for name, value in expected.items():
            np.testing.assert_allclose(first.outputs[name], value, rtol=RTOL, atol=ATOL)
        busy = next(m for m in client.models() if m.name == "detector")
        assert list(busy.background) == ["profiling images[1,3,256,384]"] or len(busy.profiled) == 2
        launch.wait_profiled(client, "detector", [1, 3, 256, 384], timeout_s=WAIT_S)
        assert not next(m for m in client.models() if m.name == "detector").background
        planned = client.infer("detector", {"images": x})
        assert "profiling" not in planned.reason and planned.predicted["total_ms"] > 0
        assert 0 < planned.measured["plan_ms"] < planned.measured["total_ms"]
        shown = client.explain("detector", input_shapes={"images": (1, 3, 256, 384)})
        assert shown.profile_source == "measured at this shape"

        # every cut through the daemons equals the unsplit model at the request's shape
        for cut in graph.cuts[:: max(len(graph.cuts) // 12, 1)]:
            result = client.infer("detector", {"images": x}, plan=f"split:{cut.index}")
            assert (result.plan, result.fell_back) == (f"split:{cut.index}", False), result.fallback_reason
            for name, value in expected.items():
                np.testing.assert_allclose(result.outputs[name], value, rtol=RTOL, atol=ATOL)


def test_a_model_no_shape_profiles_is_served_local_and_says_why(detector_dir: Path) -> None:
    x = np.random.default_rng(4).standard_normal((1, 3, 100, 100)).astype(np.float32)
    with launch.edge_agent(detector_dir, []) as agent, sdk.EdgeClient(agent.address) as client:
        models = {m.name: m for m in client.models()}
        why = models["fixed"].plans_unavailable
        assert "x[1,3,224,224]" in why and "x[1,3,320,320]" in why  # every shape tried, named
        assert "huge" in models and "MiB profiling budget" in models["huge"].plans_unavailable
        explained = client.explain("fixed")
        assert explained.winner == "local" and "could not be profiled" in explained.why
        reply = client.infer("fixed", {"x": x})
        assert reply.plan == "local" and not reply.fell_back
        np.testing.assert_allclose(reply.outputs["y"], reference(detector_dir / "fixed.onnx", {"x": x})["y"], rtol=RTOL)
        # the request's own shape does run: it becomes the model's first profile
        launch.wait_profiled(client, "fixed", [1, 3, 100, 100], timeout_s=WAIT_S)
        assert not next(m for m in client.models() if m.name == "fixed").plans_unavailable


def test_profile_shapes_from_the_policy_file(tmp_path: Path, detector_dir: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\n[models.detector]\nprofile_shapes = { images = [1, 3, 192, 256] }\n")
    with launch.edge_agent(detector_dir, [], "--policy", str(policy)) as agent, sdk.EdgeClient(agent.address) as client:
        info = next(m for m in client.models() if m.name == "detector")
        assert [(list(p.inputs[0].shape), p.source) for p in info.profiled] == [([1, 3, 192, 256], "config")]
        # a reload that names another shape has it profiled too, off the request path
        policy.write_text("version = 1\n[models.detector]\nprofile_shapes = { images = [1, 3, 416, 416] }\n")
        agent.process.send_signal(signal.SIGHUP)
        launch.wait_profiled(client, "detector", [1, 3, 416, 416], timeout_s=WAIT_S)
        info = next(m for m in client.models() if m.name == "detector")
        assert ([1, 3, 416, 416], "config") in [(list(p.inputs[0].shape), p.source) for p in info.profiled]

