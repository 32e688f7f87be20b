"""Which board are we running on? Answers with a name ``get_device`` accepts.

Every path is read under ``root`` so tests can build a fake tree.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL = "proc/device-tree/model"              # NUL-terminated board name (Pis, Jetsons)
COMPATIBLE = "proc/device-tree/compatible"    # NUL-separated "vendor,board" strings
TEGRA_RELEASE = "etc/nv_tegra_release"        # L4T release line on Jetsons


def _read(root: Path, relative: str) -> str | None:
    try:
        return (root / relative).read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _from_model(model: str) -> str | None:
    # Pi 4, Pi 400 and CM4 share the BCM2711; Pi 5, Pi 500 and CM5 the BCM2712.
    if "Raspberry Pi 5" in model or "Raspberry Pi 500" in model or "Compute Module 5" in model:
        return "pi5"
    if "Raspberry Pi 4" in model or "Raspberry Pi 400" in model or "Compute Module 4" in model:
        return "pi4"
    if "Jetson" in model and "Orin" in model:
        return "jetson-orin-nano"
    if "Jetson Nano" in model:
        return "jetson-nano"
    return None


def _from_compatible(compatible: str) -> str | None:
    entries = set(compatible.split("\0"))
    if "brcm,bcm2712" in entries:
        return "pi5"
    if "brcm,bcm2711" in entries:
        return "pi4"
    if "nvidia,tegra234" in entries:
        # Orin Nano is p3767 SKUs 0003-0005; NX and AGX Orin are faster, and the
        # Orin Nano profile is the closest we have.
        if not any(e.startswith("nvidia,p3767-000") and e[-1] in "345" for e in entries):
            logger.warning("Orin module other than Orin Nano (%s); using the Orin Nano profile", sorted(entries))
        return "jetson-orin-nano"
    if "nvidia,tegra210" in entries or "nvidia,jetson-nano" in entries or "nvidia,p3450-0000" in entries:
        return "jetson-nano"
    return None


def _from_tegra_release(release: str) -> str | None:
    # "# R32 (release), REVISION: 7.1, ..., BOARD: t210ref, ..." is a Nano (L4T 32 / t210);
    # L4T R35 and later run on Xavier and Orin; of our profiles that is the Orin Nano.
    head = release.strip().split(",")[0]
    if "t210" in release:
        return "jetson-nano"
    for major in ("R35", "R36", "R37", "R38"):
        if major in head:
            return "jetson-orin-nano"
    return None


def detect_board(root: str | Path = "/") -> str:
    """The profile name of this board: ``pi4``, ``pi5``, ``jetson-nano``,
    ``jetson-orin-nano``, or ``host`` when nothing says otherwise."""
    root = Path(root)
    checks = ((MODEL, _from_model), (COMPATIBLE, _from_compatible), (TEGRA_RELEASE, _from_tegra_release))
    for relative, parse in checks:
        text = _read(root, relative)
        if text is None:
            continue
        name = parse(text)
        if name is not None:
            logger.info("board detected as %s from /%s (%r)", name, relative, text.strip("\0\n ")[:80])
            return name
    logger.info("no known board (device-tree model/compatible, nv_tegra_release); using the host profile")
    return "host"
