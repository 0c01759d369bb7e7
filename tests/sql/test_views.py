"""SQL API for DBAs to read: the views job_overview, expired_leases, live_workers, failure_summary and queue_stats()."""

from __future__ import annotations

import time

import psycopg

from tests.helpers.db import claim, new_job


def test_job_overview_rate_eta_and_images(conn):
    job_id = new_job(conn, 500 * 10 + 100)
    for chunk_id, attempt in claim(conn, limit=4, job_id=job_id):
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    row = conn.execute(
        "SELECT completed_chunks, completed_images, chunks_per_second > 0, eta > interval '0', paused_at"
        " FROM chunkq.job_overview WHERE id = %s",
        (job_id,),
    ).fetchone()
    assert row == (4, 2000, True, True, None)
    assert conn.execute("SELECT eta FROM chunkq.job_overview WHERE id = %s", (new_job(conn, 500),)).fetchone() == (
        None,
    )


def test_rate_counts_the_last_minute(conn):
    job_id = new_job(conn, 500 * 20)
    for chunk_id, attempt in claim(conn, limit=6, job_id=job_id):
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    # Pretend those six completions happened one minute earlier: they still count.
    conn.execute(
        "UPDATE chunkq.job_chunk_counts SET rate_minute = date_trunc('minute', now()) - interval '1 minute'"
        " WHERE job_id = %s AND rate_minute IS NOT NULL",
        (job_id,),
    )
    for chunk_id, attempt in claim(conn, limit=2, job_id=job_id):
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    recent = conn.execute(
        "SELECT sum(completed_this_minute + completed_last_minute)"
        " FILTER (WHERE rate_minute = date_trunc('minute', now()))"
        " + coalesce(sum(completed_this_minute) FILTER (WHERE rate_minute < date_trunc('minute', now())), 0)"
        " FROM chunkq.job_chunk_counts WHERE job_id = %s",
        (job_id,),
    ).fetchone()[0]
    assert recent == 8
    # Two minutes old: no longer in the rate.
    conn.execute(
        "UPDATE chunkq.job_chunk_counts SET rate_minute = rate_minute - interval '2 minutes' WHERE job_id = %s",
        (job_id,),
    )
    assert conn.execute("SELECT chunks_per_second FROM chunkq.job_overview WHERE id = %s", (job_id,)).fetchone() == (
        0.0,
    )


def test_expired_leases_and_live_workers(conn, dsn):
    new_job(conn, 500 * 3)
    with psycopg.connect(dsn, autocommit=True, application_name="chunkq worker host:42") as worker:
        worker.execute("SELECT chunkq.claim_chunks('host:42', 1)")
        conn.execute("SELECT chunkq.claim_chunks('gone:1', 1, NULL, interval '1 ms')")
        time.sleep(0.05)
        expired = conn.execute("SELECT worker_id, attempt FROM chunkq.expired_leases").fetchall()
        assert expired == [("gone:1", 1)]
        live = conn.execute(
            "SELECT worker_id, backend_pid IS NOT NULL, chunks_held FROM chunkq.live_workers ORDER BY 1"
        ).fetchall()
        assert live == [("gone:1", False, 1), ("host:42", True, 1)]


def test_failure_summary_groups_errors_by_kind(conn):
    new_job(conn, 500 * 6, max_retries=0)
    for n, (chunk_id, attempt) in enumerate(claim(conn, limit=6)):
        message = f"timed out fetching image {n * 137}" if n < 4 else "HTTP 404 for /cats"
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, %s)", (chunk_id, attempt, message))
    rows = conn.execute(
        "SELECT error_kind, occurrences, chunks, ended_failed, example_error"
        " FROM chunkq.failure_summary ORDER BY occurrences DESC"
    ).fetchall()
    assert [r[:4] for r in rows] == [("timed out fetching image #", 4, 4, 4), ("HTTP # for /cats", 2, 2, 2)]
    assert rows[0][4] == "timed out fetching image 411"


def test_queue_stats_shows_the_oldest_transaction(conn, dsn):
    with psycopg.connect(dsn) as long_running:
        long_running.execute("SELECT txid_current()")  # a transaction that stays open
        time.sleep(0.2)
        age, pid = conn.execute(
            "SELECT oldest_transaction_age, oldest_transaction_pid FROM chunkq.queue_stats()"
        ).fetchone()
        assert pid == long_running.info.backend_pid and age.total_seconds() >= 0.2
        long_running.rollback()
    assert conn.execute("SELECT oldest_transaction_pid FROM chunkq.queue_stats()").fetchone() == (None,)
    row = conn.execute("SELECT autovacuum_on IS NOT NULL, dead_chunk_rows >= 0 FROM chunkq.queue_stats()").fetchone()
    assert row == (True, True)
