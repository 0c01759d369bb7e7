"""SQL API: claiming chunks — claim_chunks, claim_chunk and the claim half of complete_and_claim."""

from __future__ import annotations

import multiprocessing

import psycopg
import pytest

from tests.helpers.db import FAST, assert_counters_consistent, claim, job_status, new_job, snapshot, statuses
from tests.helpers.procs import drain_with_complete_and_claim

spawn = multiprocessing.get_context("spawn")


def test_claim_sets_lease_attempt_and_worker(conn):
    job_id = new_job(conn, 1500)
    row = conn.execute(
        "SELECT status::text, attempt, worker_id,"
        " lease_expires_at - now() BETWEEN interval '299 s' AND interval '300 s', claimed_at = now()"
        " FROM chunkq.claim_chunks('host:1')"
    ).fetchone()
    assert row == ("processing", 1, "host:1", True, True)
    assert job_status(conn, job_id) == "running"


def test_claim_with_explicit_lease(conn):
    new_job(conn, 500)
    left = conn.execute(
        "SELECT lease_expires_at - now() FROM chunkq.claim_chunks('w', 1, NULL, interval '7 seconds')"
    ).fetchone()[0]
    assert left.total_seconds() == 7


def test_highest_priority_first_then_oldest(conn):
    low = new_job(conn, 1000, priority=1)
    high = new_job(conn, 1000, priority=9)
    mid = new_job(conn, 1000, priority=5)
    order = conn.execute("SELECT job_id, chunk_index FROM chunkq.claim_chunks('w', 6)").fetchall()
    assert order == [(high, 0), (high, 1), (mid, 0), (mid, 1), (low, 0), (low, 1)]


def test_batch_claim_respects_limit(conn):
    new_job(conn, 500 * 25)
    assert len(claim(conn, limit=10)) == 10
    assert len(claim(conn, limit=10)) == 10
    assert len(claim(conn, limit=10)) == 5
    assert claim(conn, limit=10) == []
    assert_counters_consistent(conn)


def test_claim_limited_to_one_job(conn):
    other = new_job(conn, 1000, priority=10)
    mine = new_job(conn, 1000, priority=0)
    rows = conn.execute("SELECT job_id FROM chunkq.claim_chunks('w', 5, %s)", (mine,)).fetchall()
    assert rows == [(mine,), (mine,)]
    assert claim(conn, job_id=mine) == []
    assert len(claim(conn, limit=5)) == 2  # the other job's chunks were left alone
    assert other


def test_a_claim_across_jobs_skips_a_paused_jobs_chunk_back_in_the_queue(conn):
    paused = new_job(conn, 500 * 3, priority=9)
    other = new_job(conn, 500 * 2, priority=1)
    ((held, attempt),) = claim(conn, job_id=paused)
    conn.execute("SELECT chunkq.pause_job(%s)", (paused,))
    conn.execute("SELECT chunkq.release_chunk(%s, %s)", (held, attempt))  # back to pending, paused or not
    conn.execute("UPDATE chunkq.job_chunks SET available_at = now() WHERE id = %s", (held,))  # in the claim index
    taken = conn.execute("SELECT id, job_id FROM chunkq.claim_chunks('w', 10)").fetchall()
    assert {job for _, job in taken} == {other} and len(taken) == 2
    assert_counters_consistent(conn)


def test_claim_skips_chunks_waiting_out_a_backoff(conn):
    new_job(conn, 500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'flaky', true)", (chunk_id, attempt))
    assert claim(conn) == []  # pending, but not available yet
    conn.execute("UPDATE chunkq.job_chunks SET available_at = now() - interval '1 s'")
    assert claim(conn) == [(chunk_id, 2)]


@pytest.mark.parametrize("limit", [0, -1, 1001, None])
def test_claim_rejects_bad_limit(conn, limit):
    new_job(conn, 500)
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT * FROM chunkq.claim_chunks('w', %s)", (limit,))
    assert caught.value.sqlstate == "CQ001"
    assert snapshot(conn) == before


def test_claim_rejects_non_positive_lease(conn):
    new_job(conn, 500)
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT * FROM chunkq.claim_chunks('w', 1, NULL, interval '0 s')")
    assert caught.value.sqlstate == "CQ001"
    assert snapshot(conn) == before


def test_claim_from_unknown_job_is_an_error_not_an_empty_queue(conn):
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT * FROM chunkq.claim_chunks('w', 1, 4242)")
    assert caught.value.sqlstate == "CQ002"


def test_concurrent_claims_skip_each_others_chunks(dsn):
    with psycopg.connect(dsn, autocommit=True) as setup:
        new_job(setup, 500 * 4)
    with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
        a = claim(first, "first", limit=2)  # transaction left open: rows stay locked
        b = claim(second, "second", limit=2)  # must not wait, must not get first's chunks
        assert len(a) == 2 and len(b) == 2
        assert {i for i, _ in a}.isdisjoint({i for i, _ in b})
        first.commit()
        second.commit()


def test_claim_chunk_by_id(conn):
    new_job(conn, 1500)
    chunk_id = conn.execute("SELECT id FROM chunkq.job_chunks WHERE chunk_index = 2").fetchone()[0]
    row = conn.execute(
        "SELECT id, status::text, attempt, task_id FROM chunkq.claim_chunk(%s, 'w', NULL, 'task-9')", (chunk_id,)
    ).fetchone()
    assert row == (chunk_id, "processing", 1, "task-9")
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:  # a second taker is refused
        conn.execute("SELECT chunkq.claim_chunk(%s, 'other')", (chunk_id,))
    assert caught.value.sqlstate == "CQ004"
    assert "processing" in caught.value.diag.message_primary
    assert snapshot(conn) == before
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.claim_chunk(999999)")
    assert caught.value.sqlstate == "CQ003"


def test_claim_chunk_by_id_waits_for_a_concurrent_claim_then_refuses(dsn):
    with psycopg.connect(dsn, autocommit=True) as setup:
        new_job(setup, 500)
        chunk_id = setup.execute("SELECT id FROM chunkq.job_chunks").fetchone()[0]
    with psycopg.connect(dsn) as first, psycopg.connect(dsn, autocommit=True) as second:
        first.execute("SELECT chunkq.claim_chunk(%s, 'first')", (chunk_id,))
        second.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            second.execute("SELECT chunkq.claim_chunk(%s, 'second')", (chunk_id,))
        first.commit()
        with pytest.raises(psycopg.Error) as caught:
            second.execute("SELECT chunkq.claim_chunk(%s, 'second')", (chunk_id,))
        assert caught.value.sqlstate == "CQ004"


def test_worker_id_defaults_to_the_session(conn):
    new_job(conn, 500)
    worker = conn.execute("SELECT worker_id FROM chunkq.claim_chunks()").fetchone()[0]
    assert worker.startswith(conn.info.user + "@backend-")


@pytest.mark.parametrize("limit", [1, 100])
def test_claimed_chunks_come_back_in_claim_order(conn, limit):
    low = new_job(conn, 500 * 3, priority=1)
    high = new_job(conn, 500 * 3, priority=7)
    rows = conn.execute(
        "SELECT job_id, chunk_index FROM chunkq.complete_and_claim('{}', '{}', 'w', %s)", (limit,)
    ).fetchall()
    expected = [(high, 0), (high, 1), (high, 2), (low, 0), (low, 1), (low, 2)]
    assert rows == expected[:limit]


def test_complete_and_claim_with_nothing_to_complete_is_a_plain_claim(conn):
    new_job(conn, 500 * 2)
    rows = conn.execute(FAST, ([], [], "w", 5)).fetchall()
    assert len(rows) == 2 and all(status == "processing" for _, _, status, _ in rows)


def test_complete_and_claim_claims_only_from_the_named_job(conn):
    new_job(conn, 500 * 2)
    wanted = new_job(conn, 500 * 2)
    rows = conn.execute("SELECT job_id FROM chunkq.complete_and_claim('{}', '{}', 'w', 5, %s)", (wanted,)).fetchall()
    assert rows == [(wanted,), (wanted,)]


def test_four_processes_draining_with_complete_and_claim_handle_every_chunk_once(dsn, conn):
    job_id = new_job(conn, 500 * 2000)
    results = spawn.Queue()
    procs = [
        spawn.Process(target=drain_with_complete_and_claim, args=(dsn, f"w{n}", 1 + 4 * n, results)) for n in range(4)
    ]
    for proc in procs:
        proc.start()
    handed = [pair for _ in procs for pair in results.get(timeout=240)]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert len({chunk for chunk, _ in handed}) == len(handed) == 2000  # no chunk handed out twice
    assert all(attempt == 1 for _, attempt in handed)
    assert statuses(conn, job_id) == {"completed": 2000}
    assert job_status(conn, job_id) == "completed"
    assert_counters_consistent(conn)
