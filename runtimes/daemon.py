"""Start-up and shutdown steps both daemons share."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def bind(server: grpc.aio.Server, listen: str) -> str:
    """Bind ``listen`` (HOST:PORT, port 0 for any, or unix:PATH); returns the real address."""
    port = server.add_insecure_port(listen)
    if listen.startswith("unix:"):
        return listen
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"


def write_ready_file(path: Path | None, address: str) -> None:
    """Tell a supervisor (or a test) where we listen, atomically."""
    if path is None:
        return
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid()}))
    tmp.replace(path)


async def wait_for_shutdown() -> str:
    """Block until SIGTERM or SIGINT; returns the signal's name."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s.name))
    return await received
