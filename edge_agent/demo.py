"""``make demo``: a cloud node and an edge agent on loopback deciding and serving.

Prints, for the chain model, the plan the agent picks on the live loopback
link and on the reference links of DESIGN.md (via ``explain`` with a link
override), the predicted vs measured latency of each plan run for real over
loopback; the plans a second agent planning for a Raspberry Pi 4 picks on the
same links (predicted only: this host is not a Pi 4); and a fallback when the
cloud node dies.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edge_agent.sdk import EdgeClient, Token
from modelzoo.build import build_all
from runtimes import launch

# Uplink means used by Neurosurgeon (ASPLOS'17) and DADS (INFOCOM'19), Mbit/s.
# Downlink is taken equal to uplink (conservative: results are small anyway).
REFERENCE_LINKS = {"CAT1": 0.13, "3G": 1.1, "LTE": 5.85, "Wi-Fi": 18.88}
# TCP goodput over wired Ethernet: 1448 payload bytes (TCP timestamps on) per
# 1538 on the wire (preamble, header, FCS, gap) of the line rate.
LAN_LINKS = {"Fast Ethernet": round(100 * 1448 / 1538, 1), "Gigabit Ethernet": round(1000 * 1448 / 1538, 1)}

BOARD, BOARD_NAME = "pi4", "Raspberry Pi 4"

console = Console(width=110)


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="tandem-demo-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        console.print("[bold]building models[/] (seeded ONNX graphs) ...")
        build_all(models)
        console.print("[bold]starting cloud-node and edge-agent on 127.0.0.1[/] (first start profiles each model) ...")
        with launch.cloud_node(models, "--llm", "smollm2") as node, \
                launch.edge_agent(models, [node.address], "--llm", "smollm2") as agent:
            with EdgeClient(agent.address) as client:
                run_demo(client, node, models)
    return 0


def run_demo(client: EdgeClient, node: launch.Daemon, models: Path) -> None:
    for info in client.models():
        if info.kind != "onnx":  # an LLM: a prompt in, tokens out, no graph to cut
            console.print(f"  model [cyan]{info.name}[/]: {info.kind}, streamed LOCAL or REMOTE")
            continue
        dims = ", ".join(f"{i.name}[{', '.join('?' if d < 0 else str(d) for d in i.shape)}]" for i in info.inputs)
        console.print(f"  model [cyan]{info.name}[/]: {info.num_cuts} cut points, inputs {dims}")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for _ in range(3):  # warm sessions on both sides
        client.infer("mobilenet", {"input": x})

    live = client.explain("mobilenet")
    table = Table(title="mobilenet: plan per link (predicted on that link; run for real over loopback)")
    for column in ("link", "up Mbit/s", "plan", "pred. ms", "pred. J", "loopback pred. ms", "loopback meas. ms"):
        table.add_column(column, justify="right" if column != "link" else "left")
    links = {"loopback (measured)": None, **REFERENCE_LINKS}
    for name, uplink in links.items():
        if uplink is None:
            explanation = live
        else:
            explanation = client.explain("mobilenet", link=reference_link(uplink, live))
        winner = explanation.candidate(explanation.winner)
        client.infer("mobilenet", {"input": x}, plan=explanation.winner)  # first use of a cut builds its sessions
        result = client.infer("mobilenet", {"input": x}, plan=explanation.winner)
        table.add_row(
            name, f"{explanation.link['uplink_mbps']:.2f}", explanation.winner, f"{winner.predicted['total_ms']:.1f}",
            f"{winner.energy_j:.3f}", f"{result.predicted['total_ms']:.1f}", f"{result.measured['total_ms']:.1f}",
        )
    console.print(table)
    console.print(f"why (loopback): {live.why}")
    board_demo(client, models, node, live)

    stages = Table(title="one SPLIT request at the middle cut, stage by stage (ms)")
    middle = len([c for c in live.candidates if c.plan.startswith("split:")]) // 2 + 1
    client.infer("mobilenet", {"input": x}, plan=f"split:{middle}")  # builds the cut's sessions on both sides
    result = client.infer("mobilenet", {"input": x}, plan=f"split:{middle}")
    stages.add_column("stage")
    stages.add_column("predicted", justify="right")
    stages.add_column("measured", justify="right")
    for stage, predicted in result.predicted.items():
        stages.add_row(stage, f"{predicted:.2f}", f"{result.measured[stage]:.2f}")
    console.print(stages)

    run_llm_demo(client, node)

    console.print("[bold]the cloud node is gone;[/] sending a SPLIT request ...")
    result = client.infer("mobilenet", {"input": x}, plan=f"split:{middle}")
    # fell_back says the plan the app asked for could not run: with no node the agent plans LOCAL instead
    console.print(f"  asked for split:{middle}; the agent planned {result.planned} and ran [cyan]{result.plan}[/], "
                  f"fell back: {result.fell_back} ({result.fallback_reason}); "
                  f"output argmax {int(np.argmax(result.outputs['logits']))}")


def reference_link(uplink_mbps: float, live) -> dict[str, float]:
    return {"uplink_mbps": uplink_mbps, "downlink_mbps": uplink_mbps, "rtt_ms": live.link["rtt_ms"]}


def board_demo(client: EdgeClient, models: Path, node: launch.Daemon, live) -> None:
    """The same node and links, planned by an agent for a slower board: the
    device side is this host's profile scaled to a Pi 4 by the roofline model."""
    console.print(f"[bold]starting a second edge-agent planning for a {BOARD_NAME}[/] (--device {BOARD}) ...")
    with launch.edge_agent(models, [node.address], "--device", BOARD) as agent, EdgeClient(agent.address) as board:
        table = Table(title=f"mobilenet planned for a {BOARD_NAME} on the same node (predicted; this host is not one)")
        for column in ("link", "up Mbit/s", "plan here", "pred. ms here", f"plan on {BOARD}", f"pred. ms on {BOARD}"):
            table.add_column(column, justify="right" if column != "link" else "left")
        for name, uplink in {**REFERENCE_LINKS, **LAN_LINKS}.items():
            mine, theirs = (c.explain("mobilenet", link=reference_link(uplink, live)) for c in (client, board))
            table.add_row(name, f"{uplink:.2f}", mine.winner, f"{mine.candidate(mine.winner).predicted['total_ms']:.1f}",
                          f"[cyan]{theirs.winner}[/]", f"{theirs.candidate(theirs.winner).predicted['total_ms']:.1f}")
        console.print(table)
        fast = board.explain("mobilenet", link=reference_link(LAN_LINKS["Gigabit Ethernet"], live))
        console.print(f"why ({BOARD}, Gigabit Ethernet): {fast.why}")


def run_llm_demo(client: EdgeClient, node: launch.Daemon) -> None:
    explanation = client.explain("smollm2", prompt_tokens=32, max_tokens=256)
    table = Table(title="smollm2: a 256-token generation, LOCAL vs the node (predicted)")
    for column in ("plan", "first token ms", "total ms", "energy J", "feasible"):
        table.add_column(column, justify="right")
    for c in explanation.candidates:
        table.add_row(c.plan + (f" {c.node}" if c.node else ""), f"{c.ttft_ms:.0f}", f"{c.predicted['total_ms']:.0f}",
                      f"{c.energy_j:.2f}", "yes" if c.feasible else "no")
    console.print(table)
    console.print(f"why: {explanation.why}")

    prompt = "Write a short story about a robot who learns to paint."
    console.print(f"[bold]streaming a REMOTE generation[/] and killing the cloud node after 8 tokens:\n  {prompt}")
    text = []
    for chunk in client.generate(messages=[{"role": "user", "content": prompt}], max_tokens=96, plan="remote"):
        if isinstance(chunk, Token):
            text.append(chunk.text)
            if len(text) == 8:
                node.kill()
                text.append("[bold red]|switch|[/]")
        else:
            console.print("  " + "".join(text).replace("\n", " "))
            console.print(f"  finished: {chunk.finish_reason}, {chunk.completion_tokens} tokens, planned {chunk.planned}, "
                          f"ran {chunk.ran}, switched at token {chunk.switched_at_token} ({chunk.switch_reason})")


if __name__ == "__main__":
    sys.exit(main())
