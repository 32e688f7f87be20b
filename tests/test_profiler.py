"""How measured kernel times are charged to a model's segments."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtimes.onnx_exec import OnnxModel
from runtimes.profiler import attribute, measure


def test_optimised_nodes_are_traced_by_name_and_added_nodes_go_with_their_neighbours() -> None:
    segment_of = {"conv1": 0, "relu1": 0, "conv2": 1, "fc": 2}
    order = ["ReorderInput", "relu1_nchwc", "conv2", "ReorderOutput", "fc/fused", "Transpose_42"]
    placed, traced = attribute(order, segment_of)
    assert placed == {"ReorderInput": 0, "relu1_nchwc": 0, "conv2": 1, "ReorderOutput": 1, "fc/fused": 2, "Transpose_42": 2}
    assert traced == {"relu1_nchwc", "conv2", "fc/fused"}


def test_a_name_is_traced_only_at_a_separator() -> None:
    # "conv10" is not an extension of "conv1": it is simply not ours
    placed, traced = attribute(["conv10", "conv1"], {"conv1": 3})
    assert traced == {"conv1"}
    assert placed == {"conv10": 3, "conv1": 3}


def test_nothing_traced_places_nothing() -> None:
    assert attribute(["a", "b"], {"c": 0}) == ({}, set())


@pytest.mark.parametrize("name", ["mobilenet", "resnet"])
def test_built_models_are_profiled_as_they_run_optimised(model_dir: Path, name: str) -> None:
    profile = measure(OnnxModel(name, model_dir / f"{name}.onnx"), runs=3)
    assert profile.method == "optimised"
    assert sum(profile.segment_ms) + profile.run_overhead_ms == pytest.approx(profile.whole_ms)
    assert sum(profile.segment_ms) > profile.run_overhead_ms  # the kernels are in the layers, not in overhead


def test_a_profile_taken_while_other_programs_fill_the_cpus_is_used_but_not_cached(model_dir: Path, tmp_path: Path,
                                                                                  caplog) -> None:
    from bench.host_stability import all_cores_busy
    from runtimes.profiler import MAX_OTHERS_SHARE, OthersLoad, load_or_measure, profile_path

    model = OnnxModel("resnet", model_dir / "resnet.onnx")
    shapes = {"input": (1, 3, 224, 224)}
    with all_cores_busy() as spinners, OthersLoad() as load:
        profile = load_or_measure(model, shapes, cache_dir=tmp_path, runs=3)
        assert all(s.poll() is None for s in spinners)
    assert load.share > MAX_OTHERS_SHARE  # the spinners really filled the machine
    assert profile.num_segments == model.num_segments
    assert not profile_path(model, shapes, tmp_path).exists() and "not caching it" in caplog.text
    # measured again without the spinners: kept when the machine is quiet (this suite may
    # itself run beside a busy program, so only a clear reading either way is asserted)
    with OthersLoad() as after:
        load_or_measure(model, shapes, cache_dir=tmp_path, runs=3)
    if after.share < MAX_OTHERS_SHARE - 0.2:
        assert profile_path(model, shapes, tmp_path).exists()
    elif after.share > MAX_OTHERS_SHARE + 0.2:
        assert not profile_path(model, shapes, tmp_path).exists()
