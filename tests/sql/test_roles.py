"""Least privilege (0005): log in as each role and prove what it can and cannot do."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.cli.conftest import cli_env
from tests.helpers.db import claim, login_role, new_job, snapshot
from tests.helpers.pool import ROOT, wait_until

DENIED = "42501"


@pytest.fixture
def login(dsn: str) -> Iterator[Callable[[str], str]]:
    """login("chunkq_worker") -> the DSN of a new login role that is a member of it (dropped afterwards)."""
    with contextlib.ExitStack() as roles:
        yield lambda group: roles.enter_context(login_role(dsn, f"chunkq_test_{group.split('_')[1]}", group))


def refused(conn: psycopg.Connection, statement: str, *params: object) -> str:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(statement, params or None)
    return caught.value.sqlstate


def leases(
    conn: psycopg.Connection, worker: str = "w", limit: int = 1, job_id: int | None = None
) -> list[tuple[int, int, uuid.UUID]]:
    """Claims chunks; returns (chunk id, attempt, lease token) triples."""
    return conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.claim_chunks(%s, %s, %s)", (worker, limit, job_id)
    ).fetchall()


def test_worker_role(conn, login):
    job_id = new_job(conn, 500 * 4)
    with psycopg.connect(login("chunkq_worker"), autocommit=True) as worker:
        (a, att_a, tok_a), (b, att_b, tok_b), (c, att_c, tok_c) = leases(worker, "w", limit=3)
        worker.execute("SELECT chunkq.heartbeat_chunk(%s, %s, p_lease_token => %s)", (a, att_a, tok_a))
        worker.execute(
            "SELECT * FROM chunkq.heartbeat_chunks(%s, %s, NULL, %s)", ([a, b], [att_a, att_b], [tok_a, tok_b])
        )
        worker.execute("SELECT chunkq.complete_chunk(%s, %s, %s)", (a, att_a, tok_a))
        worker.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom', true, p_lease_token => %s)", (b, att_b, tok_b))
        worker.execute("SELECT chunkq.release_chunk(%s, %s, %s)", (c, att_c, tok_c))
        worker.execute("SELECT chunkq.reclaim_expired_chunks()")
        ((e, att_e, tok_e),) = leases(worker, "w", job_id=job_id)
        assert worker.execute(
            "SELECT count(*) FROM chunkq.complete_and_claim(%s, %s, 'w', 0, NULL, NULL, %s)", ([e], [att_e], [tok_e])
        ).fetchone() == (0,)
        assert worker.execute("SELECT keywords FROM chunkq.get_job(%s)", (job_id,)).fetchone() == (["cat"],)
        assert worker.execute("SELECT chunkq.schema_version()").fetchone()[0] >= 5

        ((d, att_d, tok_d),) = leases(worker, "w", job_id=job_id)
        before = snapshot(conn)
        assert refused(worker, "SELECT chunkq.complete_chunk(%s)", d) == DENIED  # no attempt: not a worker's call
        assert refused(worker, "SELECT chunkq.complete_chunk(%s, %s, %s)", d, att_d + 1, tok_d) == "CQ006"
        assert refused(worker, "UPDATE chunkq.job_chunks SET status = 'completed'") == DENIED
        assert refused(worker, "SELECT * FROM chunkq.job_chunks") == DENIED
        assert refused(worker, "DELETE FROM chunkq.chunk_errors") == DENIED
        assert refused(worker, "SELECT chunkq.create_job(1, 'x', '[]', 10)") == DENIED
        assert refused(worker, "SELECT chunkq.cancel_job(%s)", job_id) == DENIED
        assert refused(worker, "SELECT * FROM chunkq.job_overview") == DENIED
        assert refused(worker, "DROP TABLE chunkq.job_chunks") == DENIED
        assert refused(worker, "SELECT chunkq._apply_chunk_moves('{}')") == DENIED
        assert snapshot(conn) == before


GUESSES = [
    ("complete_chunk(%(id)s, %(attempt)s)", "CQ006"),
    ("complete_chunk(%(id)s, %(attempt)s, %(guess)s)", "CQ006"),
    ("heartbeat_chunk(%(id)s, %(attempt)s)", "CQ006"),
    ("heartbeat_chunk(%(id)s, %(attempt)s, p_lease_token => %(guess)s)", "CQ006"),
    ("fail_chunk(%(id)s, %(attempt)s, 'guessed', false)", "CQ006"),
    ("fail_chunk(%(id)s, %(attempt)s, 'guessed', false, p_lease_token => %(guess)s)", "CQ006"),
    ("release_chunk(%(id)s, %(attempt)s)", "CQ006"),
    ("release_chunk(%(id)s, %(attempt)s, %(guess)s)", "CQ006"),
    ("complete_and_claim(ARRAY[%(id)s]::bigint[], ARRAY[%(attempt)s]::integer[], 'x', 0)", "CQ006"),
    (
        "complete_and_claim(ARRAY[%(id)s]::bigint[], ARRAY[%(attempt)s]::integer[], 'x', 0, NULL, NULL,"
        " ARRAY[%(guess)s]::uuid[])",
        "CQ006",
    ),
]


@pytest.mark.parametrize(
    ("report", "sqlstate"), GUESSES, ids=[g[0].split("(")[0] + str(i) for i, g in enumerate(GUESSES)]
)
def test_a_worker_cannot_report_on_a_chunk_another_worker_holds(conn, login, report, sqlstate):
    """The attempt is a counter anyone can guess; the lease token only the claimer has."""
    new_job(conn, 500 * 2)
    with (
        psycopg.connect(login("chunkq_worker"), autocommit=True) as holder,
        psycopg.connect(login("chunkq_worker"), autocommit=True) as intruder,
    ):
        ((chunk_id, attempt, token),) = leases(holder, "holder")
        seen = intruder.execute("SELECT attempt, lease_token FROM chunkq.get_chunk(%s)", (chunk_id,)).fetchone()
        assert seen == (attempt, None), "a worker must not read another worker's lease token"
        before = snapshot(conn)
        params = {"id": chunk_id, "attempt": attempt, "guess": uuid.uuid4()}
        with pytest.raises(psycopg.Error) as caught:
            intruder.execute(f"SELECT * FROM chunkq.{report}", params)
        assert caught.value.sqlstate == sqlstate
        lost = intruder.execute(
            "SELECT held FROM chunkq.heartbeat_chunks(%s, %s, NULL, %s)", ([chunk_id], [attempt], [params["guess"]])
        ).fetchall()
        assert lost == [(False,)]
        assert snapshot(conn) == before
        # The holder's reports still count.
        holder.execute("SELECT chunkq.complete_chunk(%s, %s, %s)", (chunk_id, attempt, token))
    assert conn.execute("SELECT status::text FROM chunkq.job_chunks WHERE id = %s", (chunk_id,)).fetchone() == (
        "completed",
    )


def test_app_role(conn, login):
    with psycopg.connect(login("chunkq_app"), autocommit=True) as app:
        job_id = app.execute("SELECT id FROM chunkq.create_job(1, 'app job', '[]', 1500)").fetchone()[0]
        app.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
        app.execute("SELECT chunkq.pause_job(%s)", (job_id,))
        app.execute("SELECT chunkq.resume_job(%s)", (job_id,))
        app.execute("SELECT chunkq.set_job_priority(%s, 7)", (job_id,))
        ((chunk_id, _),) = claim(app, "app", job_id=job_id)
        app.execute("SELECT chunkq.fail_chunk(%s, NULL, 'by hand')", (chunk_id,))  # an operator's override
        app.execute("SELECT chunkq.retry_chunk(%s)", (chunk_id,))
        assert app.execute("SELECT total_chunks FROM chunkq.job_overview").fetchone() == (3,)
        app.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
        app.execute("SELECT * FROM chunkq.prune_finished_jobs('0 s')")
        assert app.execute("SELECT count(*) FROM chunkq.list_jobs()").fetchone() == (0,)

        new_job(conn, 500)
        before = snapshot(conn)
        assert refused(app, "UPDATE chunkq.crawl_jobs SET priority = 1") == DENIED
        assert (
            refused(
                app,
                "INSERT INTO chunkq.job_chunks (job_id, chunk_index, image_start, image_end, priority)"
                " VALUES (1, 9, 0, 1, 1)",
            )
            == DENIED
        )
        assert refused(app, "UPDATE chunkq.settings SET chunk_size = 1") == DENIED
        assert refused(app, "DROP VIEW chunkq.job_overview") == DENIED
        assert snapshot(conn) == before


def test_reader_role(conn, login):
    job_id = new_job(conn, 1500)
    for chunk_id, attempt in claim(conn, limit=2):
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'HTTP 503')", (chunk_id, attempt))
    with psycopg.connect(login("chunkq_reader"), autocommit=True) as reader:
        for view in ("job_overview", "queue_depth", "expired_leases", "live_workers", "failure_summary", "settings"):
            reader.execute(f"SELECT * FROM chunkq.{view}").fetchall()
        assert reader.execute("SELECT failed_chunks FROM chunkq.job_progress(%s)", (job_id,)).fetchone() == (2,)
        assert reader.execute("SELECT failed_chunks FROM chunkq.queue_stats()").fetchone() == (2,)
        assert reader.execute("SELECT completed_images FROM chunkq.job_overview").fetchone() == (0,)
        assert len(reader.execute("SELECT * FROM chunkq.list_chunks(%s)", (job_id,)).fetchall()) == 3

        before = snapshot(conn)
        assert refused(reader, "SELECT * FROM chunkq.claim_chunks('r')") == DENIED
        assert refused(reader, "SELECT chunkq.retry_failed_chunks(%s)", job_id) == DENIED
        assert refused(reader, "SELECT chunkq.create_job(1, 'x', '[]', 10)") == DENIED
        assert refused(reader, "DELETE FROM chunkq.crawl_jobs") == DENIED
        assert refused(reader, "UPDATE chunkq.settings SET chunk_size = 1") == DENIED
        assert refused(reader, "SELECT * FROM chunkq.job_chunks") == DENIED
        assert refused(reader, "DROP VIEW chunkq.queue_depth") == DENIED
        assert snapshot(conn) == before


def test_api_runs_as_owner_with_a_fixed_search_path_and_nothing_is_public(conn):
    loose = conn.execute(
        """
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'chunkq'::regnamespace AND p.proname !~ '^_'
           AND NOT (p.prosecdef AND 'search_path=pg_catalog, pg_temp' = ANY (p.proconfig))
        """
    ).fetchall()
    assert loose == []
    public = conn.execute(
        """
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = 'chunkq'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE')
        UNION ALL
        SELECT c.relname FROM pg_class c
         WHERE c.relnamespace = 'chunkq'::regnamespace AND c.relkind IN ('r', 'v')
           AND has_table_privilege('public', c.oid, 'SELECT')
        """
    ).fetchall()
    assert public == []


def test_worker_pool_runs_as_a_worker_role(conn, login, start_pool):
    job_id = new_job(conn, 500 * 30)
    worker_dsn = login("chunkq_worker")
    pool = start_pool("--handler", "chunkq.workers.sample:noop", "--processes", "2", on=worker_dsn)
    wait_until(
        lambda: conn.execute("SELECT completed_chunks FROM chunkq.job_progress(%s)", (job_id,)).fetchone()[0] == 30,
        60,
        "the pool, as chunkq_worker, to complete the job",
    )
    assert pool.stop() == 0


def test_cli_as_reader(login):
    reader = login("chunkq_reader")
    stats = subprocess.run(
        [sys.executable, "-m", "chunkq", "stats", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=cli_env(CHUNKQ_DSN=reader),
        timeout=60,
    )
    assert stats.returncode == 0, stats.stderr
    create = subprocess.run(
        [sys.executable, "-m", "chunkq", "job", "create", "--name", "x", "--max-images", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=cli_env(CHUNKQ_DSN=reader),
        timeout=60,
    )
    assert create.returncode == 1 and create.stderr.startswith("chunkq: permission denied")
