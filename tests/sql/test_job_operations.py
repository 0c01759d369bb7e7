"""SQL API: job operations — create, chunk, read, cancel, pause/resume, priority, delete, prune; the job reference."""

from __future__ import annotations

import json
import threading

import psycopg
import pytest

from tests.helpers.db import assert_counters_consistent, claim, new_job, snapshot, statuses


def test_create_job_takes_defaults_from_settings(conn):
    row = conn.execute(
        "SELECT chunk_size, priority, max_retries, status::text, total_chunks, keywords"
        " FROM chunkq.create_job(7, 'cats', '{\"keywords\": [\"cat\"]}', 1500)"
    ).fetchone()
    assert row == (500, 5, 3, "pending", 0, {"keywords": ["cat"]})


def test_settings_change_the_defaults_without_code(conn):
    conn.execute("UPDATE chunkq.settings SET chunk_size = 1000, max_priority = 20, default_priority = 15")
    job_id = new_job(conn, 2500)
    assert conn.execute(
        "SELECT chunk_size, priority, total_chunks FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)
    ).fetchone() == (1000, 15, 3)
    conn.execute("SELECT chunkq.create_job(1, 'high', '[]', 10, 20)")  # 20 is now in range


def test_settings_reject_a_bad_value(conn):
    with pytest.raises(psycopg.errors.CheckViolation, match="settings_priority_range_valid"):
        conn.execute("UPDATE chunkq.settings SET min_priority = 11")


def test_chunks_are_inclusive_ranges_of_chunk_size(conn):
    job_id = new_job(conn, 1500)
    rows = conn.execute(
        "SELECT chunk_index, image_start, image_end, status::text, priority FROM chunkq.list_chunks(%s)", (job_id,)
    ).fetchall()
    assert rows == [(0, 0, 499, "pending", 5), (1, 500, 999, "pending", 5), (2, 1000, 1499, "pending", 5)]


def test_last_chunk_is_shorter(conn):
    job_id = new_job(conn, 1201)
    ranges = conn.execute("SELECT image_start, image_end FROM chunkq.list_chunks(%s)", (job_id,)).fetchall()
    assert ranges == [(0, 499), (500, 999), (1000, 1200)]


def test_create_chunks_with_explicit_size_and_priority(conn):
    job_id = new_job(conn, 1000, chunk=False)
    job = conn.execute(
        "SELECT chunk_size, priority, total_chunks, open_slots FROM chunkq.create_chunks(%s, 1000, 9, 100)", (job_id,)
    ).fetchone()
    assert job == (100, 9, 10, 10)
    assert conn.execute("SELECT DISTINCT priority FROM chunkq.job_chunks").fetchall() == [(9,)]


def test_create_chunks_notifies_listeners(conn, dsn):
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN chunkq_claimable")
        job_id = new_job(conn, 1500)
        notice = next(listener.notifies(timeout=5))
    assert notice.channel == "chunkq_claimable"
    assert json.loads(notice.payload) == {"job_id": job_id, "chunks": 3}


@pytest.mark.parametrize(
    ("call", "sqlstate"),
    [
        ("SELECT chunkq.create_job(1, 'x', '[]', 0)", "CQ001"),
        ("SELECT chunkq.create_job(1, 'x', '[]', -5)", "CQ001"),
        ("SELECT chunkq.create_job(1, 'x', '[]', 500000001)", "CQ001"),  # > 1,000,000 chunks of 500
        ("SELECT chunkq.create_job(1, '   ', '[]', 10)", "CQ001"),
        ("SELECT chunkq.create_job(1, NULL, '[]', 10)", "CQ001"),
        ("SELECT chunkq.create_job(NULL, 'x', '[]', 10)", "CQ001"),
        ("SELECT chunkq.create_job(1, 'x', '[]', 10, 11)", "CQ001"),
        ("SELECT chunkq.create_job(1, 'x', '[]', 10, -1)", "CQ001"),
        ("SELECT chunkq.create_job(1, 'x', '[]', 10, NULL, -1)", "CQ001"),
        ("SELECT chunkq.create_job(1, 'x', '[]', 10, NULL, NULL, 0)", "CQ001"),
        ("SELECT chunkq.create_job(1, 'x', '[]', 10, NULL, NULL, 1000001)", "CQ001"),
    ],
)
def test_create_job_rejects_bad_input_and_changes_nothing(conn, call, sqlstate):
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(call)
    assert caught.value.sqlstate == sqlstate
    assert snapshot(conn) == before


@pytest.mark.parametrize(
    ("args", "sqlstate"),
    [
        ("%(job)s, 2000", "CQ001"),  # max_images differs from the job's
        ("%(job)s, NULL, 11", "CQ001"),  # priority out of range
        ("%(job)s, NULL, NULL, 0", "CQ001"),  # chunk size
        ("%(job)s, NULL, NULL, 1", "CQ001"),  # 1500 chunks of 1 image: over the cap of 1000 set below
        ("999999", "CQ002"),  # no such job
    ],
)
def test_create_chunks_rejects_bad_input_and_changes_nothing(conn, args, sqlstate):
    conn.execute("UPDATE chunkq.settings SET max_chunks_per_job = 1000")
    job_id = new_job(conn, 1500, chunk=False)
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(f"SELECT chunkq.create_chunks({args})", {"job": job_id})
    assert caught.value.sqlstate == sqlstate
    assert snapshot(conn) == before


def test_chunking_twice_is_refused_and_duplicates_nothing(conn):
    job_id = new_job(conn, 1500)
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    assert caught.value.sqlstate == "CQ005"
    assert snapshot(conn) == before
    assert conn.execute("SELECT count(*) FROM chunkq.job_chunks").fetchone() == (3,)


def test_concurrent_chunking_of_one_job_creates_one_set(dsn):
    with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
        job_id = new_job(first, 1500, chunk=False)
        first.commit()
        first.execute("SELECT chunkq.create_chunks(%s)", (job_id,))  # holds the job lock, uncommitted
        second_result: list[BaseException] = []

        def chunk_again() -> None:
            try:
                second.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
            except psycopg.Error as exc:
                second_result.append(exc)

        thread = threading.Thread(target=chunk_again)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the second create_chunks should wait for the first"
        first.commit()
        thread.join(10)
        assert second_result and second_result[0].sqlstate == "CQ005"
        assert first.execute("SELECT count(*) FROM chunkq.job_chunks").fetchone() == (3,)


def test_get_job_and_get_chunk_return_no_row_for_unknown_ids(conn):
    assert conn.execute("SELECT * FROM chunkq.get_job(42)").fetchall() == []
    assert conn.execute("SELECT * FROM chunkq.get_chunk(42)").fetchall() == []


@pytest.mark.parametrize("function", ["list_chunks", "failed_chunks", "job_progress", "cancel_job"])
def test_job_functions_reject_unknown_job(conn, function):
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(f"SELECT * FROM chunkq.{function}(424242)")
    assert caught.value.sqlstate == "CQ002"


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


def test_list_chunks_filters_by_status(conn):
    job_id = new_job(conn, 1500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    ids = conn.execute("SELECT id FROM chunkq.list_chunks(%s, 'pending')", (job_id,)).fetchall()
    assert len(ids) == 2 and (chunk_id,) not in ids


def test_cancel_job_cancels_open_chunks_and_keeps_finished_ones(conn):
    job_id = new_job(conn, 2000)
    (a, att_a), (b, att_b) = claim(conn, limit=2)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (a, att_a))
    job = conn.execute("SELECT status::text, finished_at IS NOT NULL FROM chunkq.cancel_job(%s)", (job_id,)).fetchone()
    assert job == ("cancelled", True)
    assert statuses(conn, job_id) == {"completed": 1, "cancelled": 3}
    # The worker holding b learns at its next report.
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.heartbeat_chunk(%s, %s)", (b, att_b))
    assert caught.value.sqlstate == "CQ007"
    assert claim(conn) == []
    assert_counters_consistent(conn)


def test_cancel_is_idempotent_and_refused_for_finished_jobs(conn):
    job_id = new_job(conn, 500)
    conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    before = snapshot(conn)
    conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    assert snapshot(conn) == before

    done = new_job(conn, 500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.cancel_job(%s)", (done,))
    assert caught.value.sqlstate == "CQ004"
    assert snapshot(conn) == before


def test_cancel_an_unchunked_job(conn):
    job_id = new_job(conn, 500, chunk=False)
    assert conn.execute("SELECT status::text FROM chunkq.cancel_job(%s)", (job_id,)).fetchone() == ("cancelled",)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    assert caught.value.sqlstate == "CQ004"


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


def test_deleting_a_job_deletes_its_chunks_counters_and_errors(conn):
    job_id = new_job(conn, 1500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (chunk_id, attempt))
    conn.execute("DELETE FROM chunkq.crawl_jobs WHERE id = %s", (job_id,))
    for table in ("job_chunks", "job_chunk_counts", "chunk_errors"):
        assert conn.execute(f"SELECT count(*) FROM chunkq.{table}").fetchone() == (0,), table


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


# The job reference, job_chunks.job_id -> crawl_jobs.id: triggers that check once per statement, with a
# foreign key's rules.
INSERT_CHUNK = (
    "INSERT INTO chunkq.job_chunks (job_id, chunk_index, image_start, image_end, priority) VALUES (%s, %s, 0, 499, 5)"
)


def chunks_of(conn: psycopg.Connection, job_id: int) -> int:
    return conn.execute("SELECT count(*) FROM chunkq.job_chunks WHERE job_id = %s", (job_id,)).fetchone()[0]


def test_a_chunk_of_a_job_that_does_not_exist_is_refused(conn):
    job_id = new_job(conn, 500)
    before = snapshot(conn)
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="crawl job 424242, which does not exist"):
        with conn.transaction():  # one statement, one good row and one bad: neither stays
            conn.execute(
                "INSERT INTO chunkq.job_chunks (job_id, chunk_index, image_start, image_end, priority)"
                " VALUES (%s, 7, 0, 499, 5), (424242, 0, 0, 499, 5)",
                (job_id,),
            )
    assert snapshot(conn) == before


def test_chunks_cannot_change_job_and_jobs_cannot_change_id(conn):
    first, second = new_job(conn, 500), new_job(conn, 500)
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="cannot move to another job"):
        conn.execute("UPDATE chunkq.job_chunks SET job_id = %s WHERE job_id = %s", (second, first))
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute("UPDATE chunkq.crawl_jobs SET id = DEFAULT WHERE id = %s", (first,))
    assert chunks_of(conn, first) == chunks_of(conn, second) == 1


def test_deleting_a_job_deletes_its_chunks_and_their_errors(conn):
    doomed, kept = new_job(conn, 500 * 3), new_job(conn, 500 * 2)
    chunk_id, attempt = conn.execute("SELECT id, attempt FROM chunkq.claim_chunks('w', 1, %s)", (doomed,)).fetchone()
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (chunk_id, attempt))
    conn.execute("DELETE FROM chunkq.crawl_jobs WHERE id = %s", (doomed,))  # by hand, as a DBA would
    assert chunks_of(conn, doomed) == 0 and chunks_of(conn, kept) == 2
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)


def test_a_delete_of_the_job_waits_for_an_insert_of_its_chunks_then_takes_them(dsn, conn):
    job_id = new_job(conn, 500, chunk=False)
    deleted = threading.Event()
    with psycopg.connect(dsn) as inserting:
        inserting.execute(INSERT_CHUNK, (job_id, 0))  # transaction left open: the job is locked FOR KEY SHARE

        def delete() -> None:
            with psycopg.connect(dsn, autocommit=True) as deleting:
                deleting.execute("DELETE FROM chunkq.crawl_jobs WHERE id = %s", (job_id,))
            deleted.set()

        deleter = threading.Thread(target=delete)
        deleter.start()
        assert not deleted.wait(1.0), "the delete did not wait for the insert"
        inserting.commit()
        deleter.join(10)
    assert deleted.is_set()
    assert chunks_of(conn, job_id) == 0  # no orphan left behind
