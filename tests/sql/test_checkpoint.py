"""SQL API: checkpoints inside a chunk (fenced like every report, handed to the next attempt, counted once)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.helpers.db import new_job, snapshot


def claim_one(conn: psycopg.Connection, job_id: int) -> tuple[int, int, object, int, int]:
    return conn.execute(
        "SELECT id, attempt, lease_token, image_start, image_end FROM chunkq.claim_chunks('w', 1, %s)", (job_id,)
    ).fetchone()


def test_a_checkpoint_is_handed_to_the_next_attempt(conn):
    job_id = new_job(conn, 1000, max_retries=3)
    chunk_id, attempt, token, start, end = claim_one(conn, job_id)
    row = conn.execute(
        "SELECT checkpoint_position, checkpoint_state FROM chunkq.checkpoint_chunk(%s, %s, %s, %s, %s)",
        (chunk_id, attempt, start + 479, Jsonb({"cursor": "abc"}), token),
    ).fetchone()
    assert row == (start + 479, {"cursor": "abc"})
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'crashed', true, p_lease_token => %s)", (chunk_id, attempt, token))
    conn.execute("UPDATE chunkq.job_chunks SET available_at = now() WHERE id = %s", (chunk_id,))
    again = conn.execute(
        "SELECT id, attempt, checkpoint_position, checkpoint_state FROM chunkq.claim_chunks('w', 1, %s)", (job_id,)
    ).fetchone()
    assert again == (chunk_id, 2, start + 479, {"cursor": "abc"})


def test_heartbeat_chunks_records_checkpoints_of_the_chunks_it_extends(conn):
    job_id = new_job(conn, 1500)
    a, b = (claim_one(conn, job_id) for _ in range(2))
    rows = conn.execute(
        "SELECT chunk_id, held FROM chunkq.heartbeat_chunks(%s, %s, NULL, %s, %s, %s)",
        ([a[0], b[0]], [a[1], b[1]], [a[2], b[2]], [a[3] + 10, None], [Jsonb([1]), None]),
    ).fetchall()
    assert rows == [(a[0], True), (b[0], True)]
    marks = dict(
        conn.execute("SELECT id, checkpoint_position FROM chunkq.job_chunks WHERE id = ANY(%s)", ([a[0], b[0]],))
    )
    assert marks == {a[0]: a[3] + 10, b[0]: None}


def test_a_stale_worker_s_checkpoint_is_refused(conn):
    job_id = new_job(conn, 500)
    chunk_id, attempt, token, start, _ = claim_one(conn, job_id)
    conn.execute("UPDATE chunkq.job_chunks SET lease_expires_at = now() - interval '1 s' WHERE id = %s", (chunk_id,))
    conn.execute("SELECT chunkq.reclaim_expired_chunks()")
    claim_one(conn, job_id)  # attempt 2 holds it now
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.checkpoint_chunk(%s, %s, %s, NULL, %s)", (chunk_id, attempt, start + 400, token))
    assert caught.value.sqlstate == "CQ006"
    lost = conn.execute(
        "SELECT held FROM chunkq.heartbeat_chunks(%s, %s, NULL, %s, %s)",
        ([chunk_id], [attempt], [token], [start + 400]),
    ).fetchall()
    assert lost == [(False,)]
    assert snapshot(conn) == before


@pytest.mark.parametrize(
    ("position", "state", "message"),
    [
        (-1, None, "outside its images"),
        (500, None, "outside its images"),
        (10_000, None, "outside its images"),
        (None, None, "needs the position"),
        (10, "x" * 70_000, "more than settings.max_checkpoint_state_bytes"),
    ],
)
def test_bad_checkpoints_get_a_typed_error_and_change_nothing(conn, position, state, message):
    job_id = new_job(conn, 1000)
    chunk_id, attempt, token, _, _ = claim_one(conn, job_id)  # images 0..499
    before = snapshot(conn)
    with pytest.raises(psycopg.Error, match=message) as caught:
        conn.execute(
            "SELECT chunkq.checkpoint_chunk(%s, %s, %s, %s, %s)",
            (chunk_id, attempt, position, None if state is None else Jsonb(state), token),
        )
    assert caught.value.sqlstate == "CQ001"
    if position is not None:  # in a heartbeat, no position is no checkpoint
        with pytest.raises(psycopg.Error, match=message) as batch:
            conn.execute(
                "SELECT * FROM chunkq.heartbeat_chunks(%s, %s, NULL, %s, %s, %s)",
                ([chunk_id], [attempt], [token], [position], [None if state is None else Jsonb(state)]),
            )
        assert batch.value.sqlstate == "CQ001"
    assert snapshot(conn) == before


def test_progress_counts_checkpointed_images_once(conn):
    job_id = new_job(conn, 1500)
    a = claim_one(conn, job_id)
    b = claim_one(conn, job_id)
    conn.execute("SELECT chunkq.checkpoint_chunk(%s, %s, %s, NULL, %s)", (a[0], a[1], a[3] + 99, a[2]))
    conn.execute("SELECT chunkq.checkpoint_chunk(%s, %s, %s, NULL, %s)", (b[0], b[1], b[3] + 249, b[2]))

    def progress() -> tuple[int, int]:
        return conn.execute(
            "SELECT completed_images, images_completed FROM chunkq.job_progress(%s)", (job_id,)
        ).fetchone()

    assert progress() == (0, 350)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s, %s)", (a[0], a[1], a[2]))
    assert progress() == (500, 750)  # a's 500, not 500 + its 100 checkpointed
    conn.execute("SELECT chunkq.complete_chunk(%s, %s, %s)", (b[0], b[1], b[2]))
    assert progress() == (1000, 1000)
