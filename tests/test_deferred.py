"""The deferred queue's file: bounded, idempotent, and nothing accepted lost
or delivered twice across a kill -9 (real SQLite, a real killed process)."""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_agent.deferred import DeferredStore, KeyReused, QueueFull, QueueLimits, UnknownRequest


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def store(tmp_path: Path, clock: Clock, **limits) -> DeferredStore:
    return DeferredStore(tmp_path / "deferred.sqlite", QueueLimits(**limits), clock=clock)


def test_one_request_per_idempotency_key(tmp_path: Path) -> None:
    clock = Clock()
    queue = store(tmp_path, clock)
    first, created = queue.submit(key="k1", kind="infer", model="m", payload=b"abc", deliver_by=clock.now + 60)
    again, created_again = queue.submit(key="k1", kind="infer", model="m", payload=b"abc", deliver_by=clock.now + 90)
    assert created and not created_again and again.id == first.id and again.state == "queued"
    with pytest.raises(KeyReused, match="already names another request"):
        queue.submit(key="k1", kind="infer", model="m", payload=b"other", deliver_by=clock.now + 60)
    assert queue.stats().pending == 1


def test_bounds_are_refused_naming_the_limit(tmp_path: Path) -> None:
    clock = Clock()
    queue = store(tmp_path, clock, max_requests=2, max_bytes=10, max_wait_s=100)
    queue.submit(key="a", kind="infer", model="m", payload=b"12345", deliver_by=clock.now + 50)
    with pytest.raises(QueueFull, match="max_bytes = 10"):
        queue.submit(key="b", kind="infer", model="m", payload=b"123456", deliver_by=clock.now + 50)
    queue.submit(key="c", kind="infer", model="m", payload=b"1", deliver_by=clock.now + 50)
    with pytest.raises(QueueFull, match="max_requests = 2"):
        queue.submit(key="d", kind="infer", model="m", payload=b"1", deliver_by=clock.now + 50)
    with pytest.raises(QueueFull, match="max_wait_s = 100"):
        queue.submit(key="e", kind="infer", model="m", payload=b"1", deliver_by=clock.now + 101)
    with pytest.raises(ValueError, match="already passed"):
        queue.submit(key="f", kind="infer", model="m", payload=b"1", deliver_by=clock.now)


def test_delivered_oldest_first_to_the_models_a_node_takes(tmp_path: Path) -> None:
    clock = Clock()
    queue = store(tmp_path, clock)
    ids = []
    for i, model in enumerate(["a", "b", "a"]):
        clock.now += 1
        ids.append(queue.submit(key=str(i), kind="infer", model=model, payload=b"x", deliver_by=clock.now + 60)[0].id)
    assert queue.take(lambda model: model == "c") is None
    taken = queue.take(lambda model: model == "a")
    assert taken.id == ids[0] and taken.state == "delivering" and taken.attempts == 1
    queue.release(taken.id)  # its node went away: first in line again
    assert queue.take(lambda model: True).id == ids[0]
    queue.finish(ids[0], b"result")
    assert queue.take(lambda model: True).id == ids[1]
    ended = queue.get(ids[0])
    assert ended.state == "done" and ended.result == b"result" and ended.ended
    queue.finish(ids[0], b"again")  # a second finish changes nothing
    assert queue.get(ids[0]).result == b"result"


def test_a_passed_deadline_fails_on_its_id_and_results_expire(tmp_path: Path) -> None:
    clock = Clock()
    queue = store(tmp_path, clock, result_ttl_s=100)
    late = queue.submit(key="late", kind="infer", model="m", payload=b"x", deliver_by=clock.now + 10)[0]
    kept = queue.submit(key="kept", kind="infer", model="m", payload=b"x", deliver_by=clock.now + 1000)[0]
    clock.now += 11
    assert queue.expire() == [late.id]
    failed = queue.get(late.id)
    assert (failed.state, failed.error_code) == ("failed", "DEADLINE_EXCEEDED")
    queue.finish(queue.take(lambda model: True).id, b"r")
    queue.mark_fetched(kept.id)
    clock.now += 61  # fetched a minute ago: gone; the unfetched failure stays until its TTL
    assert queue.purge() == 1
    with pytest.raises(UnknownRequest):
        queue.get(kept.id)
    clock.now += 100
    assert queue.purge() == 1
    assert queue.stats().pending == queue.stats().done == queue.stats().failed == 0


def test_a_kill_9_loses_nothing_and_delivers_nothing_twice(tmp_path: Path) -> None:
    """A process accepts 20 requests, finishes 5 and is killed with 3 more
    being delivered: the next one finds the 5 done (not to be computed again)
    and the other 15 queued, each exactly once."""
    path = tmp_path / "deferred.sqlite"
    script = textwrap.dedent(f"""
        import os, signal, time
        from edge_agent.deferred import DeferredStore
        queue = DeferredStore({str(path)!r})
        for i in range(20):
            queue.submit(key=f"k{{i}}", kind="infer", model="m", payload=b"p%d" % i, deliver_by=time.time() + 600)
        for _ in range(5):
            queue.finish(queue.take(lambda model: True).id, b"done")
        for _ in range(3):
            queue.take(lambda model: True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == -signal.SIGKILL
    queue = DeferredStore(path)
    assert queue.stats().done == 5 and queue.stats().pending == 15
    delivered = []
    while (taken := queue.take(lambda model: True)) is not None:
        delivered.append(taken.payload)
        queue.finish(taken.id, b"done")
    assert sorted(delivered) == sorted(b"p%d" % i for i in range(5, 20))


def test_an_unreadable_file_is_moved_aside_loudly_and_a_new_queue_starts(tmp_path: Path, caplog) -> None:
    path = tmp_path / "deferred.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR):
        queue = DeferredStore(path)
    assert "unreadable" in caplog.text and "NOT delivered" in caplog.text
    aside = [p for p in tmp_path.iterdir() if ".unreadable-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")
    queue.submit(key="k", kind="infer", model="m", payload=b"x", deliver_by=time.time() + 60)
    assert queue.stats().pending == 1


# The first layout (stop 26): the payload in the middle of the row.
LAYOUT_1 = """
CREATE TABLE requests (
    id TEXT PRIMARY KEY, idempotency_key TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, model TEXT NOT NULL,
    payload BLOB NOT NULL, bytes INTEGER NOT NULL, created REAL NOT NULL, deliver_by REAL NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, result BLOB, error_code TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '', finished REAL, fetched REAL
);
CREATE INDEX pending ON requests (state, created);
INSERT INTO requests (id, idempotency_key, kind, model, payload, bytes, created, deliver_by, state)
    VALUES ('r1', 'k1', 'infer', 'm', x'0102', 2, 1000000.0, 1000060.0, 'queued');
INSERT INTO requests (id, idempotency_key, kind, model, payload, bytes, created, deliver_by, state, result, finished)
    VALUES ('r2', 'k2', 'infer', 'm', x'03', 1, 1000001.0, 1000060.0, 'done', x'0405', 1000002.0);
"""


def test_a_queue_file_of_the_first_layout_is_moved_to_this_one_with_nothing_lost(tmp_path: Path) -> None:
    path = tmp_path / "deferred.sqlite"
    with sqlite3.connect(path) as old:
        old.executescript(LAYOUT_1)
    old.close()
    clock = Clock()
    queue = DeferredStore(path, QueueLimits(), clock=clock)
    done = queue.get("r2")
    assert (done.state, done.result, done.payload) == ("done", b"\x04\x05", None)  # a read by id skips the payload
    taken = queue.take(lambda model: True)
    assert (taken.id, taken.payload, taken.attempts) == ("r1", b"\x01\x02", 1)
    assert queue.stats().pending == 1 and queue.stats().done == 1
    columns = [row[1] for row in queue._db.execute("PRAGMA table_info(requests)")]
    assert columns[-2:] == ["payload", "result"]
    queue.close()
    assert DeferredStore(path, QueueLimits(), clock=clock).get("r1").state == "queued"  # reopened: already migrated
