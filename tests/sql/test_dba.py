"""SQL API for DBAs (0004): pause, resume, priority, pruning, the views, and queue health."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.helpers.db import assert_counters_consistent, claim, new_job, snapshot, statuses


def test_paused_job_is_not_claimed_and_resumes(conn, dsn):
    paused = new_job(conn, 500 * 4, priority=9)
    other = new_job(conn, 500 * 2, priority=1)
    ((held, attempt),) = claim(conn, job_id=paused)
    row = conn.execute("SELECT paused_at IS NOT NULL, status::text FROM chunkq.pause_job(%s)", (paused,)).fetchone()
    assert row == (True, "running")
    assert {job for (job,) in conn.execute("SELECT job_id FROM chunkq.claim_chunks('w', 10)")} == {other}
    assert claim(conn, job_id=paused) == []
    # The chunk already running carries on, and a retry of it stays held back.
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'flaky', true)", (held, attempt))
    conn.execute("UPDATE chunkq.job_chunks SET available_at = now() WHERE id = %s", (held,))
    assert claim(conn, job_id=paused) == []
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN chunkq_claimable")
        assert conn.execute("SELECT paused_at FROM chunkq.resume_job(%s)", (paused,)).fetchone() == (None,)
        assert next(listener.notifies(timeout=5)).channel == "chunkq_claimable"
    assert len(claim(conn, limit=10, job_id=paused)) == 4
    assert_counters_consistent(conn)


def test_pause_and_resume_are_idempotent(conn):
    job_id = new_job(conn, 1000)
    first = conn.execute("SELECT paused_at FROM chunkq.pause_job(%s)", (job_id,)).fetchone()
    before = snapshot(conn)
    assert conn.execute("SELECT paused_at FROM chunkq.pause_job(%s)", (job_id,)).fetchone() == first
    assert snapshot(conn) == before
    conn.execute("SELECT chunkq.resume_job(%s)", (job_id,))
    before = snapshot(conn)
    conn.execute("SELECT chunkq.resume_job(%s)", (job_id,))
    assert snapshot(conn) == before


@pytest.mark.parametrize("call", ["pause_job(%s)", "resume_job(%s)", "set_job_priority(%s, 3)"])
@pytest.mark.parametrize("state", ["cancelled", "completed"])
def test_finished_jobs_refuse_job_operations(conn, call, state):
    job_id = new_job(conn, 500)
    if state == "cancelled":
        conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    else:
        ((chunk_id, attempt),) = claim(conn)
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(f"SELECT chunkq.{call}", (job_id,))
    assert caught.value.sqlstate == "CQ004"
    assert snapshot(conn) == before


@pytest.mark.parametrize(
    "call",
    [
        "pause_job(4242)",
        "resume_job(4242)",
        "set_job_priority(4242, 3)",
        "retry_failed_chunks(4242)",
        "delete_job(4242)",
        "job_error_summary(4242)",
    ],
)
def test_unknown_jobs(conn, call):
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(f"SELECT * FROM chunkq.{call}")
    assert caught.value.sqlstate == "CQ002"


def test_set_job_priority(conn):
    job_id = new_job(conn, 1500, priority=2)
    ((done, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (done, attempt))
    assert conn.execute("SELECT priority FROM chunkq.set_job_priority(%s, 8)", (job_id,)).fetchone() == (8,)
    rows = conn.execute("SELECT status::text, priority FROM chunkq.job_chunks ORDER BY chunk_index").fetchall()
    assert rows == [("completed", 2), ("pending", 8), ("pending", 8)]
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.set_job_priority(%s, 11)", (job_id,))
    assert caught.value.sqlstate == "CQ001"
    assert snapshot(conn) == before


def finish_job(conn, job_id, fail=False):
    for chunk_id, attempt in claim(conn, limit=1000, job_id=job_id):
        report = "fail_chunk(%s, %s, 'x')" if fail else "complete_chunk(%s, %s)"
        conn.execute(f"SELECT chunkq.{report}", (chunk_id, attempt))


def test_prune_deletes_old_finished_jobs_in_bounded_batches(conn):
    old = [new_job(conn, 500 * 5) for _ in range(2)]
    for job_id in old:
        finish_job(conn, job_id, fail=job_id == old[1])
    conn.execute("UPDATE chunkq.crawl_jobs SET finished_at = now() - interval '40 days' WHERE id = ANY(%s)", (old,))
    recent = new_job(conn, 500)
    finish_job(conn, recent)
    running = new_job(conn, 500)
    calls = []
    while True:
        result = conn.execute(
            "SELECT jobs_deleted, chunks_deleted, done FROM chunkq.prune_finished_jobs('30 days', 3)"
        ).fetchone()
        calls.append(result)
        if result[2]:
            break
    assert all(chunks <= 3 for _, chunks, _ in calls)
    assert sum(jobs for jobs, _, _ in calls) == 2 and sum(chunks for _, chunks, _ in calls) == 10
    assert [j for (j,) in conn.execute("SELECT id FROM chunkq.crawl_jobs ORDER BY id")] == [recent, running]
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)
    assert_counters_consistent(conn)


def test_prune_rejects_bad_arguments(conn):
    for args in ("'-1 day'", "NULL", "'1 day', 0"):
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(f"SELECT chunkq.prune_finished_jobs({args})")
        assert caught.value.sqlstate == "CQ001"


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


def test_delete_job(conn):
    job_id = new_job(conn, 1000)
    claim(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.delete_job(%s)", (job_id,))
    assert caught.value.sqlstate == "CQ004"
    conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    conn.execute("SELECT chunkq.delete_job(%s)", (job_id,))
    assert statuses(conn, job_id) == {}
    assert conn.execute("SELECT count(*) FROM chunkq.crawl_jobs").fetchone() == (0,)
