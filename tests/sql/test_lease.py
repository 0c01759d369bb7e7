"""SQL API: leases — expiry, reclaim_expired_chunks, heartbeats that keep a lease, stale workers fenced out."""

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


def test_heartbeat_chunks_extends_held_leases_and_reports_lost_ones(conn):
    job_id = new_job(conn, 500 * 3)
    (a, att_a), (b, att_b), (c, att_c) = conn.execute(
        "SELECT id, attempt FROM chunkq.claim_chunks('w', 3, NULL, interval '10 s')"
    ).fetchall()
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (b, att_b))
    rows = conn.execute(
        "SELECT chunk_id, held, status::text, lease_expires_at - now() > interval '50 s'"
        " FROM chunkq.heartbeat_chunks(%s, %s, interval '60 s')",
        ([a, b, c, 424242], [att_a, att_b, att_c + 1, 1]),
    ).fetchall()
    assert rows == [
        (a, True, "processing", True),
        (b, False, "completed", None),
        (c, False, "processing", None),
        (424242, False, None, None),
    ]
    conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    rows = conn.execute("SELECT held, status::text FROM chunkq.heartbeat_chunks(%s, %s)", ([a], [att_a])).fetchall()
    assert rows == [(False, "cancelled")]


def test_heartbeat_chunks_rejects_mismatched_arrays(conn):
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT * FROM chunkq.heartbeat_chunks('{1,2}', '{1}')")
    assert caught.value.sqlstate == "CQ001"


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
