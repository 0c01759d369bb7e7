"""Waking idle workers: NOTIFY brings new chunks in milliseconds; polling is the fallback."""

from __future__ import annotations

import os
import time

import pytest

from chunkq.workers.config import PoolConfig
from chunkq.workers.supervisor import Supervisor, chunks_announced
from tests.helpers.db import new_job
from tests.helpers.pool import progress, wait_until
from tests.workers.test_supervisor import HOSTILE_PAYLOADS


def started(pool, workers):
    wait_until(lambda: len(pool.worker_pids()) == workers, 30, f"{workers} workers")
    time.sleep(0.5)  # let them finish their first, empty, claim


def test_new_chunks_wake_idle_workers_at_once(dsn, conn, start_pool):
    pool = start_pool("--handler", "chunkq.workers.sample:noop", "--processes", "2", "--poll", "30")
    started(pool, 2)
    created = time.monotonic()
    job_id = new_job(conn, 500)
    wait_until(lambda: progress(dsn, job_id) == {"completed": 1}, 10, "the chunk to complete")
    assert time.monotonic() - created < 2.0, "picked up by NOTIFY, not by the 30 s poll"
    assert pool.stop() == 0


def test_poll_only_mode(dsn, conn, start_pool):
    pool = start_pool("--handler", "chunkq.workers.sample:noop", "--processes", "1", "--poll", "0.3", "--no-listen")
    started(pool, 1)
    job_id = new_job(conn, 1000)
    wait_until(lambda: progress(dsn, job_id) == {"completed": 2}, 10, "the chunks to complete")
    assert pool.stop() == 0


def woken(readers: list) -> list[bool]:
    """Which workers found a wake-up in their pipe (read, so that the next check starts afresh)."""
    flags = []
    for reader in readers:
        flags.append(reader.poll(0))
        if flags[-1]:
            os.read(reader.fileno(), 4096)
    return flags


def idle_supervisor(**options) -> tuple[Supervisor, list]:
    supervisor = Supervisor(PoolConfig(dsn="dbname=x", handler="chunkq.workers.sample:noop", **options))
    readers = [slot.new_channel(supervisor.context) for slot in supervisor.slots]
    for slot in supervisor.slots:
        supervisor.idle[slot.index] = 1
    return supervisor, readers


def test_one_chunk_wakes_one_idle_worker():
    supervisor, readers = idle_supervisor(processes=4)
    supervisor.wake(chunks_announced('{"job_id": 7, "chunks": 1}', None))
    assert woken(readers) == [True, False, False, False]
    supervisor.wake(chunks_announced('{"job_id": 7, "chunks": 100}', None))
    assert woken(readers) == [False, True, True, True]  # the first is busy now


def test_wakeups_for_other_jobs_are_ignored_with_a_job_filter():
    supervisor, readers = idle_supervisor(processes=2, job_id=5)
    supervisor.wake(chunks_announced('{"job_id": 6, "chunks": 3}', 5))
    assert woken(readers) == [False, False]
    supervisor.wake(chunks_announced('{"job_id": 5, "chunks": 1}', 5))
    assert woken(readers) == [True, False]


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS)
def test_a_forged_payload_wakes_idle_workers_at_worst(payload):
    """Waking too many is harmless (they find nothing); crashing, or waking nobody, is not."""
    supervisor, readers = idle_supervisor(processes=3, job_id=5)
    supervisor.wake(chunks_announced(payload, 5))
    assert any(woken(readers))


def test_a_payload_that_says_nothing_usable_wakes_every_idle_worker():
    for payload in ("5", '{"chunks": "x"}', '{"chunks": 1e999}', '{"chunks": -3}', "[]", "{" * 3000, ""):
        supervisor, readers = idle_supervisor(processes=3)
        supervisor.wake(chunks_announced(payload, None))
        assert woken(readers) == [True, True, True], payload


def test_a_dead_worker_s_pipe_does_not_stop_the_wake_up():
    supervisor, readers = idle_supervisor(processes=2)
    readers[0].close()  # the worker died: its end of the pipe is gone
    supervisor.wake(chunks_announced("{}", None))
    assert woken(readers[1:]) == [True]
