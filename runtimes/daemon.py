"""Start-up and shutdown steps both daemons share."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = {*vars(logging.makeLogRecord({})), "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers that parse fields instead of text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def check_log_settings(level: str, fmt: str) -> None:
    """ConfigError for a log level or format the daemons do not know."""
    from runtimes.config import ConfigError

    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if fmt not in ("text", "json"):
        raise ConfigError(f"log_format must be text or json, got {fmt!r}")


def hold_sighup_until_ready() -> None:
    """Until the daemon installs its reload handler, a SIGHUP (``systemctl
    reload`` during a long start-up) is ignored instead of killing it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Root handler for a daemon's entry point: ``fmt`` "text" for people, "json" for machines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=LOG_LEVELS[level], handlers=[handler])  # the configs checked the level


def bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None = None) -> str:
    """Bind ``listen`` (HOST:PORT, port 0 for any, or unix:PATH), with TLS when
    ``credentials`` are given; returns the real address."""
    try:
        port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    except RuntimeError as exc:  # grpcio raises this, naming no address, when the bind fails
        raise OSError(f"cannot listen on {listen}: in use by another process, or not an address of this host") from exc
    if listen.startswith("unix:"):
        return listen
    if port == 0:
        raise OSError(f"cannot listen on {listen}: in use by another process, or not an address of this host")
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"


def unix_socket_path(listen: str) -> Path | None:
    """The file behind a unix:PATH (or unix:///PATH) listen address."""
    if not listen.startswith("unix:"):
        return None
    path = listen.removeprefix("unix:")
    return Path(path.removeprefix("//") if path.startswith("///") else path)


def write_ready_file(path: Path | None, address: str, extra: dict[str, Any] | None = None) -> None:
    """Tell a supervisor (or a test) where we listen, atomically; ``extra``
    adds fields (the metrics URL)."""
    if path is None:
        return
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), **(extra or {})}))
    tmp.replace(path)


async def wait_for_shutdown() -> str:
    """Block until SIGTERM or SIGINT; returns the signal's name."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s.name))
    return await received


def reload_settings(current: list, load: Callable[[], Any], reloadable: tuple[str, ...],
                    apply: Callable[[Any], str]) -> None:
    """SIGHUP: read the daemon's config again (file, environment, flags) and
    apply the ``reloadable`` settings through ``apply`` (which says what it
    did); a config that does not load leaves the running one in force. The
    other settings need a restart, and the log says which changed."""
    from runtimes.config import ConfigError

    try:
        fresh = load()
    except (ConfigError, ValueError) as exc:
        logger.error("config rejected on SIGHUP, keeping the previous one: %s", exc)
        return
    old = current[0]
    needs_restart = [f.name for f in dataclasses.fields(old) if f.name not in reloadable and f.name != "ready_file"
                     and getattr(fresh, f.name) != getattr(old, f.name)]
    current[0] = dataclasses.replace(old, **{name: getattr(fresh, name) for name in reloadable})
    done = apply(current[0])
    logging.getLogger().setLevel(LOG_LEVELS[fresh.log_level])
    logger.info("config reloaded: %s, log level %s%s", done, fresh.log_level,
                f"; changed but needing a restart: {', '.join(needs_restart)}" if needs_restart else "")


def run_daemon(argv: list[str] | None, *, prog: str, description: str | None, config_cls: type,
               env_prefix: str, serve: Callable[[Any, Callable[[], Any]], Awaitable[None]]) -> int:
    """A daemon's entry point: config from file, environment and flags (a bad
    one is a usage error, exit 2), logging, then ``serve(config, load)`` where
    ``load`` reads the config again for SIGHUP. Exit 2 for what the operator
    must fix (a ValueError: unreadable TLS files, a policy that does not
    check out), 1 for other OS errors."""
    from runtimes import config as config_loader

    parser = argparse.ArgumentParser(prog=prog, description=description.replace("``", "") if description else None)
    config_loader.add_arguments(parser, config_cls, env_prefix=env_prefix)
    args = parser.parse_args(argv)
    hold_sighup_until_ready()

    def load() -> Any:
        return config_loader.load(config_cls, args, env_prefix=env_prefix)

    try:
        config = load()
    except (config_loader.ConfigError, ValueError) as exc:
        parser.error(str(exc))
    setup_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config, load))
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    except OSError as exc:
        logger.error("%s", exc)
        return 1
    return 0
