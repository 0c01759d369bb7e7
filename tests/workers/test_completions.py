"""How the pool reports completions: together with its next claim (complete_and_claim), never held back long."""

from __future__ import annotations

from collections import Counter

import psycopg

from tests.helpers.db import assert_counters_consistent, new_job, statuses
from tests.helpers.pool import progress, wait_until

NOOP = ("--handler", "chunkq.workers.sample:noop")


def function_calls(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute(
        "SELECT funcname, calls FROM pg_stat_user_functions WHERE schemaname = 'chunkq'"
        " AND funcname IN ('complete_chunk', 'complete_and_claim', 'claim_chunks')"
    ).fetchall()
    return dict(rows)


def test_a_batched_pool_reports_completions_together_with_its_next_claim(dsn, conn, start_pool):
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET track_functions = 'all'")  # for the pool's sessions
    new_job(conn, 500 * 400)
    pool = start_pool(*NOOP, "--processes", "2", "--batch", "10")
    wait_until(lambda: progress(dsn).get("completed") == 400, 120, "400 completed chunks")
    assert pool.stop() == 0  # its sessions end, and flush their statistics

    calls = wait_until(
        lambda: function_calls(conn).get("complete_and_claim", 0) >= 40 and function_calls(conn),
        10,
        "the pool's function statistics",
    )
    assert "complete_chunk" not in calls  # no completion went alone
    assert calls["complete_and_claim"] < 400 / 10 * 1.5  # about one call per batch of ten, not per chunk
    assert Counter(o["outcome"] for o in pool.outcomes()) == {"completed": 400}
    assert conn.execute("SELECT max(attempt) FROM chunkq.job_chunks").fetchone() == (1,)
    assert_counters_consistent(conn)


def test_slow_chunks_are_reported_as_each_one_finishes_not_at_the_end_of_the_batch(dsn, conn, start_pool):
    job_id = new_job(conn, 500 * 3)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:sleepy",
        "--processes",
        "1",
        "--batch",
        "3",
        env={"CHUNKQ_TEST_SLEEP": "1.5"},
    )
    # While the second chunk runs, the first is already completed in the database.
    wait_until(
        lambda: statuses(conn, job_id) == {"completed": 1, "processing": 2},
        30,
        "the first chunk recorded while the batch goes on",
    )
    wait_until(lambda: statuses(conn, job_id) == {"completed": 2, "processing": 1}, 30, "the second one too")
    wait_until(lambda: statuses(conn, job_id) == {"completed": 3}, 30, "all three")
    assert pool.stop() == 0
    assert_counters_consistent(conn)


def test_stopping_reports_what_is_done_and_hands_back_the_rest(dsn, conn, start_pool):
    job_id = new_job(conn, 500 * 4)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:sleepy",
        "--processes",
        "1",
        "--batch",
        "4",
        env={"CHUNKQ_TEST_SLEEP": "0.4"},
    )
    wait_until(lambda: statuses(conn, job_id).get("processing") == 4, 30, "a batch of four claimed")
    pool.signal(15)
    assert pool.wait(30) == 0
    after = statuses(conn, job_id)
    assert after.get("processing", 0) == 0 and after.get("completed", 0) >= 1
    assert after.get("completed", 0) + after.get("pending", 0) == 4
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)  # no retry spent
    assert_counters_consistent(conn)
