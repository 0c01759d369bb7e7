"""The progress counters never drift from the chunks, whatever mix of calls runs concurrently."""

from __future__ import annotations

import multiprocessing
import queue

import pytest

from tests.helpers.db import assert_counters_consistent, new_job
from tests.helpers.procs import random_operations


def run_random(dsn: str, seeds: list[int], steps: int) -> list[str]:
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    procs = [spawn.Process(target=random_operations, args=(dsn, seed, steps, results)) for seed in seeds]
    for proc in procs:
        proc.start()
    unexpected = []
    for _ in procs:
        try:
            unexpected += results.get(timeout=240)
        except queue.Empty:
            unexpected.append("a process did not report back")
    for proc in procs:
        proc.join(30)
    return unexpected


def test_counters_after_a_random_sequence_of_calls(dsn, conn):
    for size, chunk_size in ((20, 1), (3, 1), (40, 1)):
        new_job(conn, size, chunk_size=chunk_size, max_retries=2)
    assert run_random(dsn, [1], 600) == []
    assert_counters_consistent(conn)


@pytest.mark.slow
def test_counters_and_locks_under_four_concurrent_processes(dsn, conn):
    """Four processes hammer three jobs: no deadlock, no CHECK violation, counters exact."""
    for size in (64, 17, 33):
        new_job(conn, size, chunk_size=1, max_retries=3)
    assert run_random(dsn, [11, 12, 13, 14], 800) == []
    assert_counters_consistent(conn)
    open_jobs = conn.execute(
        "SELECT count(*) FROM chunkq.crawl_jobs WHERE finished_at IS NULL AND open_slots = 0"
    ).fetchone()
    assert open_jobs == (0,)
