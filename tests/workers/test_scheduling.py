"""The scheduler through a real pool: a job's cap holds across many worker processes; RetryAfter defers."""

from __future__ import annotations

import psycopg
import pytest

from tests.helpers.db import assert_counters_consistent
from tests.helpers.pool import progress, wait_until
from tests.sql.test_scheduling import job, overlap


@pytest.mark.slow
def test_a_capped_job_never_runs_more_chunks_than_its_cap_in_a_pool_of_eight(dsn, conn, start_pool, tmp_path):
    marks = tmp_path / "marks"
    capped = job(conn, 60, max_running=3)
    free = job(conn, 60)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:record_overlap",
        "--processes",
        "8",
        "--poll",
        "0.2",
        env={"CHUNKQ_TEST_SLEEP": "0.05", "CHUNKQ_TEST_MARK": str(marks)},
    )
    wait_until(lambda: progress(dsn) == {"completed": 120}, 120, "both jobs to complete")
    assert pool.stop() == 0
    runs: dict[int, list[tuple[float, float]]] = {capped: [], free: []}
    for line in marks.read_text().splitlines():
        job_id, start, end = line.split()
        runs[int(job_id)].append((float(start), float(end)))
    assert overlap(runs[capped]) == 3
    assert overlap(runs[free]) > 3
    assert_counters_consistent(conn)


def test_retry_after_defers_a_chunk_without_spending_a_retry(dsn, conn, start_pool):
    j = job(conn, 3, max_retries=0)
    pool = start_pool("--handler", "tests.helpers.handlers:throttled_first", "--processes", "1", "--poll", "0.2")
    wait_until(lambda: progress(dsn, j) == {"completed": 3}, 30, "the chunks to complete on their second attempt")
    assert pool.stop() == 0
    deferred = [o for o in pool.outcomes() if o["outcome"] == "deferred"]
    assert len(deferred) == 3 and all("HTTP 429 from images.example.com" in o["error"] for o in deferred)
    rows = conn.execute(
        "SELECT c.retry_count, c.attempt, e.deferred, e.error FROM chunkq.job_chunks c"
        " JOIN chunkq.chunk_errors e ON e.chunk_id = c.id WHERE c.job_id = %s",
        (j,),
    ).fetchall()
    assert {(r[0], r[1], r[2]) for r in rows} == {(0, 2, True)}
    assert rows[0][3] == "retry after 00:00:00.3: HTTP 429 from images.example.com"
    with psycopg.connect(dsn) as check:
        assert check.execute("SELECT status::text FROM chunkq.crawl_jobs WHERE id = %s", (j,)).fetchone() == (
            "completed",
        )
