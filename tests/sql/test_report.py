"""SQL API: reports on a held chunk — heartbeat, complete, fail, release, complete_and_claim's completions; retry."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.helpers.db import FAST, assert_counters_consistent, claim, job_status, new_job, snapshot, statuses


def test_heartbeat_extends_the_lease_and_records_task(conn):
    new_job(conn, 500)
    ((chunk_id, attempt),) = conn.execute(
        "SELECT id, attempt FROM chunkq.claim_chunks('w', 1, NULL, interval '10 s')"
    ).fetchall()
    row = conn.execute(
        "SELECT lease_expires_at - now(), task_id, heartbeat_at = now()"
        " FROM chunkq.heartbeat_chunk(%s, %s, interval '1 hour', 'task-1')",
        (chunk_id, attempt),
    ).fetchone()
    assert row[0].total_seconds() == 3600 and row[1:] == ("task-1", True)


def test_complete_returns_outcome(conn):
    job_id = new_job(conn, 1000)
    ((chunk_id, attempt),) = claim(conn)
    outcome = conn.execute(
        "SELECT chunk_id, job_id, chunk_status::text, attempt, job_status::text, job_finished"
        " FROM chunkq.complete_chunk(%s, %s)",
        (chunk_id, attempt),
    ).fetchone()
    assert outcome == (chunk_id, job_id, "completed", 1, "running", False)


def test_claim_and_complete_a_job(conn):
    job_id = new_job(conn, 1500)
    for chunk_id, attempt in claim(conn, limit=3):
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    assert statuses(conn, job_id) == {"completed": 3}
    assert_counters_consistent(conn)


def test_operator_complete_without_token(conn):
    new_job(conn, 500)
    ((chunk_id, _),) = claim(conn)
    row = conn.execute("SELECT chunk_status::text, job_finished FROM chunkq.complete_chunk(%s)", (chunk_id,)).fetchone()
    assert row == ("completed", True)


@pytest.mark.parametrize("report", ["heartbeat_chunk(%s, NULL)", "complete_chunk(%s)", "fail_chunk(%s, NULL, 'x')"])
def test_reports_on_pending_chunk_are_invalid(conn, report):
    new_job(conn, 500)
    chunk_id = conn.execute("SELECT id FROM chunkq.job_chunks").fetchone()[0]
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(f"SELECT chunkq.{report}", (chunk_id,))
    assert caught.value.sqlstate == "CQ004"
    assert snapshot(conn) == before


@pytest.mark.parametrize("report", ["heartbeat_chunk(%s, 1)", "complete_chunk(%s, 1)", "fail_chunk(%s, 1, 'x')"])
def test_reports_on_unknown_chunk(conn, report):
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(f"SELECT chunkq.{report}", (123456,))
    assert caught.value.sqlstate == "CQ003"


def test_completing_twice_is_refused_and_counts_once(conn):
    job_id = new_job(conn, 1000)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    before = snapshot(conn)
    for token in (attempt, None):
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, token))
        assert caught.value.sqlstate == "CQ004"
    assert snapshot(conn) == before
    assert statuses(conn, job_id) == {"completed": 1, "pending": 1}


def test_fail_without_retry_is_terminal_and_recorded(conn):
    job_id = new_job(conn, 1000)
    ((chunk_id, attempt),) = claim(conn, "w1")
    outcome = conn.execute(
        "SELECT chunk_status::text, retry_count FROM chunkq.fail_chunk(%s, %s, 'HTTP 500')", (chunk_id, attempt)
    ).fetchone()
    assert outcome == ("failed", 0)
    chunk = conn.execute(
        "SELECT error_message, finished_at IS NOT NULL, lease_expires_at FROM chunkq.job_chunks WHERE id = %s",
        (chunk_id,),
    ).fetchone()
    assert chunk == ("HTTP 500", True, None)
    history = conn.execute(
        "SELECT attempt, worker_id, error, lease_expired, retried FROM chunkq.chunk_error_history(%s)", (chunk_id,)
    ).fetchall()
    assert history == [(1, "w1", "HTTP 500", False, False)]
    assert [c for c in conn.execute("SELECT id FROM chunkq.failed_chunks(%s)", (job_id,))] == [(chunk_id,)]


def test_fail_with_retry_backs_off_until_retries_run_out(conn):
    conn.execute("UPDATE chunkq.settings SET retry_base_delay = '10 s', retry_max_delay = '25 s'")
    new_job(conn, 500, max_retries=3)
    waits = []
    for expected_retry in (1, 2, 3):
        ((chunk_id, attempt),) = claim(conn)
        row = conn.execute(
            "SELECT chunk_status::text, retry_count, available_at - now()"
            " FROM chunkq.fail_chunk(%s, %s, 'flaky', true)",
            (chunk_id, attempt),
        ).fetchone()
        assert row[:2] == ("pending", expected_retry)
        waits.append(row[2].total_seconds())
        conn.execute("UPDATE chunkq.job_chunks SET available_at = now()")
    # 10 s doubled per retry, capped at 25 s, plus up to 10 s of jitter.
    assert 10 <= waits[0] <= 20 and 20 <= waits[1] <= 30 and 25 <= waits[2] <= 35
    ((chunk_id, attempt),) = claim(conn)
    row = conn.execute(
        "SELECT chunk_status::text, retry_count, attempt FROM chunkq.fail_chunk(%s, %s, 'flaky', true)",
        (chunk_id, attempt),
    ).fetchone()
    assert row == ("failed", 3, 4)
    history = conn.execute("SELECT attempt, retried FROM chunkq.chunk_error_history(%s)", (chunk_id,)).fetchall()
    assert history == [(1, True), (2, True), (3, True), (4, False)]
    assert_counters_consistent(conn)


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


@pytest.mark.parametrize(
    ("error", "stored"),
    [
        ("", "(no error message)"),
        (None, "(no error message)"),
        ("naïve – 日本語 – emoji 🕷️ \t tab\nnewline ' quote \" dq \\ backslash", None),
    ],
)
def test_error_messages_of_any_characters(conn, error, stored):
    new_job(conn, 500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, %s)", (chunk_id, attempt, error))
    assert conn.execute("SELECT error_message FROM chunkq.job_chunks").fetchone()[0] == (stored or error)


def test_huge_error_messages_are_cut_with_a_note(conn):
    new_job(conn, 500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, %s)", (chunk_id, attempt, "x" * 5_000_000))
    stored = conn.execute("SELECT error FROM chunkq.chunk_errors").fetchone()[0]
    assert stored.startswith("x" * 10_000)
    assert stored.endswith("[... 4990000 more characters cut]")
    assert len(stored) < 10_100


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


def test_retry_puts_a_failed_chunk_back(conn):
    job_id = new_job(conn, 500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (chunk_id, attempt))
    assert job_status(conn, job_id) == "failed"
    row = conn.execute(
        "SELECT status::text, retry_count, finished_at, available_at <= now() FROM chunkq.retry_chunk(%s)", (chunk_id,)
    ).fetchone()
    assert row == ("pending", 1, None, True)
    assert job_status(conn, job_id) == "running"  # the finished job reopened
    assert conn.execute("SELECT finished_at FROM chunkq.crawl_jobs").fetchone() == (None,)
    assert claim(conn) == [(chunk_id, 2)]
    assert_counters_consistent(conn)


@pytest.mark.parametrize("state", ["pending", "processing", "completed"])
def test_retry_refuses_chunks_that_are_not_failed(conn, state):
    new_job(conn, 500)
    chunk_id = conn.execute("SELECT id FROM chunkq.job_chunks").fetchone()[0]
    if state != "pending":
        ((_, attempt),) = claim(conn)
        if state == "completed":
            conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.retry_chunk(%s)", (chunk_id,))
    assert caught.value.sqlstate == "CQ004"
    assert snapshot(conn) == before


def test_retry_refused_in_a_cancelled_job(conn):
    job_id = new_job(conn, 1000)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (chunk_id, attempt))
    conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.retry_chunk(%s)", (chunk_id,))
    assert caught.value.sqlstate == "CQ004"
    assert snapshot(conn) == before


def test_retry_of_unknown_chunk(conn):
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.retry_chunk(5555)")
    assert caught.value.sqlstate == "CQ003"


def test_retry_notifies(conn, dsn):
    new_job(conn, 500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (chunk_id, attempt))
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN chunkq_claimable")
        conn.execute("SELECT chunkq.retry_chunk(%s)", (chunk_id,))
        assert next(listener.notifies(timeout=5)).channel == "chunkq_claimable"


def test_completes_held_chunks_and_claims_the_next_in_one_call(conn):
    job_id = new_job(conn, 500 * 5)
    held = claim(conn, "w", limit=2)
    rows = conn.execute(FAST, ([i for i, _ in held], [a for _, a in held], "w", 2)).fetchall()
    assert [(status, worker) for _, _, status, worker in rows] == [("processing", "w")] * 2
    assert {i for i, *_ in rows}.isdisjoint({i for i, _ in held})
    done = conn.execute("SELECT id FROM chunkq.job_chunks WHERE status = 'completed' ORDER BY id").fetchall()
    assert done == sorted((i,) for i, _ in held)
    assert statuses(conn, job_id) == {"completed": 2, "processing": 2, "pending": 1}
    assert_counters_consistent(conn)


def test_complete_and_claim_with_limit_zero_only_completes_and_the_last_completion_finishes_the_job(conn, dsn):
    job_id = new_job(conn, 500 * 3)
    held = claim(conn, "w", limit=3)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN chunkq_job_finished")
        rows = conn.execute(FAST, ([i for i, _ in held], [a for _, a in held], "w", 0)).fetchall()
        finished = json.loads(next(listener.notifies(timeout=5)).payload)
    assert rows == []
    assert finished == {"job_id": job_id, "status": "completed"}
    assert job_status(conn, job_id) == "completed"
    assert_counters_consistent(conn)


@pytest.mark.parametrize(
    ("trouble", "sqlstate"),
    [
        ("lease lost", "CQ006"),
        ("already completed", "CQ004"),
        ("cancelled", "CQ007"),
        ("unknown", "CQ003"),
    ],
)
def test_one_chunk_not_held_refuses_the_whole_complete_and_claim(conn, trouble, sqlstate):
    job_id = new_job(conn, 500 * 4)
    held = claim(conn, "w", limit=2)
    (good, good_attempt), (bad, bad_attempt) = held
    if trouble == "lease lost":
        conn.execute("UPDATE chunkq.job_chunks SET lease_expires_at = now() - interval '1 s' WHERE id = %s", (bad,))
        conn.execute("SELECT chunkq.reclaim_expired_chunks()")
    elif trouble == "already completed":
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (bad, bad_attempt))
    elif trouble == "cancelled":
        conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    else:
        bad = 424242
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(FAST, ([good, bad], [good_attempt, bad_attempt], "w", 2))
    assert caught.value.sqlstate == sqlstate
    assert snapshot(conn) == before  # neither completed nor claimed anything


@pytest.mark.parametrize(
    ("ids", "attempts", "limit", "message"),
    [
        ([1, 2], [1], 1, "same length"),
        (None, [], 1, "same length"),
        ([1], [None], 1, "attempt its claim returned"),
        ([1, 1], [1, 1], 1, "listed twice"),
        ([], [], -1, "between 0 and 1000"),
        ([], [], 1001, "between 0 and 1000"),
        ([], [], None, "between 0 and 1000"),
    ],
)
def test_bad_input_to_complete_and_claim_is_refused_and_changes_nothing(conn, ids, attempts, limit, message):
    new_job(conn, 500 * 2)
    held = claim(conn, "w")
    if ids == [1, 1]:
        ids, attempts = [held[0][0]] * 2, [held[0][1]] * 2
    before = snapshot(conn)
    with pytest.raises(psycopg.Error, match=message) as caught:
        conn.execute(FAST, (ids, attempts, "w", limit))
    assert caught.value.sqlstate == "CQ001"
    assert snapshot(conn) == before
