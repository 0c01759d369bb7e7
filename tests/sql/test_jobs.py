"""SQL API: creating jobs and their chunks, reading them, cancelling, progress."""

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


def test_counter_rows_spread_chunks_over_sixteen_slots(conn):
    job_id = new_job(conn, 500 * 40)
    slots = conn.execute(
        "SELECT slot, total, pending FROM chunkq.job_chunk_counts WHERE job_id = %s ORDER BY slot", (job_id,)
    ).fetchall()
    assert [s for s, _, _ in slots] == list(range(16))
    assert [t for _, t, _ in slots] == [3] * 8 + [2] * 8  # 40 chunks: slots 0-7 get indexes s, s+16, s+32
    assert sum(t for _, t, _ in slots) == 40
    assert conn.execute("SELECT open_slots FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)).fetchone() == (16,)
    assert_counters_consistent(conn)


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


def test_list_chunks_filters_by_status(conn):
    job_id = new_job(conn, 1500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    ids = conn.execute("SELECT id FROM chunkq.list_chunks(%s, 'pending')", (job_id,)).fetchall()
    assert len(ids) == 2 and (chunk_id,) not in ids


def test_progress_follows_the_chunks(conn):
    job_id = new_job(conn, 2000)

    def progress():
        return conn.execute(
            "SELECT status::text, total_chunks, pending_chunks, processing_chunks, completed_chunks, failed_chunks,"
            " cancelled_chunks, completion_percentage, is_complete FROM chunkq.job_progress(%s)",
            (job_id,),
        ).fetchone()

    assert progress() == ("pending", 4, 4, 0, 0, 0, 0, 0.0, False)
    (a, att_a), (b, att_b), (c, att_c) = claim(conn, limit=3)
    assert progress() == ("running", 4, 1, 3, 0, 0, 0, 0.0, False)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (a, att_a))
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (b, att_b))
    assert progress() == ("running", 4, 1, 1, 1, 1, 0, 25.0, False)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (c, att_c))
    ((d, att_d),) = claim(conn)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (d, att_d))
    assert progress() == ("failed", 4, 0, 0, 3, 1, 0, 75.0, True)
    assert_counters_consistent(conn)


def test_progress_of_an_unchunked_job_is_not_complete(conn):
    job_id = new_job(conn, 1500, chunk=False)
    row = conn.execute("SELECT total_chunks, is_complete FROM chunkq.job_progress(%s)", (job_id,)).fetchone()
    assert row == (0, False)


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


def test_deleting_a_job_deletes_its_chunks_counters_and_errors(conn):
    job_id = new_job(conn, 1500)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (chunk_id, attempt))
    conn.execute("DELETE FROM chunkq.crawl_jobs WHERE id = %s", (job_id,))
    for table in ("job_chunks", "job_chunk_counts", "chunk_errors"):
        assert conn.execute(f"SELECT count(*) FROM chunkq.{table}").fetchone() == (0,), table
