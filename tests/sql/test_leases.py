"""SQL API: leases, reclaiming abandoned chunks, and fencing stale workers out."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.helpers.db import assert_counters_consistent, claim, new_job, snapshot


def claim_briefly(conn: psycopg.Connection, worker: str, lease_ms: int = 50) -> tuple[int, int]:
    rows = conn.execute(
        "SELECT id, attempt FROM chunkq.claim_chunks(%s, 1, NULL, %s * interval '1 ms')", (worker, lease_ms)
    ).fetchall()
    assert len(rows) == 1
    return rows[0]


def test_expired_lease_is_reclaimed_by_the_next_claim(conn):
    new_job(conn, 500)
    chunk_id, attempt = claim_briefly(conn, "stalled")
    time.sleep(0.1)
    assert claim(conn, "rescuer") == [(chunk_id, attempt + 1)]
    row = conn.execute(
        "SELECT status::text, attempt, retry_count, worker_id FROM chunkq.job_chunks WHERE id = %s", (chunk_id,)
    ).fetchone()
    assert row == ("processing", 2, 1, "rescuer")  # the lapse counted as a retry
    history = conn.execute(
        "SELECT attempt, worker_id, lease_expired, retried, error LIKE 'lease expired%%'"
        " FROM chunkq.chunk_error_history(%s)",
        (chunk_id,),
    ).fetchall()
    assert history == [(1, "stalled", True, True, True)]
    assert_counters_consistent(conn)


def test_live_lease_is_not_reclaimed(conn):
    new_job(conn, 500)
    claim(conn, "alive")
    assert conn.execute("SELECT chunkq.reclaim_expired_chunks()").fetchone() == (0,)
    assert claim(conn, "other") == []


def test_heartbeat_keeps_a_lease_alive(conn):
    new_job(conn, 500)
    chunk_id, attempt = claim_briefly(conn, "w", lease_ms=300)
    for _ in range(4):
        time.sleep(0.1)
        conn.execute("SELECT chunkq.heartbeat_chunk(%s, %s, interval '300 ms')", (chunk_id, attempt))
    assert conn.execute("SELECT chunkq.reclaim_expired_chunks()").fetchone() == (0,)


def test_stale_complete_after_reclaim_raises_lease_lost_and_keeps_the_newer_attempt(conn):
    job_id = new_job(conn, 500)
    chunk_id, stale = claim_briefly(conn, "stalled")
    time.sleep(0.1)
    ((same_chunk, fresh),) = claim(conn, "rescuer")
    assert same_chunk == chunk_id and fresh == stale + 1
    newer = conn.execute("SELECT t::text FROM chunkq.job_chunks t WHERE id = %s", (chunk_id,)).fetchone()
    before = snapshot(conn)
    for report in ("complete_chunk(%s, %s)", "fail_chunk(%s, %s, 'late')", "heartbeat_chunk(%s, %s)"):
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(f"SELECT chunkq.{report}", (chunk_id, stale))
        assert caught.value.sqlstate == "CQ006", report
        assert "rescuer" in caught.value.diag.message_detail
    assert snapshot(conn) == before
    assert conn.execute("SELECT t::text FROM chunkq.job_chunks t WHERE id = %s", (chunk_id,)).fetchone() == newer
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, fresh))
    assert conn.execute("SELECT status::text FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)).fetchone() == (
        "completed",
    )


def test_stale_report_while_reclaimed_chunk_waits_is_lease_lost(conn):
    new_job(conn, 500)
    chunk_id, stale = claim_briefly(conn, "stalled")
    time.sleep(0.1)
    assert conn.execute("SELECT chunkq.reclaim_expired_chunks()").fetchone() == (1,)
    with pytest.raises(psycopg.Error) as caught:  # pending again, same attempt number, but not ours any more
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, stale))
    assert caught.value.sqlstate == "CQ006"


def test_reclaim_fails_a_chunk_whose_retries_are_spent(conn):
    job_id = new_job(conn, 500, max_retries=1)
    chunk_id, _ = claim_briefly(conn, "first")
    time.sleep(0.1)
    claim_briefly(conn, "second")  # reclaims (retry 1 of 1), then claims again
    time.sleep(0.1)
    assert conn.execute("SELECT chunkq.reclaim_expired_chunks()").fetchone() == (1,)
    row = conn.execute(
        "SELECT status::text, retry_count, attempt, error_message LIKE 'lease expired%%' FROM chunkq.job_chunks"
    ).fetchone()
    assert row == ("failed", 1, 2, True)
    assert conn.execute("SELECT status::text FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)).fetchone() == ("failed",)
    assert conn.execute(
        "SELECT attempt, worker_id, retried FROM chunkq.chunk_error_history(%s)", (chunk_id,)
    ).fetchall() == [(1, "first", True), (2, "second", False)]
    assert_counters_consistent(conn)


def test_operator_complete_without_token(conn):
    new_job(conn, 500)
    ((chunk_id, _),) = claim(conn)
    row = conn.execute("SELECT chunk_status::text, job_finished FROM chunkq.complete_chunk(%s)", (chunk_id,)).fetchone()
    assert row == ("completed", True)
