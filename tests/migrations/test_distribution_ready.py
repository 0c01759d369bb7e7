"""The schema stays ready to be distributed by job (docs/scaling.md, "Past one primary"): a key or an index of a
per-job table without job_id is either on the allow-list below, which that document explains entry by entry,
or a new one that would have to change before the tables could be sharded by job_id."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

SCALING_MD = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"
SEE = "see docs/scaling.md, 'Past one primary'"

#: Per-job tables and the column each would be distributed by: every table with a job_id column, and the jobs
#: themselves (distributed by id, co-located with their chunks, in docs/scaling.md's plan).
DISTRIBUTED_BY = {"crawl_jobs": "id"}

#: The indexes and foreign keys of per-job tables that lack the distribution column today, each with what
#: docs/scaling.md says becomes of it. Add to this list only with a paragraph there.
ALLOWED = {
    "job_chunks_pkey": "becomes PRIMARY KEY (job_id, id): a chunk is found by its job and its id",
    "job_chunks_claim_order": "the claim across all jobs: per shard, or replaced by claims job by job",
    "job_chunks_claim_order_limited": "the front of the limited jobs' queue: as job_chunks_claim_order",
    "job_chunks_lease_expiry": "the reclaim of expired leases: becomes (job_id, lease_expires_at), reclaimed per job",
    "chunk_errors_pkey": "becomes PRIMARY KEY (job_id, id)",
    "chunk_errors_by_chunk": "becomes (job_id, chunk_id, attempt)",
    "chunk_errors_by_time": "recent errors of the whole queue (queue_stats): a read across shards, kept per shard",
    "chunk_errors_chunk_id_fkey": "becomes FOREIGN KEY (job_id, chunk_id) REFERENCES job_chunks (job_id, id)",
}

INDEXES = """
    SELECT t.relname, i.relname, x.indisunique,
           array(SELECT a.attname FROM unnest(x.indkey[:x.indnkeyatts - 1]) AS k(attnum)
                   JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum)::text[]
      FROM pg_index x
      JOIN pg_class i ON i.oid = x.indexrelid
      JOIN pg_class t ON t.oid = x.indrelid
     WHERE t.relnamespace = 'chunkq'::regnamespace AND t.relkind IN ('r', 'p')
"""
FOREIGN_KEYS = """
    SELECT t.relname, c.conname, f.relname,
           array(SELECT a.attname FROM unnest(c.conkey) AS k(attnum)
                   JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum)::text[],
           array(SELECT a.attname FROM unnest(c.confkey) AS k(attnum)
                   JOIN pg_attribute a ON a.attrelid = f.oid AND a.attnum = k.attnum)::text[]
      FROM pg_constraint c
      JOIN pg_class t ON t.oid = c.conrelid
      JOIN pg_class f ON f.oid = c.confrelid
     WHERE c.contype = 'f' AND t.relnamespace = 'chunkq'::regnamespace
"""


def distribution_columns(conn: psycopg.Connection) -> dict[str, str]:
    """Per-job table -> its distribution column."""
    tables = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
        " WHERE c.relnamespace = 'chunkq'::regnamespace AND c.relkind IN ('r', 'p') AND a.attname = 'job_id'"
        " AND NOT a.attisdropped"
    ).fetchall()
    return {**DISTRIBUTED_BY, **{table: "job_id" for (table,) in tables}}


def not_distribution_ready(conn: psycopg.Connection) -> dict[str, str]:
    """Every index and foreign key of a per-job table that lacks its distribution column: name -> what it is."""
    by = distribution_columns(conn)
    found = {}
    for table, index, unique, columns in conn.execute(INDEXES).fetchall():
        # A unique key must hold the distribution column to be enforced shard by shard. Any other index without
        # it serves a query across jobs, which reads every shard: on the tables of per-chunk rows that is the hot
        # path and must be planned; the jobs' own lookups across jobs (by project, by rate key) read a small table.
        if table in by and by[table] not in columns and (unique or by[table] == "job_id"):
            kind = "unique index" if unique else "index"
            found[index] = f"{kind} {index} on {table} ({', '.join(columns) or 'an expression'}) lacks {by[table]}"
    for table, key, target, columns, target_columns in conn.execute(FOREIGN_KEYS).fetchall():
        if table in by and target in by and (by[table] not in columns or by[target] not in target_columns):
            found[key] = (
                f"foreign key {key} from {table} ({', '.join(columns)}) to {target} ({', '.join(target_columns)})"
                f" does not join on the distribution columns {table}.{by[table]} = {target}.{by[target]}"
            )
    return found


def test_every_key_and_index_of_a_per_job_table_has_job_id_or_is_on_the_allow_list(conn):
    unexpected = {name: what for name, what in not_distribution_ready(conn).items() if name not in ALLOWED}
    assert not unexpected, (
        "A per-job table could no longer be distributed by job without changing this too "
        f"({SEE}): add job_id, or add it to ALLOWED in this test with a paragraph in docs/scaling.md saying what "
        "it becomes:\n  " + "\n  ".join(unexpected.values())
    )


def test_the_allow_list_is_current_and_each_entry_is_explained_in_docs_scaling_md(conn):
    found = not_distribution_ready(conn)
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"on the allow-list but now distribution-ready or gone: remove them here and in {SEE}: {stale}"
    text = SCALING_MD.read_text()
    unexplained = [name for name in ALLOWED if not re.search(rf"`{name}`", text)]
    assert not unexplained, f"docs/scaling.md does not say what becomes of {unexplained}"


def test_every_table_that_refers_to_a_chunk_or_a_job_carries_job_id(conn):
    """A table of per-chunk rows must be co-located with its chunks, so it needs the job's id, not only the
    chunk's."""
    by = distribution_columns(conn)
    missing = conn.execute(
        """
        SELECT DISTINCT t.relname
          FROM pg_class t
          LEFT JOIN pg_constraint c ON c.conrelid = t.oid AND c.contype = 'f'
          LEFT JOIN pg_class f ON f.oid = c.confrelid
         WHERE t.relnamespace = 'chunkq'::regnamespace AND t.relkind IN ('r', 'p')
           AND NOT (t.relname = ANY(%s))
           AND (f.relname = ANY(%s)
                OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = t.oid AND a.attname = 'chunk_id'))
        """,
        (list(by), list(by)),
    ).fetchall()
    assert missing == [], f"tables that refer to chunks or jobs without a job_id column ({SEE}): {missing}"


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ("CREATE INDEX job_chunks_by_worker ON chunkq.job_chunks (worker_id)", "job_chunks_by_worker"),
        ("CREATE UNIQUE INDEX crawl_jobs_one_name ON chunkq.crawl_jobs (project_id, name)", "crawl_jobs_one_name"),
        (
            "CREATE TABLE chunkq.chunk_tags (job_id bigint NOT NULL, chunk_id bigint NOT NULL,"
            " CONSTRAINT chunk_tags_chunk_fkey FOREIGN KEY (chunk_id) REFERENCES chunkq.job_chunks (id))",
            "chunk_tags_chunk_fkey",
        ),
        (
            "CREATE TABLE chunkq.chunk_notes (chunk_id bigint NOT NULL, note text);"
            " CREATE INDEX chunk_notes_by_chunk ON chunkq.chunk_notes (chunk_id)",
            None,
        ),
    ],
)
def test_the_check_catches_a_new_index_or_key_without_job_id(conn, change, name):
    conn.execute(change)
    if name is not None:
        assert name in not_distribution_ready(conn)
    else:  # a new table of per-chunk rows without job_id
        with pytest.raises(AssertionError, match="chunk_notes"):
            test_every_table_that_refers_to_a_chunk_or_a_job_carries_job_id(conn)
