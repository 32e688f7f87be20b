"""The profile book in-process: what a request's plan is made from."""

from __future__ import annotations

import threading
from pathlib import Path

from partitioner.planning import AtShape
from partitioner.work import Machine
from runtimes.onnx_exec import OnnxModel
from runtimes.profile_book import ProfileBook


def within(timeout_s: float, call):
    """``call()`` on a daemon thread: a deadlock fails the test instead of hanging the suite."""
    done: list = []
    worker = threading.Thread(target=lambda: done.append(call()), daemon=True)
    worker.start()
    worker.join(timeout_s)
    assert done, f"no answer in {timeout_s} s (a deadlock?)"
    return done[0]


def test_a_shape_nobody_profiled_is_planned_from_the_nearest_profile_and_the_view_is_kept(model_dir: Path) -> None:
    """Rescaling takes the book's lock, so the nearest-profile path must not run
    under it (it once did, and the agent's event loop hung on a pinned request)."""
    resnet = OnnxModel("resnet", model_dir / "resnet.onnx")
    book = ProfileBook({"resnet": resnet}, machine=Machine(gflops=20.0, mem_bandwidth_gbs=10.0))
    try:
        book.profile_all()
        measured = {spec.name: (1, *spec.shape[1:]) for spec in resnet.inputs}
        batch = {name: (3, *shape[1:]) for name, shape in measured.items()}
        nearest = within(60, lambda: book.view(resnet, batch, learn=False, nearest_ok=True))
        exact, again = within(60, lambda: book.view(resnet, measured)), within(60, lambda: book.view(resnet, measured))
        assert isinstance(nearest, AtShape) and nearest.method != "measured"
        assert isinstance(exact, AtShape) and exact.method == "measured"
        assert again is exact  # kept while the bucket's profile stands
    finally:
        book.close()
