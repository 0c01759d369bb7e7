"""Progress of a 1M-chunk job at 0 %, 50 % and 99 %: chunkq.job_progress versus counting the chunks.

    python -m bench.progress [--dsn DSN] [--chunks 1000000]

job_progress sums at most 16 counter rows; the comparison is the obvious query,
a GROUP BY over the job's chunks through the (job_id, chunk_index) index.
"""

from __future__ import annotations

import time

import psycopg

from bench.common import bench_database, median_ms, new_job, one, parser, server_line
from chunkq.records import Lease
from chunkq.sync import JobChunkRepository

COUNT_QUERY = "SELECT status, count(*) FROM chunkq.job_chunks WHERE job_id = %s GROUP BY status"


def advance_to(conn: psycopg.Connection, job_id: int, fraction: float, total: int) -> None:
    """Claims and completes chunks, 1000 per call (complete_and_claim), until ``fraction`` are completed."""
    chunks = JobChunkRepository(conn)
    done: int = one(conn, "SELECT completed_chunks FROM chunkq.job_progress(%s)", (job_id,))[0]
    held: list[Lease] = []
    while done + len(held) < int(total * fraction) or held:
        want = max(0, min(1000, int(total * fraction) - done - len(held)))
        claimed = chunks.complete_and_claim(held, "bench", limit=want, job_id=job_id)
        done += len(held)
        held = [chunk.lease for chunk in claimed]


def main() -> None:
    p = parser("progress latency on a large job")
    p.add_argument("--chunks", type=int, default=1_000_000)
    args = p.parse_args()
    with bench_database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        print(server_line(dsn))
        job_id = new_job(conn, args.chunks, chunk_size=500, split=False)
        start = time.perf_counter()
        JobChunkRepository(conn).create_for_job(job_id)
        created = time.perf_counter() - start
        print(f"create_chunks: {args.chunks:,} chunks in {created:.2f} s ({args.chunks / created:,.0f} chunks/s)")
        conn.execute("VACUUM ANALYZE chunkq.job_chunks")
        print(f"{'done':>6} | {'job_progress ms (median, min-max)':>34} | {'GROUP BY count ms (median, min-max)':>36}")
        for fraction in (0.0, 0.5, 0.99):
            advance_to(conn, job_id, fraction, args.chunks)
            fast = median_ms(lambda: conn.execute("SELECT * FROM chunkq.job_progress(%s)", (job_id,)).fetchone(), 200)
            slow = median_ms(lambda: conn.execute(COUNT_QUERY, (job_id,)).fetchall(), max(3, args.repeats))
            print(
                f"{fraction:>6.0%} | {fast[0]:>12.3f} ({fast[1]:.3f}-{fast[2]:.3f}) {'':>8}"
                f"| {slow[0]:>12.1f} ({slow[1]:.1f}-{slow[2]:.1f})"
            )


if __name__ == "__main__":
    main()
