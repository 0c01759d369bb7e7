"""job_chunks.job_id -> crawl_jobs.id (0006): triggers that check once per statement, with a foreign key's rules."""

from __future__ import annotations

import threading

import psycopg
import pytest

from tests.helpers.db import new_job, snapshot

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
