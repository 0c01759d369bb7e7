"""The ceiling: pgbench running chunkq's own SQL functions, with no Python in the way.

Two scripts, each a worker's bare minimum per chunk:

- single: claim_chunks(1) in one transaction, complete_chunk in a second;
- batch:  claim_chunks(n) in one transaction, complete the n in a second
  (complete_and_claim with limit 0: chunkq's call that completes several).

Each run drains fresh chunks (the table is VACUUMed first, so that no run
inherits another's dead rows); the rate is chunks claimed and completed per second.
"""

from __future__ import annotations

import psycopg

from bench.common import new_job, pgbench, vacuum_queue

SINGLE = """\
SELECT id, attempt, lease_token FROM chunkq.claim_chunks('pgbench', 1) \\gset
SELECT chunkq.complete_chunk(:id, :attempt, ':lease_token');
"""
BATCH = """\
SELECT array_agg(id) AS ids, array_agg(attempt) AS attempts, array_agg(lease_token) AS tokens
  FROM chunkq.claim_chunks('pgbench', {size}) \\gset
SELECT count(*) FROM chunkq.complete_and_claim(':ids', ':attempts', 'pgbench', 0, NULL, NULL, ':tokens');
"""


def script(batch: int) -> str:
    """The pgbench script for claims of ``batch`` chunks: a claim transaction, then a completion one."""
    return SINGLE if batch == 1 else BATCH.format(size=batch)


def ceiling_rate(dsn: str, conn: psycopg.Connection, batch: int, clients: int, chunks: int) -> float:
    """Chunks/s pgbench claims and completes, ``batch`` per claim, with ``clients`` connections."""
    vacuum_queue(conn)
    new_job(conn, chunks, chunk_size=1)
    return pgbench(dsn, script(batch), clients, chunks // batch) * batch
