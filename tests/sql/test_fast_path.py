"""complete_and_claim (0006): the worker's fast path, one call and one commit per batch."""

from __future__ import annotations

import json
import multiprocessing

import psycopg
import pytest

from tests.helpers.db import assert_counters_consistent, claim, job_status, new_job, snapshot, statuses
from tests.helpers.procs import drain_with_complete_and_claim

spawn = multiprocessing.get_context("spawn")
FAST = "SELECT id, attempt, status::text, worker_id FROM chunkq.complete_and_claim(%s, %s, %s, %s)"


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


def test_limit_zero_only_completes_and_the_last_completion_finishes_the_job(conn, dsn):
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


def test_nothing_to_complete_is_a_plain_claim(conn):
    new_job(conn, 500 * 2)
    rows = conn.execute(FAST, ([], [], "w", 5)).fetchall()
    assert len(rows) == 2 and all(status == "processing" for _, _, status, _ in rows)


def test_claims_only_from_the_named_job(conn):
    new_job(conn, 500 * 2)
    wanted = new_job(conn, 500 * 2)
    rows = conn.execute("SELECT job_id FROM chunkq.complete_and_claim('{}', '{}', 'w', 5, %s)", (wanted,)).fetchall()
    assert rows == [(wanted,), (wanted,)]


@pytest.mark.parametrize(
    ("trouble", "sqlstate"),
    [
        ("lease lost", "CQ006"),
        ("already completed", "CQ004"),
        ("cancelled", "CQ007"),
        ("unknown", "CQ003"),
    ],
)
def test_one_chunk_not_held_refuses_the_whole_call(conn, trouble, sqlstate):
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
def test_bad_input_is_refused_and_changes_nothing(conn, ids, attempts, limit, message):
    new_job(conn, 500 * 2)
    held = claim(conn, "w")
    if ids == [1, 1]:
        ids, attempts = [held[0][0]] * 2, [held[0][1]] * 2
    before = snapshot(conn)
    with pytest.raises(psycopg.Error, match=message) as caught:
        conn.execute(FAST, (ids, attempts, "w", limit))
    assert caught.value.sqlstate == "CQ001"
    assert snapshot(conn) == before


def test_four_processes_draining_with_the_fast_path_handle_every_chunk_once(dsn, conn):
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
