"""System shared-memory regions apps on this board register with the agent
(the Open Inference Protocol's system_shared_memory extension), so their
tensors never cross a socket: the app writes inputs into a POSIX shared
memory object and names the region; the agent reads them there and writes
outputs back into a region the app named.

A region is a file under /dev/shm that another process owns, so nothing
about it is taken on trust. Its key is a bare name (no path, no traversal);
it is opened without following links and must be a regular file large
enough for the region. Every use re-checks the file's size first, because
the owner may shrink it at any time: a read past the end of a mapping is a
SIGBUS, which no exception handler catches. That check narrows the window
without closing it (the owner can still truncate between the check and the
copy); an app able to do that could equally stop the agent through its
socket, so the socket's permissions are the real gate. Regions are only for
callers on this machine.

Inputs are copied out of the region once (a memcpy, not a socket), so no
array the pipeline keeps points into memory the app can change or unmap.

Everything here runs on the agent's event loop: no locks.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtimes.onnx_exec import InputError

SHM_ROOT = Path("/dev/shm")
KEY = re.compile(r"/?[A-Za-z0-9_.-]{1,200}")
MAX_REGIONS = 256  # each holds a file descriptor and a mapping


class RegionError(InputError):
    """A region a request names does not exist or cannot hold what is asked."""


class UnknownRegion(LookupError):
    pass


class RegionExists(ValueError):
    pass


class RegionInUse(RuntimeError):
    """A region a running request reads or writes cannot be unregistered."""


class NotLocal(PermissionError):
    """Shared memory is for callers on this machine."""


@dataclass(eq=False)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    mapped: mmap.mmap
    users: int = 0

    def span(self, offset: int, size: int, what: str) -> int:
        """The absolute offset of ``size`` bytes at ``offset`` in the region, once both are checked."""
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise RegionError(f"{what}: {size} bytes at offset {offset} do not fit region '{self.name}' "
                              f"of {self.byte_size} bytes")
        actual = os.fstat(self.fd).st_size
        if actual < self.offset + self.byte_size:
            raise RegionError(f"region '{self.name}': its object {self.key} shrank to {actual} bytes since it was "
                              f"registered ({self.offset + self.byte_size} needed)")
        return self.offset + offset

    def close(self) -> None:
        self.mapped.close()
        os.close(self.fd)


class SharedMemory:
    """The registered regions, by name."""

    def __init__(self, root: Path = SHM_ROOT, max_regions: int = MAX_REGIONS) -> None:
        self.root = root
        self.max_regions = max_regions
        self._regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        if not name:
            raise InputError("a shared-memory region needs a name")
        if name in self._regions:
            raise RegionExists(f"shared-memory region '{name}' is already registered")
        if len(self._regions) >= self.max_regions:
            self._forget_unlinked()
        if len(self._regions) >= self.max_regions:
            raise RegionError(f"{self.max_regions} shared-memory regions are registered; unregister one first")
        if not KEY.fullmatch(key) or key.lstrip("/") in (".", ".."):
            raise RegionError(f"shared-memory key {key[:200]!r} is not a POSIX shared-memory name "
                              "(letters, digits, . _ -, one optional leading /)")
        if offset < 0 or byte_size <= 0:
            raise RegionError(f"region '{name}' needs byte_size > 0 and offset >= 0, got {byte_size} at {offset}")
        path = self.root / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise RegionError(f"cannot open shared-memory object {key}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RegionError(f"shared-memory object {key} is not a regular file")
            if info.st_size < offset + byte_size:
                raise RegionError(f"shared-memory object {key} is {info.st_size} bytes; region '{name}' needs "
                                  f"{offset + byte_size}")
            mapped = mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        region = self._regions[name] = Region(name, key, offset, byte_size, fd, mapped)
        return region

    def status(self, name: str = "") -> list[Region]:
        """One region, or every region for the empty name."""
        if not name:
            return list(self._regions.values())
        if name not in self._regions:
            raise UnknownRegion(f"no shared-memory region '{name}' is registered")
        return [self._regions[name]]

    def unregister(self, name: str = "") -> None:
        """One region, or all for the empty name; an unknown name is no error
        (as Triton does). None goes while a request uses it."""
        names = list(self._regions) if not name else [name] if name in self._regions else []
        busy = sorted(n for n in names if self._regions[n].users)
        if busy:
            raise RegionInUse(f"shared-memory region{'s' if len(busy) > 1 else ''} {', '.join(busy)} "
                              "in use by a running request; unregister once it has its reply")
        for n in names:
            self._regions.pop(n).close()

    def close(self) -> None:
        for region in self._regions.values():
            region.close()
        self._regions.clear()

    def _forget_unlinked(self) -> None:
        """Regions whose object its owner has unlinked (an app that ended
        without unregistering) and no request uses: nobody can name their
        memory again, so they only hold a descriptor and a mapping."""
        for name, region in list(self._regions.items()):
            if not region.users and os.fstat(region.fd).st_nlink == 0:
                self._regions.pop(name).close()

    @contextlib.contextmanager
    def lease(self, *, local: bool) -> Iterator[Lease]:
        """The regions one request uses, held until it has its reply."""
        lease = Lease(self, local)
        try:
            yield lease
        finally:
            for region in lease.held:
                region.users -= 1

    def _get(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise RegionError(f"no shared-memory region '{name}' is registered")
        return region


def peer_is_local(peer: str) -> bool:
    """Whether a gRPC peer (ipv4:127.0.0.1:5000, ipv6:[::1]:5000, unix:...) is on this machine."""
    kind, _, address = peer.partition(":")
    if kind == "unix":
        return True
    host = address.rpartition(":")[0].strip("[]")
    return (kind == "ipv4" and host.startswith("127.")) or (kind == "ipv6" and host in ("::1", "::ffff:127.0.0.1"))


@dataclass
class Lease:
    memory: SharedMemory
    local: bool
    held: list[Region] = field(default_factory=list)

    def take(self, name: str, offset: int, size: int, what: str) -> None:
        """Check ``size`` bytes at ``offset`` of region ``name`` for ``what``, and hold the region."""
        if not self.local:
            raise NotLocal("shared memory is for apps on this device; this caller is not")
        region = self.memory._get(name)
        region.span(offset, size, what)
        if region not in self.held:
            region.users += 1
            self.held.append(region)

    def read(self, name: str, offset: int, size: int, what: str) -> np.ndarray:
        """A copy of the bytes, the region held (see the module's docstring for why a copy)."""
        self.take(name, offset, size, what)
        region = self.memory._get(name)
        return np.frombuffer(region.mapped, np.uint8, size, region.span(offset, size, what)).copy()

    def write(self, name: str, offset: int, size: int, array: np.ndarray, what: str) -> None:
        if array.nbytes > size:
            raise RegionError(f"{what} is {array.nbytes} bytes; the {size} bytes of region '{name}' given for it "
                              "cannot hold it")
        region = self.memory._get(name)
        start = region.span(offset, array.nbytes, what)
        target = np.frombuffer(region.mapped, np.uint8, array.nbytes, start)
        target[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        del target  # the mapping cannot close while an array points into it


class OwnedRegion:
    """A shared-memory object an app creates for its own tensors (the SDK's
    side): readable and writable by its owner and group only, unlinked on close."""

    def __init__(self, key: str, byte_size: int, root: Path = SHM_ROOT) -> None:
        if not KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a POSIX shared-memory name")
        self.key, self.byte_size = key, byte_size
        self.path = root / key.lstrip("/")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660)
        try:
            os.ftruncate(fd, byte_size)
            self.mapped = mmap.mmap(fd, byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)  # the mapping keeps the object

    def write(self, offset: int, array: np.ndarray) -> None:
        target = np.frombuffer(self.mapped, np.uint8, array.nbytes, offset)
        target[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        del target

    def read(self, offset: int, size: int) -> np.ndarray:
        return np.frombuffer(self.mapped, np.uint8, size, offset).copy()

    def close(self) -> None:
        self.mapped.close()
        self.path.unlink(missing_ok=True)
