"""0012's functions for the dashboard, called directly: job search and paging, one job's overview and failure
kinds, every reason job_blockers gives, metrics_snapshot's bounds."""

from __future__ import annotations

import psycopg
import pytest

from tests.helpers.db import claim, new_job


def named(conn: psycopg.Connection, name: str, chunks: int = 2, **kwargs: object) -> int:
    job_id = new_job(conn, 500 * chunks, **kwargs)
    conn.execute("UPDATE chunkq.crawl_jobs SET name = %s WHERE id = %s", (name, job_id))
    return job_id


def reasons(conn: psycopg.Connection, job_id: int) -> list[str]:
    return [row[0] for row in conn.execute("SELECT reason FROM chunkq.job_blockers(%s)", (job_id,))]


def test_search_pages_filters_and_counts(conn):
    ids = [named(conn, name) for name in ("Cats 100%", "cats_dogs", "birds", "CATS", "catsXdogs")]
    search = "SELECT id FROM chunkq.search_jobs(%s, %s, %s, %s)"
    assert [r[0] for r in conn.execute(search, (None, "cats", 2, 0))] == [ids[4], ids[3]]
    assert [r[0] for r in conn.execute(search, (None, "cats", 2, 2))] == [ids[1], ids[0]]
    assert conn.execute("SELECT chunkq.count_jobs(NULL, 'cats')").fetchone() == (4,)
    # % and _ are looked for as written, not as LIKE wildcards.
    assert [r[0] for r in conn.execute(search, (None, "100%", 50, 0))] == [ids[0]]
    assert [r[0] for r in conn.execute(search, (None, "s_d", 50, 0))] == [ids[1]]
    claim(conn, job_id=ids[2])
    assert [r[0] for r in conn.execute(search, ("running", None, 50, 0))] == [ids[2]]
    assert conn.execute("SELECT chunkq.count_jobs('running', 'bird')").fetchone() == (1,)
    assert conn.execute("SELECT chunkq.count_jobs('pending', 'bird')").fetchone() == (0,)
    for limit, offset in ((0, 0), (1001, 0), (10, -1), (None, 0)):
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(search, (None, None, limit, offset))
        assert caught.value.sqlstate == "CQ001"
    overview = conn.execute("SELECT id, total_chunks FROM chunkq.get_job_overview(%s)", (ids[2],)).fetchall()
    assert overview == [(ids[2], 2)]
    assert conn.execute("SELECT count(*) FROM chunkq.get_job_overview(999)").fetchone() == (0,)


def test_failure_summary_of_one_job(conn):
    mine, other = new_job(conn, 500 * 3), new_job(conn, 500 * 3)
    for job_id, error in ((mine, "HTTP 503 on image 17"), (mine, "HTTP 503 on image 912"), (other, "DNS failure")):
        ((chunk_id, attempt),) = claim(conn, job_id=job_id)
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, %s)", (chunk_id, attempt, error))
    rows = conn.execute(
        "SELECT error_kind, occurrences, chunks, jobs, ended_failed, example_error FROM chunkq.job_failure_summary(%s)",
        (mine,),
    ).fetchall()
    assert rows == [("HTTP # on image #", 2, 2, 1, 2, "HTTP 503 on image 912")]
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT * FROM chunkq.job_failure_summary(999)")
    assert caught.value.sqlstate == "CQ002"


def test_every_reason_a_job_is_not_moving(conn):
    unchunked = new_job(conn, 1000, chunk=False)
    assert reasons(conn, unchunked) == ["not_chunked"]

    idle = new_job(conn, 500 * 2)
    assert reasons(conn, idle) == ["no_workers"]  # nothing connected under "chunkq worker ..."
    with psycopg.connect(conn.info.dsn, application_name="chunkq worker test:1"):
        assert reasons(conn, idle) == []

        conn.execute("SELECT chunkq.pause_job(%s)", (idle,))
        assert reasons(conn, idle) == ["paused"]
        conn.execute("SELECT chunkq.resume_job(%s)", (idle,))

        urgent = new_job(conn, 500 * 2, priority=9)
        assert reasons(conn, idle) == ["behind_higher_priority"]
        assert reasons(conn, urgent) == []
        conn.execute("SELECT chunkq.cancel_job(%s)", (urgent,))

        conn.execute("UPDATE chunkq.settings SET retry_base_delay = '1 hour', retry_max_delay = '2 hours'")
        for chunk_id, attempt in claim(conn, limit=2, job_id=idle):
            conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'flaky', true)", (chunk_id, attempt))
        assert reasons(conn, idle) == ["waiting_for_retry"]

        assert reasons(conn, urgent) == ["finished"]
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT * FROM chunkq.job_blockers(999)")
    assert caught.value.sqlstate == "CQ002"


def test_the_schedulers_reasons(conn):
    """0010's limits and failure budget hold a job back too; each is one more row."""
    with psycopg.connect(conn.info.dsn, application_name="chunkq worker test:1"):
        capped = new_job(conn, 500 * 4)
        conn.execute("SELECT chunkq.set_job_limits(%s, '{\"max_running\": 1}')", (capped,))
        assert len(claim(conn, limit=3, job_id=capped)) == 1
        assert reasons(conn, capped) == ["capped"]

        keyed = new_job(conn, 500 * 3)
        conn.execute("SELECT chunkq.set_rate_limit('images.example.com', p_max_running => 1)")
        conn.execute('SELECT chunkq.set_job_limits(%s, \'{"rate_key": "images.example.com"}\')', (keyed,))
        claim(conn, job_id=keyed)
        assert "rate_limited" in reasons(conn, keyed)
        detail = conn.execute(
            "SELECT detail FROM chunkq.job_blockers(%s) WHERE reason = 'rate_limited'", (keyed,)
        ).fetchone()[0]
        assert "images.example.com" in detail and "capped" in detail

        budget = new_job(conn, 500 * 4)
        conn.execute("SELECT chunkq.set_job_limits(%s, '{\"max_failed_chunks\": 1}')", (budget,))
        for chunk_id, attempt in claim(conn, limit=2, job_id=budget):  # two failed: more than max_failed_chunks
            conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'HTTP 404')", (chunk_id, attempt))
        assert reasons(conn, budget) == ["paused"]
        detail = conn.execute("SELECT detail FROM chunkq.job_blockers(%s)", (budget,)).fetchone()[0]
        assert "by an operator" not in detail and "failed" in detail


def test_metrics_snapshot_bounds_its_series(conn):
    for _ in range(5):
        new_job(conn, 500)
    jobs = {
        row[0]
        for row in conn.execute(
            "SELECT DISTINCT labels->>'job' FROM chunkq.metrics_snapshot(3) WHERE metric = 'chunkq_job_chunks'"
        )
    }
    assert len(jobs) == 4 and "other" in jobs
    assert conn.execute(
        "SELECT count(*) FROM chunkq.metrics_snapshot(0) WHERE metric LIKE 'chunkq_job\\_%'"
        " AND labels->>'job' <> 'other'"
    ).fetchone() == (0,)
    for bad in (-1, 1001, None):
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT * FROM chunkq.metrics_snapshot(%s)", (bad,))
        assert caught.value.sqlstate == "CQ001"


def test_a_deferral_is_no_error_in_the_metrics(conn):
    job_id = new_job(conn, 500 * 3)
    first, second = conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('w', 2, %s)", (job_id,)
    ).fetchall()
    conn.execute("SELECT chunkq.defer_chunk(%s, %s, '1 minute', 'HTTP 429', p_lease_token => %s)", first)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'HTTP 500', true, p_lease_token => %s)", second)
    gauges = dict(
        conn.execute(
            "SELECT metric, value FROM chunkq.metrics_snapshot(0) WHERE metric IN ('chunkq_chunk_errors_last_hour',"
            " 'chunkq_chunk_errors_per_second', 'chunkq_chunk_deferrals_per_second')"
        ).fetchall()
    )
    assert gauges == {
        "chunkq_chunk_errors_last_hour": 1,
        "chunkq_chunk_errors_per_second": 1 / 60,
        "chunkq_chunk_deferrals_per_second": 1 / 60,
    }
