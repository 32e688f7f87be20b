"""Shared fixtures: built models, a per-session profile cache, real daemons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelzoo.build import build_all
from runtimes import launch


@pytest.fixture(scope="session", autouse=True)
def profile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One profile cache per test session: daemons measure each model once."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["TANDEM_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chain and the DAG: what most daemon tests serve (the detector and the
    recogniser have fixtures of their own, so not every daemon profiles them)."""
    directory = tmp_path_factory.mktemp("models")
    build_all(directory, names=["mobilenet", "resnet"])
    return directory


@pytest.fixture(scope="session")
def cloud(model_dir: Path):
    """A cloud node shared by tests that do not stop it."""
    with launch.cloud_node(model_dir, "--llm", "smollm2") as node:
        yield node


@pytest.fixture(scope="session")
def agent(model_dir: Path, cloud: launch.Daemon):
    # llm_stall_s 30: on a loaded machine a node's first token can take longer than the
    # default 5 s, and the stream would move to the device; tests of stalls start their own agents
    with launch.edge_agent(model_dir, [cloud.address], "--llm", "smollm2", "--http-listen", "127.0.0.1:0",
                           "--metrics-listen", "127.0.0.1:0", "--llm-stall-s", "30") as daemon:
        yield daemon


@pytest.fixture(scope="session")
def no_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with no tensor model: LLM daemons that need not profile any."""
    return tmp_path_factory.mktemp("no-models")


@pytest.fixture(scope="session")
def gemma_cloud(no_models: Path):
    """A node serving the bigger model (Gemma 3 270M), shared by the two-tier tests that do not stop it."""
    with launch.cloud_node(no_models, "--llm", "gemma3-270m") as node:
        yield node
