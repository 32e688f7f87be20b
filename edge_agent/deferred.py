"""Store-and-forward: requests an app asked to have delivered later, when no
node can take them now, kept in one SQLite file on the device.

SQLite because a board runs no database server, and it gives what the queue
must promise across a power cut or a kill -9: a write-ahead log with every
commit synced (nothing accepted is lost), one transaction per state change
(a result and its "done" land together, so nothing computed is computed
again), and a unique index on the idempotency key (the same request
submitted twice is one request).

A request moves queued -> delivering -> done | failed. One caught in
"delivering" by a crash goes back to "queued" at the next start: its node
never answered for it, so it is delivered again, once.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtimes.onnx_exec import InputError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the blobs last (1 had the payload in the middle of the row)
TABLE = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,                 -- infer | generate
    model TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL,              -- unix time: it must survive a restart
    deliver_by REAL NOT NULL,
    state TEXT NOT NULL,                -- queued | delivering | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    error_code TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    finished REAL,
    fetched REAL,
    payload BLOB NOT NULL,              -- the request, as the agent's own protobuf message
    result BLOB                         -- the reply, as the agent's own protobuf message
);
"""
# The blobs come last and the index covers every query but a read by id:
# reaching a column stored after a large blob walks the blob's overflow pages.
# With forty 602 kB requests queued and the payload mid-row (version 1),
# stats() (read by explain, /health and every metrics scrape) took 4.3 ms, and
# each read of one request's state read its whole payload; from the index it
# takes 0.023 ms (this 2-vCPU VM, mean of 20).
SCHEMA = TABLE + """
CREATE INDEX IF NOT EXISTS waiting ON requests (state, created, id, model, bytes, deliver_by, finished, fetched);
"""
PENDING = ("queued", "delivering")
FETCHED_KEEP_S = 60.0  # a fetched result stays this long, for a fetch whose reply was lost


class QueueFull(Exception):
    """A bound of the queue would be passed; the message names it."""

    status_code = "RESOURCE_EXHAUSTED"


class KeyReused(ValueError):
    """An idempotency key already names a different request."""

    status_code = "ALREADY_EXISTS"


class UnknownRequest(KeyError):
    """No deferred request has this id (never, or its result expired)."""

    status_code = "NOT_FOUND"


@dataclass(frozen=True)
class QueueLimits:
    max_requests: int = 1000            # pending (queued or delivering) at once
    max_bytes: int = 256 << 20          # their payloads together
    max_wait_s: float = 24 * 3600.0     # the furthest deliver_by accepted, from now
    result_ttl_s: float = 24 * 3600.0   # an unfetched result (or failure) is kept this long


@dataclass(frozen=True)
class Deferred:
    id: str
    key: str
    kind: str
    model: str
    payload: bytes | None  # None where it was not read (get)
    created: float
    deliver_by: float
    state: str
    attempts: int
    result: bytes | None
    error_code: str
    error: str

    @property
    def ended(self) -> bool:
        return self.state in ("done", "failed")


@dataclass(frozen=True)
class QueueStats:
    pending: int          # queued or delivering
    pending_bytes: int
    oldest_age_s: float   # of the oldest pending request, 0 when none
    done: int
    failed: int


_COLUMNS = "id, idempotency_key, kind, model, payload, created, deliver_by, state, attempts, result, error_code, error"
_COLUMNS_BUT_PAYLOAD = _COLUMNS.replace("payload", "NULL")


class DeferredStore:
    """The queue's file. Every method is one transaction, synced before it
    returns; calls from several threads are serialised by one lock."""

    def __init__(self, path: Path, limits: QueueLimits = QueueLimits(), *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open_or_set_aside()
        with self._lock, self._db:
            requeued = self._db.execute("UPDATE requests SET state = 'queued' WHERE state = 'delivering'").rowcount
        if requeued:
            logger.warning("deferred queue %s: %d requests were being delivered when the agent stopped; "
                           "they are queued again", self.path, requeued)

    def _open_or_set_aside(self) -> sqlite3.Connection:
        """The file opened and checked; one SQLite cannot read is moved aside
        (loudly, never deleted) and a new queue started, so the agent starts."""
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(self.clock())}")
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.path}{suffix}")
                if part.exists():
                    part.rename(Path(f"{aside}{suffix}"))
            logger.error("deferred queue %s is unreadable (%s): moved to %s; starting an empty queue. The requests "
                         "in it are NOT delivered: recover them from that file by hand", self.path, exc, aside)
            return self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # every commit reaches the disk before it returns
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION and db.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'").fetchone():
                self._migrate(db, version)
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        """A version-1 file into this layout, in one transaction (its index
        goes with the old table); every column keeps its name, so the rows
        move by name."""
        old = f"requests_v{version}"
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(f"ALTER TABLE requests RENAME TO {old}")
            db.execute(TABLE)
            columns = ", ".join(row[1] for row in db.execute("PRAGMA table_info(requests)"))
            db.execute(f"INSERT INTO requests ({columns}) SELECT {columns} FROM {old}")
            db.execute(f"DROP TABLE {old}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        logger.info("deferred queue %s: moved from layout %d to %d", self.path, version, SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ writing --

    def submit(self, *, key: str, kind: str, model: str, payload: bytes, deliver_by: float) -> tuple[Deferred, bool]:
        """(the request, True) once stored; (the stored one, False) when ``key``
        was submitted before with the same request. QueueFull names the bound
        that would be passed; KeyReused a key naming another request."""
        if not key:
            raise InputError("a deferred request needs an idempotency key")
        now = self.clock()
        if deliver_by <= now:
            raise InputError("deliver_by has already passed")
        if deliver_by - now > self.limits.max_wait_s:
            raise QueueFull(f"deliver_by is {deliver_by - now:.0f} s away; this queue keeps requests at most "
                            f"max_wait_s = {self.limits.max_wait_s:.0f} s")
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            known = self._row("SELECT {} FROM requests WHERE idempotency_key = ?", key)
            if known is not None:
                if (known.kind, known.model, known.payload) != (kind, model, payload):
                    raise KeyReused(f"idempotency key {key!r} already names another request ({known.id})")
                return known, False
            count, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM requests WHERE state IN (?, ?)", PENDING).fetchone()
            if count + 1 > self.limits.max_requests:
                raise QueueFull(f"{count} requests are waiting: the queue holds at most max_requests = "
                                f"{self.limits.max_requests}")
            if size + len(payload) > self.limits.max_bytes:
                raise QueueFull(f"{size + len(payload)} bytes would wait: the queue holds at most max_bytes = "
                                f"{self.limits.max_bytes}")
            request_id = uuid.uuid4().hex
            self._db.execute(
                "INSERT INTO requests (id, idempotency_key, kind, model, payload, bytes, created, deliver_by, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                (request_id, key, kind, model, payload, len(payload), now, deliver_by))
        return self.get(request_id), True

    def take(self, deliverable: Callable[[str], bool]) -> Deferred | None:
        """The oldest queued request whose model ``deliverable`` says a node can
        take now, marked delivering; None when there is none."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute("SELECT id, model FROM requests WHERE state = 'queued' ORDER BY created, id").fetchall()
            for request_id, model in rows:
                if deliverable(model):
                    self._db.execute("UPDATE requests SET state = 'delivering', attempts = attempts + 1 WHERE id = ?",
                                     (request_id,))
                    return self._row("SELECT {} FROM requests WHERE id = ?", request_id)
        return None

    def finish(self, request_id: str, result: bytes) -> None:
        self._end(request_id, "done", result=result)

    def fail(self, request_id: str, code: str, message: str) -> None:
        self._end(request_id, "failed", code=code, message=message)

    def _end(self, request_id: str, state: str, *, result: bytes | None = None, code: str = "", message: str = "") -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE requests SET state = ?, result = ?, error_code = ?, error = ?, finished = ? "
                             "WHERE id = ? AND state IN (?, ?)",
                             (state, result, code, message, self.clock(), request_id, *PENDING))

    def release(self, request_id: str) -> None:
        """A delivery that did not happen (its node went away): queued again, first in line as before."""
        with self._lock, self._db:
            self._db.execute("UPDATE requests SET state = 'queued' WHERE id = ? AND state = 'delivering'", (request_id,))

    def expire(self) -> list[str]:
        """Queued requests whose deliver_by has passed fail with DEADLINE_EXCEEDED; their ids."""
        now = self.clock()
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM requests WHERE state = 'queued' AND deliver_by <= ?", (now,))]
            self._db.executemany(
                "UPDATE requests SET state = 'failed', error_code = 'DEADLINE_EXCEEDED', finished = ?, "
                "error = 'its deliver_by passed before any node could take it' WHERE id = ?", [(now, i) for i in ids])
        return ids

    def mark_fetched(self, request_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE requests SET fetched = COALESCE(fetched, ?) WHERE id = ?", (self.clock(), request_id))

    def purge(self) -> int:
        """Forget ended requests fetched a while ago, or never fetched within the result TTL."""
        now = self.clock()
        with self._lock, self._db:
            return self._db.execute(
                "DELETE FROM requests WHERE state IN ('done', 'failed') AND (fetched <= ? OR finished <= ?)",
                (now - FETCHED_KEEP_S, now - self.limits.result_ttl_s)).rowcount

    # ------------------------------------------------------------ reading --

    def get(self, request_id: str) -> Deferred:
        """The request's state and result; its payload is not read (None)."""
        with self._lock:
            found = self._row("SELECT {} FROM requests WHERE id = ?", request_id, columns=_COLUMNS_BUT_PAYLOAD)
        if found is None:
            raise UnknownRequest(f"no deferred request {request_id!r} (never submitted, or its result expired)")
        return found

    def stats(self) -> QueueStats:
        now = self.clock()
        with self._lock:
            pending, size, oldest = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0), MIN(created) FROM requests WHERE state IN (?, ?)",
                PENDING).fetchone()
            done, failed = self._db.execute(
                "SELECT COALESCE(SUM(state = 'done'), 0), COALESCE(SUM(state = 'failed'), 0) FROM requests").fetchone()
        return QueueStats(pending, size, max(now - oldest, 0.0) if oldest is not None else 0.0, done, failed)

    def pending_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT id FROM requests WHERE state IN (?, ?) ORDER BY created, id", PENDING)]

    def _row(self, query: str, *args: object, columns: str = _COLUMNS) -> Deferred | None:
        row = self._db.execute(query.format(columns), args).fetchone()
        return None if row is None else Deferred(*row)
