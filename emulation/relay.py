"""A TCP relay that adds one-way delay and faults, changeable while running.

This kernel has no `netem`, so delay and faults are made in user space: the
relay listens on an address and forwards each connection to a target. Every
chunk read is stamped with `now + delay` and written out once that time has
passed, so RTT grows by 2 x delay while throughput is not serialised: many
chunks are in flight at once (pipelined), like a long pipe.

It runs on its own asyncio loop in a daemon thread of the calling process, so
a test or benchmark controls it with plain method calls and no IPC. To sit on
an emulated path it can create its listening socket inside one network
namespace and its upstream sockets inside another (`setns(2)` on the relay
thread around `socket()` only: a socket stays in the namespace it was created
in), e.g. listen on 127.0.0.1 in the edge namespace and connect to the cloud
node's address in the cloud namespace, through the shaped veth.

Faults: `stall()` holds data in both directions without closing (readers stop
at the buffer bound, so TCP back-pressure reaches the senders); `resume()`
delivers what was held; `reset_all()` sends RST on every open connection
(SO_LINGER 0, then close); `drop_all()` closes them quietly (FIN);
`refuse(True)` resets new connections as soon as they are accepted.

Bounded: each direction of each connection buffers at most `buffer_bytes`
(default 4 MiB, enough for 100 Mbit/s x 2 x 160 ms) before it stops reading.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)

CHUNK_BYTES = 65536  # largest read per chunk
DEFAULT_BUFFER_BYTES = 4 * 1024 * 1024  # per direction per connection
CONNECT_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 10.0  # a control call that takes longer means the loop is wedged

_CLONE_NEWNET = 0x40000000  # from <sched.h>
_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST


def available() -> str | None:
    """None: the relay needs only loopback TCP. Namespaced use also needs root."""
    return None


def _socket_in_netns(netns: str | None, family: socket.AddressFamily) -> socket.socket:
    """A TCP socket created inside network namespace `netns` (None: the current one)."""
    if netns is None:
        return socket.socket(family, socket.SOCK_STREAM)
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as own, open(f"/run/netns/{netns}") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            if libc.setns(own.fileno(), _CLONE_NEWNET) != 0:
                # The relay thread would stay in the wrong namespace: unrecoverable.
                os.abort()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    writer.transport.abort()


class _Direction:
    """One direction of one connection: a reader stamps chunks, a writer releases them."""

    def __init__(self, relay: Relay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.relay = relay
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        self.buffered = 0
        self.space = asyncio.Event()
        self.space.set()

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.buffered >= self.relay.buffer_bytes:
                self.space.clear()
                await self.space.wait()
            data = await self.reader.read(CHUNK_BYTES)
            release = loop.time() + self.relay.delay_ms / 1000.0
            if not data:
                self.queue.put_nowait((release, None))
                return
            self.buffered += len(data)
            self.queue.put_nowait((release, data))

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            release, data = await self.queue.get()
            wait = release - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.relay._flowing.wait()
            if data is None:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()
            self.buffered -= len(data)
            if self.buffered < self.relay.buffer_bytes:
                self.space.set()


class _Connection:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.task: asyncio.Task | None = None

    def _stop_pumping(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def reset(self) -> None:
        self._stop_pumping()
        _reset(self.client)
        _reset(self.upstream)

    def drop(self) -> None:
        """Close without linger: FIN, discarding anything still held."""
        self._stop_pumping()
        self.client.transport.abort()
        self.upstream.transport.abort()


class Relay:
    """Forward TCP from `listen` to `target`, adding `delay_ms` each way; a context manager.

    `listen_netns` / `target_netns` name namespaces (as in `ip netns`) in which
    the listening and upstream sockets are created; None means the current one.
    `address` is the bound (host, port) once started.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        delay_ms: float = 0.0,
        listen_netns: str | None = None,
        target_netns: str | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        if buffer_bytes < CHUNK_BYTES:
            raise ValueError(f"buffer_bytes must be >= {CHUNK_BYTES}, got {buffer_bytes}")
        self.target = target
        self.listen = listen
        self.delay_ms = float(delay_ms)  # read by the loop per chunk; a float store is atomic
        self.listen_netns = listen_netns
        self.target_netns = target_netns
        self.buffer_bytes = buffer_bytes
        self.address: tuple[str, int] | None = None
        self._refusing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._conns: set[_Connection] = set()
        # created on the loop thread:
        self._flowing: asyncio.Event
        self._stop: asyncio.Event

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> tuple[str, int]:
        """Bind and start forwarding; returns the bound address."""
        self._thread = threading.Thread(target=self._run, name=f"relay->{self.target[0]}:{self.target[1]}", daemon=True)
        self._thread.start()
        if not self._ready.wait(CONTROL_TIMEOUT_S):
            raise TimeoutError("relay did not start")
        if self._start_error is not None:
            self._thread.join(CONTROL_TIMEOUT_S)
            raise self._start_error
        assert self.address is not None
        return self.address

    def close(self) -> None:
        """Stop listening, abort every connection, stop the loop thread."""
        if self._loop is None or self._thread is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(CONTROL_TIMEOUT_S)
        self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stop = asyncio.Event()
        try:
            sock = _socket_in_netns(self.listen_netns, _family(self.listen[0]))
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(self.listen)
                sock.listen(128)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            server = await asyncio.start_server(self._handle, sock=sock, limit=CHUNK_BYTES)
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self.address = sock.getsockname()[:2]
        logger.info("relay %s:%d -> %s:%d, delay %.1f ms each way", *self.address, *self.target, self.delay_ms)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for conn in list(self._conns):
                conn.reset()
            await server.wait_closed()
            tasks = [c.task for c in self._conns if c.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=CONTROL_TIMEOUT_S)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            _reset(c_writer)
            return
        loop = asyncio.get_running_loop()
        host, port = self.target
        up_sock = None
        try:
            up_sock = _socket_in_netns(self.target_netns, _family(host))
            up_sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(up_sock, (host, port)), CONNECT_TIMEOUT_S)
            u_reader, u_writer = await asyncio.open_connection(sock=up_sock, limit=CHUNK_BYTES)
        except (OSError, asyncio.TimeoutError) as exc:
            logger.info("relay: upstream %s:%d unreachable (%s); resetting client", host, port, exc)
            if up_sock is not None:
                up_sock.close()
            _reset(c_writer)
            return
        for writer in (c_writer, u_writer):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(c_writer, u_writer)
        conn.task = asyncio.current_task()
        self._conns.add(conn)
        up = _Direction(self, c_reader, u_writer)
        down = _Direction(self, u_reader, c_writer)
        try:
            try:
                async with asyncio.TaskGroup() as group:
                    for direction in (up, down):
                        group.create_task(direction.read_loop())
                        group.create_task(direction.write_loop())
            except* OSError:
                # One side failed (typically reset by its peer): pass the reset on.
                conn.reset()
            else:
                c_writer.close()
                u_writer.close()
        except asyncio.CancelledError:
            pass  # reset_all / drop_all / close already closed both sides
        finally:
            self._conns.discard(conn)

    # -- control (thread-safe) ---------------------------------------------

    def _call(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        if self._loop is None or self._thread is None:
            raise RuntimeError("relay is not running")
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(CONTROL_TIMEOUT_S)

    def set_delay(self, ms: float) -> None:
        """One-way delay for chunks read from now on (RTT grows by 2 x ms)."""
        if ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {ms}")
        self.delay_ms = float(ms)

    def stall(self) -> None:
        """Hold all data in both directions; connections stay open."""
        async def _stall() -> None:
            self._flowing.clear()
        self._call(_stall)

    def resume(self) -> None:
        """Deliver what was held and keep flowing."""
        async def _resume() -> None:
            self._flowing.set()
        self._call(_resume)

    def _each_connection(self, end) -> int:
        """End every open connection with ``end(conn)``; returns how many."""
        async def _end_all() -> int:
            conns = list(self._conns)
            for conn in conns:
                end(conn)
            return len(conns)
        return self._call(_end_all)

    def reset_all(self) -> int:
        """RST every open connection on both sides; returns how many."""
        return self._each_connection(lambda conn: conn.reset())

    def drop_all(self) -> int:
        """Close every open connection on both sides without RST; returns how many."""
        return self._each_connection(lambda conn: conn.drop())

    def refuse(self, on: bool = True) -> None:
        """While on, new connections are reset as soon as they are accepted."""
        self._refusing = bool(on)

    @property
    def open_connections(self) -> int:
        return len(self._conns)
