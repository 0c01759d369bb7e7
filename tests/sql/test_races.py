"""Races between real processes: the end of a job is seen exactly once."""

from __future__ import annotations

import json
import multiprocessing

import psycopg
import pytest

from tests.helpers.db import assert_counters_consistent, claim, new_job
from tests.helpers.procs import finish_in_lockstep

ROUNDS = 200
spawn = multiprocessing.get_context("spawn")


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
