"""Progress: job_progress and the counter rows behind it, exact under concurrent calls; a job finishes exactly once."""

from __future__ import annotations

import json
import multiprocessing
import queue

import psycopg
import pytest

from tests.helpers.db import assert_counters_consistent, claim, new_job
from tests.helpers.procs import finish_in_lockstep, random_operations

ROUNDS = 200
spawn = multiprocessing.get_context("spawn")


def test_progress_follows_the_chunks(conn):
    job_id = new_job(conn, 2000)

    def progress():
        return conn.execute(
            "SELECT status::text, total_chunks, pending_chunks, processing_chunks, completed_chunks, failed_chunks,"
            " cancelled_chunks, completion_percentage, is_complete FROM chunkq.job_progress(%s)",
            (job_id,),
        ).fetchone()

    assert progress() == ("pending", 4, 4, 0, 0, 0, 0, 0.0, False)
    (a, att_a), (b, att_b), (c, att_c) = claim(conn, limit=3)
    assert progress() == ("running", 4, 1, 3, 0, 0, 0, 0.0, False)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (a, att_a))
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (b, att_b))
    assert progress() == ("running", 4, 1, 1, 1, 1, 0, 25.0, False)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (c, att_c))
    ((d, att_d),) = claim(conn)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (d, att_d))
    assert progress() == ("failed", 4, 0, 0, 3, 1, 0, 75.0, True)
    assert_counters_consistent(conn)


def test_progress_of_an_unchunked_job_is_not_complete(conn):
    job_id = new_job(conn, 1500, chunk=False)
    row = conn.execute("SELECT total_chunks, is_complete FROM chunkq.job_progress(%s)", (job_id,)).fetchone()
    assert row == (0, False)


def test_counter_rows_spread_chunks_over_sixteen_slots(conn):
    job_id = new_job(conn, 500 * 40)
    slots = conn.execute(
        "SELECT slot, total, pending FROM chunkq.job_chunk_counts WHERE job_id = %s ORDER BY slot", (job_id,)
    ).fetchall()
    assert [s for s, _, _ in slots] == list(range(16))
    assert [t for _, t, _ in slots] == [3] * 8 + [2] * 8  # 40 chunks: slots 0-7 get indexes s, s+16, s+32
    assert sum(t for _, t, _ in slots) == 40
    assert conn.execute("SELECT open_slots FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)).fetchone() == (16,)
    assert_counters_consistent(conn)


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


def race(dsn: str, pairs: list[tuple[tuple[int, int, str], tuple[int, int, str]]]) -> list[tuple[bool, bool]]:
    """Two processes report pairs[i][0] and pairs[i][1] at the same moment, round after round."""
    barrier = spawn.Barrier(2)
    results = [spawn.Queue(), spawn.Queue()]
    procs = [
        spawn.Process(target=finish_in_lockstep, args=(dsn, [p[side] for p in pairs], barrier, results[side]))
        for side in (0, 1)
    ]
    for proc in procs:
        proc.start()
    flags = [results[side].get(timeout=120) for side in (0, 1)]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    return list(zip(*flags, strict=True))


def last_two_chunks(conn: psycopg.Connection, chunks: int, last: tuple[int, int]) -> tuple[int, list[tuple[int, int]]]:
    """A job with every chunk completed except the two at indexes ``last``, which are claimed."""
    job_id = new_job(conn, 500 * chunks)
    claimed = conn.execute(
        "SELECT id, attempt, chunk_index FROM chunkq.claim_chunks('setup', %s, %s)", (chunks, job_id)
    ).fetchall()
    racers = []
    for chunk_id, attempt, index in claimed:
        if index in last:
            racers.append((chunk_id, attempt))
        else:
            conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    return job_id, racers


@pytest.mark.slow
def test_last_two_chunks_finish_the_job_exactly_once(dsn, conn):
    """Neighbouring chunks (different counter rows); every third round one of them fails."""
    jobs, pairs, expected = [], [], []
    for round_no in range(ROUNDS):
        job_id, ((a, att_a), (b, att_b)) = last_two_chunks(conn, 2, (0, 1))
        outcome_b = "fail" if round_no % 3 == 0 else "complete"
        jobs.append(job_id)
        pairs.append(((a, att_a, "complete"), (b, att_b, outcome_b)))
        expected.append("failed" if outcome_b == "fail" else "completed")

    flags = race(dsn, pairs)

    for job_id, (first, second), status in zip(jobs, flags, expected, strict=True):
        assert first != second, f"job {job_id}: job_finished reported by {'both' if first else 'neither'} finisher"
        row = conn.execute(
            "SELECT status::text, finished_at IS NOT NULL, open_slots FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)
        ).fetchone()
        assert row == (status, True, 0)
    assert_counters_consistent(conn)


@pytest.mark.slow
def test_last_two_chunks_in_the_same_counter_row(dsn, conn):
    """Indexes 0 and 16 share counter row 0: the two reports queue on it, one of them ends the job."""
    jobs, pairs = [], []
    for _ in range(ROUNDS // 2):
        job_id, ((a, att_a), (b, att_b)) = last_two_chunks(conn, 17, (0, 16))
        jobs.append(job_id)
        pairs.append(((a, att_a, "complete"), (b, att_b, "complete")))

    flags = race(dsn, pairs)

    assert all(first != second for first, second in flags)
    finished = conn.execute(
        "SELECT count(*) FROM chunkq.crawl_jobs WHERE id = ANY(%s) AND status = 'completed'", (jobs,)
    ).fetchone()
    assert finished == (len(jobs),)
    assert_counters_consistent(conn)


def test_job_finished_notification_is_sent_once(dsn, conn):
    job_id = new_job(conn, 1000)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN chunkq_job_finished")
        for chunk_id, attempt in claim(conn, limit=2):
            conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
        notices = list(listener.notifies(timeout=1))
    assert [json.loads(n.payload) for n in notices] == [{"job_id": job_id, "status": "completed"}]
