"""Where the server's time goes in the worker's call, complete_and_claim, function by function.

    python -m bench.call_profile [--dsn DSN] [--calls 2000] [--repeats 3]

In a fresh database, one connection completes the chunk it holds and claims the
next, ``--calls`` times, with the client's call (JobChunkRepository.complete_and_claim),
with one chunk and then 100 per call, on a job just created. The session runs with
``track_functions = 'all'`` (a superuser setting), so pg_stat_user_functions times
every PL/pgSQL function the call runs, nested ones included; the table gives each
function's total and self time per chunk (wall clock, in the backend), beside the
backend's CPU per chunk from /proc (the server must run on this machine) — what
is left of the CPU is the commit, the protocol and the outer query.
"""

from __future__ import annotations

import psycopg

from bench.common import Summary, bench_database, cpu_seconds, parser, server_line
from bench.hot_path import add_calls_option, calls_of, worker_calls

BATCHES = (1, 100)

FUNCTION_TIMES = """
SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions WHERE schemaname = 'chunkq'
"""


def function_times(conn: psycopg.Connection) -> dict[str, tuple[int, float, float]]:
    """Calls, total and self milliseconds of each chunkq function so far, this session's included."""
    conn.execute("SELECT pg_stat_force_next_flush()")  # this session's counts are flushed as it ends
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return {name: (calls, total, own) for name, calls, total, own in conn.execute(FUNCTION_TIMES).fetchall()}


def profile(conn: psycopg.Connection, batch: int, calls: int) -> dict[str, tuple[float, float]]:
    """Microseconds per chunk, over ``calls`` calls of ``batch`` chunks: the backend's CPU under
    "(backend CPU)", and (total, self) for each function the calls ran."""
    make_calls = worker_calls(conn, batch, calls)
    backend = conn.info.backend_pid
    before, cpu_before = function_times(conn), cpu_seconds([backend])[backend]
    make_calls()
    cpu = cpu_seconds([backend])[backend] - cpu_before
    after = function_times(conn)
    per_chunk = 1000 / (calls * batch)  # pg_stat_user_functions counts milliseconds
    result = {"(backend CPU)": (cpu * 1e6 / (calls * batch), cpu * 1e6 / (calls * batch))}
    for name, (n, total, own) in after.items():
        n0, total0, own0 = before.get(name, (0, 0.0, 0.0))
        if n > n0:
            result[name] = ((total - total0) * per_chunk, (own - own0) * per_chunk)
    return result


def main() -> None:
    p = parser("server time of complete_and_claim, function by function")
    add_calls_option(p)
    args = p.parse_args()
    samples: dict[tuple[int, str], list[tuple[float, float]]] = {}
    with bench_database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        print(server_line(dsn))
        conn.execute("SET track_functions = 'all'")
        for _ in range(args.repeats):
            conn.execute("TRUNCATE chunkq.crawl_jobs, chunkq.job_chunks, chunkq.job_chunk_counts, chunkq.chunk_errors")
            for batch in BATCHES:
                for name, times in profile(conn, batch, calls_of(batch, args.calls)).items():
                    samples.setdefault((batch, name), []).append(times)
    for batch in BATCHES:
        print(f"\n{batch} chunk{'s' if batch > 1 else ''} per call, us per chunk (median, min-max of {args.repeats})")
        print("| function | total | self |\n|---|---:|---:|")
        rows = [
            (name, Summary.of([t for t, _ in times]), Summary.of([s for _, s in times]))
            for (b, name), times in samples.items()
            if b == batch
        ]
        for name, total, own in sorted(rows, key=lambda row: -row[1].median):
            print(f"| {name} | {total:,.0f} | {'' if name == '(backend CPU)' else format(own, ',.0f')} |")


if __name__ == "__main__":
    main()
