"""offload-tune export-suffixes: a model repository whose entries, run with
onnxruntime, finish what the device's prefix started."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from modelzoo.build import build_all
from offload_tune.cli import main
from protos.oip import model_config, parse_suffix_name, suffix_name
from runtimes.onnx_exec import OnnxModel


def feeds_for(model: OnnxModel, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of one, 64 wherever else a dimension is dynamic (the detector's H and W)."""
    return {spec.name: rng.standard_normal([d or (1 if i == 0 else 64) for i, d in enumerate(spec.shape)]
                                           ).astype(spec.dtype) for spec in model.inputs}


@pytest.mark.parametrize("name", ["mobilenet", "resnet", "detector"])
def test_every_exported_suffix_finishes_the_prefix_as_the_whole_model_would(name: str, tmp_path: Path, capsys) -> None:
    path = build_all(tmp_path / "models", names=[name])[name]
    model = OnnxModel(name, path)
    repository = tmp_path / "repo"
    assert main(["export-suffixes", str(path), "-o", str(repository), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)["models"]
    assert [m["name"] for m in written] == [name] + [suffix_name(name, k) for k in range(1, model.num_segments)]
    feeds = feeds_for(model, np.random.default_rng(0))
    whole = model.run(feeds)
    for entry in written:
        directory = repository / entry["name"]
        config = text_format.Parse((directory / "config.pbtxt").read_text(), model_config.ModelConfig())
        session = ort.InferenceSession(str(directory / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert config.name == entry["name"] and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
        assert [i.name for i in config.input] == [i.name for i in session.get_inputs()] == entry["inputs"]
        assert [o.name for o in config.output] == [o.name for o in session.get_outputs()]
        assert config.parameters["tandem.source_digest"].string_value == model.digest
        if entry["cut"] == 0:
            assert (directory / "1" / "model.onnx").read_bytes() == path.read_bytes()
            sent, local = feeds, {}
        else:
            assert parse_suffix_name(entry["name"]) == (name, entry["cut"])
            cut = model.cut(entry["cut"])
            produced = model.run_prefix(cut, feeds)
            sent = {t: produced[t] for t in cut.tensors}
            local = {t: produced[t] for t in cut.edge_outputs}
        outputs = dict(zip([o.name for o in config.output], session.run(None, sent)))
        for output, expected in whole.items():
            np.testing.assert_allclose({**local, **outputs}[output], expected, rtol=1e-5, atol=1e-5)


def test_chosen_cuts_only_and_bad_cuts_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    path = build_all(tmp_path / "models", names=["mobilenet"])["mobilenet"]
    repository = tmp_path / "repo"
    assert main(["export-suffixes", str(path), "-o", str(repository), "--cuts", "3,7"]) == 0
    assert sorted(p.name for p in repository.iterdir()) == ["mobilenet", "mobilenet__from_3", "mobilenet__from_7"]
    assert main(["export-suffixes", str(path), "-o", str(tmp_path / "other"), "--cuts", "3,999"]) == 2
    assert "not [999]" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    assert main(["export-suffixes", str(path), "-o", str(tmp_path / "other"), "--cuts", "three"]) == 2
    assert main(["export-suffixes", str(path), "-o", str(repository), "--cuts", "none"]) == 0
    assert (repository / "mobilenet" / "1" / "model.onnx").exists()


def test_suffix_names_round_trip_and_other_names_are_not_suffixes() -> None:
    assert parse_suffix_name(suffix_name("a__from_b", 12)) == ("a__from_b", 12)
    for name in ("mobilenet", "mobilenet__from_", "mobilenet__from_0", "mobilenet__from_-1", "m__from_1x", "__from_3"):
        assert parse_suffix_name(name) is None
