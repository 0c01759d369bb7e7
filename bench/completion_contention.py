"""Completions per second when 4 workers finish chunks of ONE job versus each its own job.

    python -m bench.completion_contention [--dsn DSN] [--chunks 4000] [--processes 4]

Every chunk is claimed beforehand, so the timed phase is only complete_chunk,
one autocommit call per chunk, with durable commits. Worker i completes chunks
i, i+4, i+8, ...: neighbouring chunks at the same moment, the worst case for a
design that would serialise completions of a job on one row.

For comparison, a third case runs the same code with one counter row per job
instead of 16 (chunkq._counter_slots() redefined to 1 in the throwaway bench
database): the design the split counters replace.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from typing import Any

import psycopg

from bench.common import bench_database, new_job, parser, server_line


def complete_all(dsn: str, work: list[tuple[int, int, Any]], barrier: Any, results: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        barrier.wait()
        start = time.perf_counter()
        for chunk_id, attempt, token in work:
            conn.execute("SELECT chunkq.complete_chunk(%s, %s, %s)", (chunk_id, attempt, token))
        results.put((start, time.perf_counter()))


def prepare(conn: psycopg.Connection, jobs: int, chunks: int) -> list[list[tuple[int, int, Any]]]:
    """``jobs`` jobs sharing ``chunks`` chunks, all claimed; returns per-job lists of (chunk, attempt, token)."""
    per_job = []
    for _ in range(jobs):
        job_id = new_job(conn, chunks // jobs, chunk_size=1)
        claimed = []
        while batch := conn.execute(
            "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('bench', 1000, %s, interval '1 hour')", (job_id,)
        ).fetchall():
            claimed += batch
        per_job.append(sorted(claimed))
    return per_job


def set_counter_rows(conn: psycopg.Connection, rows: int) -> None:
    conn.execute(
        f"CREATE OR REPLACE FUNCTION chunkq._counter_slots() RETURNS integer"
        f" LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT {rows}'"
    )


def run(dsn: str, work: list[list[tuple[int, int, Any]]]) -> float:
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(len(work)), spawn.Queue()
    procs = [spawn.Process(target=complete_all, args=(dsn, w, barrier, results)) for w in work]
    for proc in procs:
        proc.start()
    spans = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return float(sum(len(w) for w in work) / elapsed)


def main() -> None:
    p = parser("completion throughput, one job versus several")
    p.add_argument("--chunks", type=int, default=4000)
    p.add_argument("--processes", type=int, default=4)
    args = p.parse_args()
    n = args.processes
    single, many, one_row = "one job", f"{n} jobs", "one job, 1 counter row"
    rates: dict[str, list[float]] = {single: [], many: [], one_row: []}
    with bench_database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        print(server_line(dsn))
        for _ in range(args.repeats):  # alternate the cases so drift hits all alike
            (chunks,) = prepare(conn, 1, args.chunks)
            rates[single].append(run(dsn, [chunks[i::n] for i in range(n)]))
            rates[many].append(run(dsn, prepare(conn, n, args.chunks)))
            set_counter_rows(conn, 1)
            (chunks,) = prepare(conn, 1, args.chunks)
            rates[one_row].append(run(dsn, [chunks[i::n] for i in range(n)]))
            set_counter_rows(conn, 16)
    print(f"{n} processes completing {args.chunks} chunks, {args.repeats} runs each:")
    for case, values in rates.items():
        print(
            f"  {case:>22}: median {statistics.median(values):,.0f} completions/s "
            f"(min {min(values):,.0f}, max {max(values):,.0f})"
        )

    def ratio(a: str, b: str) -> float:
        return statistics.median(rates[a]) / statistics.median(rates[b])

    print(f"  {single} / {many} = {ratio(single, many):.2f}; {one_row} / {many} = {ratio(one_row, many):.2f}")


if __name__ == "__main__":
    main()
