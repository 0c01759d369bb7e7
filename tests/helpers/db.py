"""Small SQL helpers for assertions: what is in the database, as plain Python values."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from chunkq.schema import migrations_path

TABLES = ("crawl_jobs", "job_chunks", "job_chunk_counts", "chunk_errors", "settings")

#: Every migration id, oldest first, as yoyo names them.
MIGRATIONS = sorted(p.stem for p in migrations_path().glob("*.sql") if not p.name.endswith(".rollback.sql"))

#: The worker's fast path as the SQL tests call it: complete_and_claim(chunk ids, attempts, worker id, limit).
FAST = "SELECT id, attempt, status::text, worker_id FROM chunkq.complete_and_claim(%s, %s, %s, %s)"


@contextlib.contextmanager
def login_role(dsn: str, prefix: str, *groups: str) -> Iterator[str]:
    """The DSN of a new login role ``prefix_<random>``, a member of ``groups`` (none: no chunkq grants at all);
    its sessions are ended and it is dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    member = sql.SQL(" IN ROLE {}").format(sql.SQL(", ").join(map(sql.Identifier, groups))) if groups else sql.SQL("")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'{}").format(sql.Identifier(name), member))
    try:
        yield make_conninfo(dsn, user=name, password="pw")
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def snapshot(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every chunkq table, sorted: equal snapshots mean nothing changed."""
    return {table: sorted(conn.execute(f"SELECT t::text FROM chunkq.{table} t").fetchall()) for table in TABLES}


def new_job(conn: psycopg.Connection, max_images: int = 1500, *, chunk: bool = True, **kwargs: Any) -> int:
    """Creates a job (and its chunks) through the SQL API; returns the job id."""
    params = {"priority": None, "max_retries": None, "chunk_size": None, **kwargs}
    job_id = conn.execute(
        "SELECT id FROM chunkq.create_job(1, 'test job', '[\"cat\"]', %s, %s, %s, %s)",
        (max_images, params["priority"], params["max_retries"], params["chunk_size"]),
    ).fetchone()[0]
    if chunk:
        conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    return job_id


def claim(
    conn: psycopg.Connection, worker: str = "w", limit: int = 1, job_id: int | None = None
) -> list[tuple[int, int]]:
    """Claims chunks; returns (chunk id, attempt) pairs in claim order."""
    return conn.execute("SELECT id, attempt FROM chunkq.claim_chunks(%s, %s, %s)", (worker, limit, job_id)).fetchall()


def statuses(conn: psycopg.Connection, job_id: int) -> dict[str, int]:
    """Chunk counts by status, counted from job_chunks itself."""
    rows = conn.execute(
        "SELECT status::text, count(*) FROM chunkq.job_chunks WHERE job_id = %s GROUP BY 1", (job_id,)
    ).fetchall()
    return dict(rows)


def job_status(conn: psycopg.Connection, job_id: int) -> str:
    return conn.execute("SELECT status::text FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)).fetchone()[0]


def assert_counters_consistent(conn: psycopg.Connection) -> None:
    """job_chunk_counts and crawl_jobs.open_slots agree with the chunks themselves, for every job."""
    mismatches = conn.execute(
        """
        WITH actual AS (
            SELECT job_id, (chunk_index % 16)::smallint AS slot,
                   count(*) FILTER (WHERE status = 'pending') AS pending,
                   count(*) FILTER (WHERE status = 'processing') AS processing,
                   count(*) FILTER (WHERE status = 'completed') AS completed,
                   count(*) FILTER (WHERE status = 'failed') AS failed,
                   count(*) FILTER (WHERE status = 'cancelled') AS cancelled
              FROM chunkq.job_chunks GROUP BY 1, 2
        )
        SELECT coalesce(a.job_id, k.job_id), coalesce(a.slot, k.slot)
          FROM actual a FULL JOIN chunkq.job_chunk_counts k ON k.job_id = a.job_id AND k.slot = a.slot
         WHERE (a.pending, a.processing, a.completed, a.failed, a.cancelled)
               IS DISTINCT FROM (k.pending, k.processing, k.completed, k.failed, k.cancelled)
        """
    ).fetchall()
    assert mismatches == [], f"counter rows disagree with job_chunks: {mismatches}"
    bad_jobs = conn.execute(
        """
        SELECT j.id, j.open_slots, j.status::text
          FROM chunkq.crawl_jobs j
         WHERE j.open_slots <> (SELECT count(*) FROM chunkq.job_chunk_counts k
                                 WHERE k.job_id = j.id AND k.pending + k.processing > 0)
            OR (j.chunked_at IS NOT NULL AND (j.open_slots = 0) <> (j.finished_at IS NOT NULL))
        """
    ).fetchall()
    assert bad_jobs == [], f"jobs whose open_slots or finish state is wrong: {bad_jobs}"
