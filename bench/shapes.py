"""Are LOCAL predictions right at the shapes apps send? Predicted against measured, per model and shape.

    python -m bench.shapes [--runs 20]

Starts a cloud node and an edge agent on loopback (this host as the device),
then for each model and a few input shapes (the one its metadata declares and
others an app might send) sends one request to teach the agent the shape,
waits until the agent has profiled it, and sends ``--runs`` requests pinned
LOCAL. Reported per shape: the agent's predicted LOCAL total against its
measured total (median), their ratio (target: within 1.5x), the same for
onnxruntime's part alone, and what the prediction was based on. A second table shows requests at a size inside an
already-profiled bucket, planned by rescaling with the work model. Writes
JSON; no root needed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edge_agent import sdk
from modelzoo.build import build_all
from runtimes import launch

# (model, input, shapes): the declared one first, then what other apps send.
CASES = (
    ("mobilenet", "input", [(1, 3, 224, 224)]),
    ("resnet", "input", [(1, 3, 224, 224), (4, 3, 224, 224)]),
    ("detector", "images", [(1, 3, 320, 320), (1, 3, 640, 640), (1, 3, 480, 640)]),
    ("branchy", "images", [(1, 3, 32, 320), (1, 3, 32, 640), (2, 3, 32, 128)]),
)
# Sizes inside a bucket profiled above (rounded up to a power of two), planned by rescaling.
RESCALED = (("detector", "images", (1, 3, 384, 416)), ("branchy", "images", (1, 3, 32, 600)))
WAIT_S = 300.0


def measure(client: sdk.EdgeClient, model: str, name: str, shape: tuple[int, ...], runs: int) -> dict:
    x = {name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    client.infer(model, x, plan="local")  # warm
    replies = [client.infer(model, x, plan="local") for _ in range(runs)]

    def median(stage: str, of: str) -> float:
        return statistics.median(getattr(r, of)[stage] for r in replies)

    basis = client.explain(model, input_shapes={name: shape})
    p, m = median("total_ms", "predicted"), median("total_ms", "measured")
    return {"model": model, "shape": list(shape), "predicted_ms": p, "measured_ms": m, "ratio": p / m,
            "predicted_edge_ms": median("edge_ms", "predicted"), "measured_edge_ms": median("edge_ms", "measured"),
            "basis": basis.profile_source}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path("bench/results/shapes.json"))
    args = parser.parse_args()
    console = Console(width=140)
    rows, rescaled = [], []
    with tempfile.TemporaryDirectory(prefix="tandem-shapes-") as tmp:
        build_all(Path(tmp), names=[c[0] for c in CASES])
        with launch.cloud_node(Path(tmp)) as node, launch.edge_agent(Path(tmp), [node.address]) as agent, \
                sdk.EdgeClient(agent.address, timeout=120) as client:
            for model, name, shapes in CASES:
                for shape in shapes:
                    with console.status(f"{model} {shape}"):
                        client.infer(model, {name: np.zeros(shape, np.float32)})  # teaches the agent this shape
                        launch.wait_profiled(client, model, shape, timeout_s=WAIT_S)
                        rows.append(measure(client, model, name, shape, args.runs))
            for model, name, shape in RESCALED:
                rescaled.append(measure(client, model, name, shape, args.runs))
    for title, data in (("LOCAL at profiled shapes", rows), ("LOCAL at sizes rescaled by the work model", rescaled)):
        table = Table(title=f"{title} ({platform.node()}, median of {args.runs}, agent's own timings)")
        for column in ("model", "shape", "predicted ms", "measured ms", "predicted / measured",
                       "onnxruntime predicted", "measured", "basis"):
            table.add_column(column, justify="right")
        for r in data:
            table.add_row(r["model"], "x".join(map(str, r["shape"])), f"{r['predicted_ms']:.2f}", f"{r['measured_ms']:.2f}",
                          f"{r['ratio']:.2f}", f"{r['predicted_edge_ms']:.2f}", f"{r['measured_edge_ms']:.2f}", r["basis"])
        console.print(table)
    ratios = [r["ratio"] for r in rows + rescaled]
    within = sum(1 / 1.5 <= r <= 1.5 for r in ratios)
    console.print(f"{within} of {len(ratios)} LOCAL predictions within 1.5x of measured "
                  f"(worst ratio {max(ratios, key=lambda r: max(r, 1 / r)):.2f})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"profiled": rows, "rescaled": rescaled}, indent=2))
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
