"""Plans and statistics: the claim and the reclaim read indexes, not the table; create_chunks refreshes statistics."""

from __future__ import annotations

import time

import psycopg

from tests.helpers.db import assert_counters_consistent, claim, new_job, statuses

FAST = "SELECT id, attempt FROM chunkq.complete_and_claim(%s, %s, 'w', 1)"


def table_stats(conn: psycopg.Connection) -> tuple[int, int]:
    """(sequential scans, analyzes) of chunkq.job_chunks so far, this session's included."""
    conn.execute("SELECT pg_stat_force_next_flush()")  # counts reach the shared statistics when idle
    time.sleep(0.05)
    return conn.execute(
        "SELECT seq_scan, analyze_count FROM pg_stat_user_tables WHERE relid = 'chunkq.job_chunks'::regclass"
    ).fetchone()


def test_a_worker_that_planned_on_an_empty_table_claims_by_index_once_a_large_job_arrives(conn, dsn):
    conn.execute("VACUUM ANALYZE chunkq.job_chunks")  # the statistics: no rows at all
    with psycopg.connect(dsn, autocommit=True) as worker:
        assert worker.execute(FAST, ([], [])).fetchall() == []  # its plans are made now, on the empty table
        job_id = new_job(conn, 500 * 20_000)
        held = worker.execute(FAST, ([], [])).fetchall()
        scans_before, _ = table_stats(worker)
        for _ in range(50):
            held = worker.execute(FAST, ([i for i, _ in held], [a for _, a in held])).fetchall()
        scans_after, _ = table_stats(worker)
    assert scans_after == scans_before  # 50 completions and claims, none of them read the whole table
    assert statuses(conn, job_id) == {"completed": 50, "processing": 1, "pending": 19_949}
    assert_counters_consistent(conn)


def test_create_chunks_analyzes_the_table_only_for_a_job_large_next_to_it(conn):
    _, analyzed = table_stats(conn)
    new_job(conn, 500 * 2000)  # 2,000 chunks into an empty table: more than autovacuum would let pass
    _, after_large = table_stats(conn)
    new_job(conn, 500 * 40)  # 40 more: not worth it
    _, after_small = table_stats(conn)
    assert (after_large - analyzed, after_small - after_large) == (1, 0)
    (reltuples,) = conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'chunkq.job_chunks'::regclass").fetchone()
    assert reltuples == 2000  # the chunks it was inserting, counted before they were committed


def test_create_chunks_does_not_wait_for_a_vacuum_to_analyze(conn, dsn):
    _, analyzed = table_stats(conn)
    with psycopg.connect(dsn) as vacuum:  # holds the lock VACUUM and ANALYZE take, until it rolls back
        vacuum.execute("LOCK TABLE chunkq.job_chunks IN SHARE UPDATE EXCLUSIVE MODE")
        conn.execute("SET statement_timeout = '10s'")  # waiting for the lock would fail here instead of hanging
        job_id = new_job(conn, 500 * 2000)
    assert statuses(conn, job_id) == {"pending": 2000}
    assert table_stats(conn)[1] == analyzed  # it gave up analyzing and left it to the VACUUM


def test_the_reclaim_does_not_scan_the_table_when_the_statistics_expect_expired_leases(conn):
    job_id = new_job(conn, 500 * 2000)
    for _ in range(2):
        conn.execute("SELECT count(*) FROM chunkq.claim_chunks('w', 1000, NULL, interval '1 millisecond')")
    time.sleep(0.05)
    conn.execute("ANALYZE chunkq.job_chunks")  # the statistics now say: 2,000 leases, all of them past
    while conn.execute("SELECT chunkq.reclaim_expired_chunks(1000)").fetchone() != (0,):
        pass
    assert statuses(conn, job_id) == {"pending": 2000}
    scans_before, _ = table_stats(conn)
    for _ in range(20):
        assert conn.execute("SELECT chunkq.reclaim_expired_chunks()").fetchone() == (0,)
        assert len(claim(conn, "w", limit=1)) == 1
    scans_after, _ = table_stats(conn)
    assert scans_after == scans_before  # "has any lease expired?" read one index entry, not the table
