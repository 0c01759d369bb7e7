"""Table and index bloat after many claim/complete cycles, with and without storage parameters.

    python -m bench.bloat [--dsn DSN] [--cycles 1000000] [--clients 4]

For each configuration, in its own fresh database on the same server: create
``--cycles`` chunks, then pgbench drains them (claim_chunks(1) and complete_chunk,
two transactions per cycle, ``--clients`` at once) while the table is sampled
every few seconds. Reports, at the end: heap and index sizes of job_chunks and
job_chunk_counts, live and dead tuples, the most dead tuples seen, autovacuum runs.

Use a server with autovacuum on (the default; an embedded PostgreSQL is started
when no DSN is given): the point is what autovacuum makes of each configuration.
"""

from __future__ import annotations

import contextlib
import threading
import time

import psycopg

from bench.common import bench_database, new_job, parser, pgbench, server_line
from chunkq.embedded import embedded_server

SCRIPT = """\
SELECT id, attempt, lease_token FROM chunkq.claim_chunks('pgbench', 1) \\gset
SELECT chunkq.complete_chunk(:id, :attempt, ':lease_token');
"""

#: The configurations compared: "tuned" is what migration 0004 sets, "defaults"
#: PostgreSQL's own, "fillfactor-80" the first candidate (tuned plus fillfactor 80).
CONFIGS: dict[str, list[str]] = {
    "defaults": [
        "ALTER TABLE chunkq.job_chunks RESET (fillfactor, autovacuum_vacuum_scale_factor,"
        " autovacuum_vacuum_insert_scale_factor, autovacuum_vacuum_cost_delay)",
        "ALTER TABLE chunkq.job_chunk_counts RESET (fillfactor, autovacuum_vacuum_scale_factor,"
        " autovacuum_vacuum_threshold, autovacuum_vacuum_cost_delay)",
    ],
    "tuned": [],
    "fillfactor-80": ["ALTER TABLE chunkq.job_chunks SET (fillfactor = 80)"],
}

STATS = """
SELECT c.relname, pg_relation_size(c.oid), pg_indexes_size(c.oid), s.n_live_tup, s.n_dead_tup,
       s.autovacuum_count, s.n_tup_hot_upd, s.n_tup_upd
  FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
 WHERE c.relnamespace = 'chunkq'::regnamespace AND c.relname IN ('job_chunks', 'job_chunk_counts')
 ORDER BY c.relname
"""


def measure(admin_dsn: str, name: str, statements: list[str], cycles: int, clients: int) -> None:
    with bench_database(admin_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)
        new_job(conn, cycles, chunk_size=1)
        peak = {"job_chunks": 0, "job_chunk_counts": 0}
        done = threading.Event()

        def sample() -> None:
            with psycopg.connect(dsn, autocommit=True) as watcher:
                while not done.wait(5):
                    for relname, *_, dead, _a, _h, _u in watcher.execute(STATS):
                        peak[relname] = max(peak[relname], dead)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        rate = pgbench(dsn, SCRIPT, clients, cycles)
        done.set()
        sampler.join()
        elapsed = time.monotonic() - started
        conn.execute("SELECT pg_stat_force_next_flush()") if conn.info.server_version >= 150000 else None
        time.sleep(1)
        print(
            f"\n{name}: {cycles:,} cycles in {elapsed:,.0f} s ({rate:,.0f}/s); "
            f"{'; '.join(statements) or 'no storage parameters'}"
        )
        print(
            f"  {'table':<17} {'heap MB':>8} {'indexes MB':>10} {'live':>10} {'dead':>9} {'peak dead':>10}"
            f" {'autovacuums':>11} {'HOT %':>6}"
        )
        for relname, heap, indexes, live, dead, autovacuums, hot, updates in conn.execute(STATS):
            print(
                f"  {relname:<17} {heap / 2**20:>8.1f} {indexes / 2**20:>10.1f} {live:>10,} {dead:>9,}"
                f" {peak[relname]:>10,} {autovacuums:>11} {100 * hot / max(updates, 1):>6.1f}"
            )
        for index, size in conn.execute(
            "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes"
            " WHERE relname = 'job_chunks' ORDER BY 1"
        ):
            print(f"    {index:<34} {size / 2**20:>8.1f} MB")
        for relname, options in conn.execute(
            "SELECT relname, coalesce(array_to_string(reloptions, ', '), 'none') FROM pg_class"
            " WHERE relnamespace = 'chunkq'::regnamespace AND relname IN ('job_chunks', 'job_chunk_counts')"
            " ORDER BY 1"
        ):
            print(f"  storage parameters of {relname}: {options}")


def main() -> None:
    p = parser("bloat after many claim/complete cycles")
    p.add_argument("--cycles", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(embedded_server())
        print(server_line(admin))
        for name in args.configs:
            measure(admin, name, CONFIGS[name], args.cycles, args.clients)


if __name__ == "__main__":
    main()
