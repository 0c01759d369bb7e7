"""The scheduler, measured: fair share across jobs, a key's rate limit and a job's cap, the claim's cost.

    python -m bench.scheduler [--dsn DSN] [--quick] [--seconds 60]

1. fairness   a pool of 4 processes, a handler of about 5 ms per chunk: a job of 500
              chunks alone, then jobs of 200,000 / 20,000 / 500 chunks created in that
              order (same priority): how long the 500-chunk job takes in each case, and
              with weight 2 (half the pool: about 2x alone, where equal shares give 3x); then
              three jobs that all have work for --seconds (200,000 / 20,000 / 20,000, one
              of weight 2): each job's share of the claims and Jain's fairness index
              (of the shares divided by the weights);
2. limits     a key limited to 50 chunks/s in bursts of 10 with 8 processes: the most
              chunks claimed in any 1 s window and the average rate; a job capped at 3
              running chunks with 8 processes: the most chunks the handler saw at once;
3. claim cost claim_chunks(1) p50 from one connection with one job, and with 100 jobs
              that all have work (fair share across them).

The no-op drains with no limits set, this schema against the one before, are
bench.versus's: python -m bench.versus --baseline REF.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from bench.common import bench_database, parser, server_line, wait_for_connections
from chunkq.sync import CrawlJobRepository, JobChunkRepository, RateLimitRepository

ROOT = Path(__file__).resolve().parents[1]
HANDLER_SECONDS = 0.005


@contextmanager
def pool(dsn: str, processes: int, handler: str, env: dict[str, str]) -> Iterator[None]:
    """A worker pool of this checkout, connected and idle when the block starts; drained after it."""
    with tempfile.TemporaryFile() as log, psycopg.connect(dsn, autocommit=True) as conn:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers",
                "--dsn",
                dsn,
                "--handler",
                handler,
                "--processes",
                str(processes),
                "--poll",
                "0.2",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env},
        )
        try:
            wait_for_connections(conn, processes + 1)
            yield
        finally:
            proc.terminate()
            proc.wait(60)


def make_job(conn: psycopg.Connection, chunks: int, **options: object) -> int:
    job = CrawlJobRepository(conn).create(
        project_id=1,
        name="bench",
        max_images=chunks,
        chunk_size=1,
        **options,  # type: ignore[arg-type]
    )
    JobChunkRepository(conn).create_for_job(job.id)
    return job.id


def seconds_to_finish(conn: psycopg.Connection, job_id: int, timeout: float = 600) -> float:
    """From the job's creation to its end (its own timestamps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT extract(epoch FROM finished_at - created_at) FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)
        ).fetchone()
        if row and row[0] is not None:
            return float(row[0])
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


def clean(conn: psycopg.Connection) -> None:
    conn.execute(
        "TRUNCATE chunkq.crawl_jobs, chunkq.job_chunks, chunkq.job_chunk_counts, chunkq.chunk_errors,"
        " chunkq.rate_limits"
    )
    conn.execute("VACUUM ANALYZE chunkq.job_chunks")


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def fairness(dsn: str, seconds: float, quick: bool) -> None:
    env = {"CHUNKQ_SAMPLE_SECONDS_PER_IMAGE": str(HANDLER_SECONDS), "CHUNKQ_SAMPLE_FAILURE_RATE": "0"}
    small = 100 if quick else 500
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE chunkq.settings SET max_chunks_per_job = 1000000")
        clean(conn)
        with pool(dsn, 4, "workers.sample:crawl", env):
            alone = seconds_to_finish(conn, make_job(conn, small))
        clean(conn)
        with pool(dsn, 4, "workers.sample:crawl", env):
            big = make_job(conn, 20_000 if quick else 200_000)
            make_job(conn, 2_000 if quick else 20_000)
            together = seconds_to_finish(conn, make_job(conn, small))
            conn.execute("SELECT chunkq.cancel_job(id) FROM chunkq.crawl_jobs WHERE finished_at IS NULL")
        # Equal shares of three jobs make the small one take about 3x its time alone; a weight of 2 gives it
        # half the pool (2x alone), at the price of fairness by count, which is what a weight asks for.
        clean(conn)
        with pool(dsn, 4, "workers.sample:crawl", env):
            make_job(conn, 20_000 if quick else 200_000)
            make_job(conn, 2_000 if quick else 20_000)
            weighted = seconds_to_finish(conn, make_job(conn, small, weight=2))
            conn.execute("SELECT chunkq.cancel_job(id) FROM chunkq.crawl_jobs WHERE finished_at IS NULL")
        print(f"\n1. Fairness, a pool of 4 processes, about {HANDLER_SECONDS * 1000:.0f} ms per chunk")
        print(
            f"   the {small}-chunk job alone: {alone:.2f} s; created after jobs of 200,000 and 20,000 chunks:"
            f" {together:.2f} s = {together / alone:.2f} x alone (first in, first out it would wait for both;"
            f" a third of the pool makes it 3 x); with weight 2: {weighted:.2f} s = {weighted / alone:.2f} x alone"
        )
        del big

        clean(conn)
        weights = (1.0, 1.0, 2.0)
        with pool(dsn, 4, "workers.sample:crawl", env):
            jobs = [make_job(conn, n, weight=w) for n, w in zip((200_000, 20_000, 20_000), weights, strict=True)]
            time.sleep(seconds)
            shares: Counter[int] = Counter(
                dict(
                    conn.execute(
                        "SELECT job_id, count(*) FROM chunkq.job_chunks WHERE attempt > 0 GROUP BY job_id"
                    ).fetchall()
                )
            )
            conn.execute("SELECT chunkq.cancel_job(id) FROM chunkq.crawl_jobs WHERE finished_at IS NULL")
        claims = [shares[j] for j in jobs]
        per_weight = [c / w for c, w in zip(claims, weights, strict=True)]
        print(
            f"   three jobs with work for {seconds:.0f} s (200,000 / 20,000 / 20,000 chunks, weights 1 / 1 / 2):"
            f" claims {claims[0]:,} / {claims[1]:,} / {claims[2]:,}; Jain index of claims per weight"
            f" {jain(per_weight):.3f}"
        )


def limits(dsn: str, quick: bool) -> None:
    seconds = 5 if quick else 20
    with psycopg.connect(dsn, autocommit=True) as conn:
        clean(conn)
        RateLimitRepository(conn).set("site", rate=50, burst=10)
        with pool(dsn, 8, "workers.sample:noop", {}):
            job_id = make_job(conn, 5_000, rate_key="site")
            time.sleep(seconds)
            conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
        times = sorted(
            row[0]
            for row in conn.execute(
                "SELECT extract(epoch FROM claimed_at)::float FROM chunkq.job_chunks WHERE job_id = %s AND attempt > 0",
                (job_id,),
            )
        )
        most = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
        steady = [t for t in times if t >= times[0] + 1.0]  # after the first second (the burst)
        rate = (len(steady) - 1) / (steady[-1] - steady[0])
        print("\n2. Limits, 8 processes")
        print(
            f"   a key of 50 chunks/s in bursts of 10: {len(times):,} claims in {seconds} s; most in any 1 s window"
            f" {most} (bound 60); average rate after the first second {rate:.1f}/s ({rate / 50 - 1:+.1%})"
        )

        clean(conn)
        with tempfile.NamedTemporaryFile("r") as marks:
            env = {"CHUNKQ_TEST_SLEEP": "0.02", "CHUNKQ_TEST_MARK": marks.name}
            with pool(dsn, 8, "tests.helpers.handlers:record_overlap", env):
                capped = make_job(conn, 200 if quick else 1_000, max_running=3)
                make_job(conn, 200 if quick else 1_000)
                seconds_to_finish(conn, capped)
            runs = [line.split() for line in Path(marks.name).read_text().splitlines()]
        events = sorted(
            [(float(s), 1) for j, s, _ in runs if int(j) == capped]
            + [(float(e), -1) for j, _, e in runs if int(j) == capped]
        )
        most = now = 0
        for _, step in events:
            now += step
            most = max(most, now)
        print(f"   a job capped at 3 running chunks, beside an uncapped one: at most {most} of its chunks ran at once")


def claim_cost(dsn: str, quick: bool) -> None:
    claims = 300 if quick else 2_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        results: dict[int, list[float]] = {1: [], 100: []}
        for jobs in [1, 100] * (1 if quick else 3):
            clean(conn)
            for _ in range(jobs):
                make_job(conn, claims // jobs + claims)
            conn.execute("VACUUM ANALYZE chunkq.job_chunks")
            repo = JobChunkRepository(conn)
            samples = []
            seen = set()
            for _ in range(claims):
                start = time.perf_counter()
                (chunk,) = repo.claim("bench")
                samples.append((time.perf_counter() - start) * 1000)
                seen.add(chunk.job_id)
                repo.complete(chunk.id, chunk.attempt, chunk.lease_token)
            results[jobs].append(statistics.median(samples))
            print(
                f"   {jobs} job{'s' if jobs > 1 else ''} with work: claim p50 {results[jobs][-1]:.3f} ms"
                f" ({len(seen)} jobs served)",
                flush=True,
            )
        one, many = statistics.median(results[1]), statistics.median(results[100])
        print(f"   medians: 1 job {one:.3f} ms, 100 jobs {many:.3f} ms; 100 jobs / 1 job: {many / one:.2f}")


def main() -> None:
    p = parser("the scheduler: fair share, rate limits, caps, claim cost")
    p.add_argument("--quick", action="store_true", help="everything small (seconds)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long three jobs share the pool (default 60)")
    args = p.parse_args()
    with bench_database(args.dsn) as dsn:
        print(server_line(dsn))
        fairness(dsn, 5.0 if args.quick else args.seconds, args.quick)
        limits(dsn, args.quick)
        print("\n3. Claim cost, one connection")
        claim_cost(dsn, args.quick)


if __name__ == "__main__":
    main()
