"""SQL API added for the worker pool (0002): release_chunk, heartbeat_chunks, fail_chunk's max_retries."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.helpers.db import assert_counters_consistent, claim, new_job, snapshot


def test_release_hands_a_chunk_back_without_spending_a_retry(conn, dsn):
    new_job(conn, 500)
    ((chunk_id, attempt),) = claim(conn, "leaving")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN chunkq_claimable")
        row = conn.execute(
            "SELECT status::text, retry_count, lease_expires_at, available_at <= now(), worker_id"
            " FROM chunkq.release_chunk(%s, %s)",
            (chunk_id, attempt),
        ).fetchone()
        assert json.loads(next(listener.notifies(timeout=5)).payload)["chunks"] == 1
    assert row == ("pending", 0, None, True, "leaving")
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)
    assert claim(conn, "next") == [(chunk_id, attempt + 1)]
    with pytest.raises(psycopg.Error) as caught:  # the releasing worker can never report again
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    assert caught.value.sqlstate == "CQ006"
    assert_counters_consistent(conn)


@pytest.mark.parametrize(("state", "sqlstate"), [("pending", "CQ004"), ("stale", "CQ006"), ("unknown", "CQ003")])
def test_release_refusals(conn, state, sqlstate):
    new_job(conn, 500)
    chunk_id = conn.execute("SELECT id FROM chunkq.job_chunks").fetchone()[0]
    attempt = 0  # never claimed
    if state == "stale":
        claim(conn)
        attempt = 7
    elif state == "unknown":
        chunk_id = 99999
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.release_chunk(%s, %s)", (chunk_id, attempt))
    assert caught.value.sqlstate == sqlstate
    assert snapshot(conn) == before


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


def test_fail_with_max_retries_override(conn):
    new_job(conn, 500, max_retries=5)
    ((chunk_id, attempt),) = claim(conn)
    row = conn.execute(
        "SELECT chunk_status::text, retry_count FROM chunkq.fail_chunk(%s, %s, 'x', true, 0)", (chunk_id, attempt)
    ).fetchone()
    assert row == ("failed", 0)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'x', true, -1)", (chunk_id, attempt))
    assert caught.value.sqlstate == "CQ001"
