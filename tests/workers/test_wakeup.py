"""Waking idle workers: NOTIFY brings new chunks in milliseconds; polling is the fallback."""

from __future__ import annotations

import time

from tests.helpers.db import new_job
from tests.helpers.pool import progress, wait_until
from workers.config import PoolConfig
from workers.supervisor import Supervisor


def started(pool, workers):
    wait_until(lambda: len(pool.worker_pids()) == workers, 30, f"{workers} workers")
    time.sleep(0.5)  # let them finish their first, empty, claim


def test_new_chunks_wake_idle_workers_at_once(dsn, conn, start_pool):
    pool = start_pool("--handler", "workers.sample:noop", "--processes", "2", "--poll", "30")
    started(pool, 2)
    created = time.monotonic()
    job_id = new_job(conn, 500)
    wait_until(lambda: progress(dsn, job_id) == {"completed": 1}, 10, "the chunk to complete")
    assert time.monotonic() - created < 2.0, "picked up by NOTIFY, not by the 30 s poll"
    assert pool.stop() == 0


def test_poll_only_mode(dsn, conn, start_pool):
    pool = start_pool("--handler", "workers.sample:noop", "--processes", "1", "--poll", "0.3", "--no-listen")
    started(pool, 1)
    job_id = new_job(conn, 1000)
    wait_until(lambda: progress(dsn, job_id) == {"completed": 2}, 10, "the chunks to complete")
    assert pool.stop() == 0


def test_one_chunk_wakes_one_idle_worker():
    supervisor = Supervisor(PoolConfig(dsn="dbname=x", handler="workers.sample:noop", processes=4))
    for slot in supervisor.slots:
        supervisor.idle[slot.index] = 1
    supervisor.wake('{"job_id": 7, "chunks": 1}')
    assert [slot.wake.is_set() for slot in supervisor.slots] == [True, False, False, False]
    supervisor.wake('{"job_id": 7, "chunks": 100}')
    assert all(slot.wake.is_set() for slot in supervisor.slots)


def test_wakeups_for_other_jobs_are_ignored_with_a_job_filter():
    supervisor = Supervisor(PoolConfig(dsn="dbname=x", handler="workers.sample:noop", processes=2, job_id=5))
    supervisor.idle[0] = supervisor.idle[1] = 1
    supervisor.wake('{"job_id": 6, "chunks": 3}')
    assert not any(slot.wake.is_set() for slot in supervisor.slots)
    supervisor.wake('{"job_id": 5, "chunks": 1}')
    assert supervisor.slots[0].wake.is_set()
