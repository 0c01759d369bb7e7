"""SQL API: a job's own options — an id of the application's, its retry back-off — and what progress says of retries."""

from __future__ import annotations

import psycopg
import pytest

from tests.helpers.db import claim, new_job, snapshot


def create(conn: psycopg.Connection, **options: object) -> tuple:
    return conn.execute(
        "SELECT id, retry_base_delay FROM chunkq.create_job(1, 'app job', '[]', 1500,"
        " p_id => %(id)s, p_retry_base_delay => %(delay)s::interval)",
        {"id": options.get("id"), "delay": options.get("delay")},
    ).fetchone()


def test_a_job_takes_the_application_s_id_and_later_ids_skip_past_it(conn):
    assert create(conn, id=500) == (500, None)
    conn.execute("SELECT chunkq.create_chunks(500)")
    generated = new_job(conn, 500, chunk=False)
    assert generated == 501
    assert create(conn, id=42)[0] == 42  # below the sequence: fine, and the sequence stays ahead
    assert new_job(conn, 500, chunk=False) == 502


@pytest.mark.parametrize(("job_id", "message"), [(500, "exists already"), (0, "must be positive"), (-3, "positive")])
def test_a_taken_or_bad_id_is_refused_and_changes_nothing(conn, job_id, message):
    create(conn, id=500)
    before = snapshot(conn)
    with pytest.raises(psycopg.Error, match=message) as caught:
        create(conn, id=job_id)
    assert caught.value.sqlstate == "CQ001"
    assert snapshot(conn) == before


def test_a_job_s_own_retry_back_off(conn):
    job_id = create(conn, delay="200 ms")[0]
    conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    ((chunk_id, attempt),) = claim(conn, job_id=job_id)
    wait = conn.execute(
        "SELECT available_at - now() FROM chunkq.fail_chunk(%s, %s, 'flaky', true)", (chunk_id, attempt)
    ).fetchone()[0]
    assert 0.2 <= wait.total_seconds() <= 0.4  # 200 ms, plus up to one base delay of jitter
    with pytest.raises(psycopg.Error) as caught:
        create(conn, delay="-1 s")
    assert caught.value.sqlstate == "CQ001"


def test_progress_counts_the_chunks_waiting_out_a_retry(conn):
    job_id = create(conn, delay="1 hour")[0]
    conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    (a, att_a), (b, att_b) = claim(conn, job_id=job_id, limit=2)
    assert conn.execute("SELECT retrying_chunks, next_retry_at FROM chunkq.job_progress(%s)", (job_id,)).fetchone() == (
        0,
        None,
    )
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'HTTP 503', true)", (a, att_a))
    retrying, next_at, due = conn.execute(
        "SELECT retrying_chunks, next_retry_at, next_retry_at - now() FROM chunkq.job_progress(%s)", (job_id,)
    ).fetchone()
    assert retrying == 1 and 3600 <= due.total_seconds() <= 7200
    conn.execute("UPDATE chunkq.job_chunks SET available_at = now() WHERE id = %s", (a,))  # the wait is over
    assert conn.execute("SELECT retrying_chunks FROM chunkq.job_progress(%s)", (job_id,)).fetchone() == (0,)
    conn.execute("SELECT chunkq.pause_job(%s)", (job_id,))  # paused: waiting for a resume, not for a retry
    assert conn.execute("SELECT retrying_chunks FROM chunkq.job_progress(%s)", (job_id,)).fetchone() == (0,)
