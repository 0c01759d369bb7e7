"""The issue's bare-table ceiling: pgbench on a plain table, no chunkq at all.

    python -m bench.bare_ceiling [--dsn DSN] [--rows 60000] [--repeats 3]

Claim one row with FOR UPDATE SKIP LOCKED in one transaction, mark it completed
in a second: the least any Postgres queue can do per job. A reference for
docs/benchmarks.md, next to bench/ceiling.py's pgbench on chunkq's own functions.
"""

from __future__ import annotations

import psycopg

from bench.common import Summary, bench_database, parser, pgbench, server_line

SETUP = """
CREATE TABLE bare_queue (id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'pending', worker text,
                         claimed_at timestamptz, done_at timestamptz);
CREATE INDEX bare_queue_pending ON bare_queue (id) WHERE status = 'pending';
"""
SCRIPT = """\
UPDATE bare_queue SET status = 'processing', worker = 'pgbench', claimed_at = now() \
 WHERE id = (SELECT id FROM bare_queue WHERE status = 'pending' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) \
 RETURNING id \\gset
UPDATE bare_queue SET status = 'completed', done_at = now() WHERE id = :id;
"""


def main() -> None:
    p = parser("pgbench claim + complete on a bare table")
    p.add_argument("--rows", type=int, default=60_000)
    args = p.parse_args()
    with bench_database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        print(server_line(dsn))
        conn.execute(SETUP)
        for clients in (1, 2, 4, 8):
            rates = []
            for _ in range(args.repeats):
                conn.execute("TRUNCATE bare_queue")
                conn.execute(
                    "INSERT INTO bare_queue (status) SELECT 'pending' FROM generate_series(1, %s)", (args.rows,)
                )
                conn.execute("VACUUM ANALYZE bare_queue")
                rates.append(pgbench(dsn, SCRIPT, clients, args.rows // 2))
            print(f"{clients} clients: {Summary.of(rates)} claim+complete pairs/s", flush=True)


if __name__ == "__main__":
    main()
