"""The dashboard and /metrics at scale: 1,000 jobs of 1,000 chunks (1M chunks) made through the client API, a
tenth of them crawled, some failures, a few paused jobs, chunks in flight; then `chunkq web` answers each page
many times and the server's own time (its Server-Timing header) is reported, p50 and p99.

    ./dev python -m bench.web --dsn postgresql://postgres@127.0.0.1:5432/postgres [--jobs 1000 --chunks 1000000]
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

from chunkq.sync import CrawlJobRepository, JobChunkRepository

from .common import bench_database, new_job, parser, server_line, vacuum_queue

ROOT = Path(__file__).resolve().parent.parent


def fill(dsn: str, jobs: int, chunks: int) -> int:
    """The queue a fleet in the middle of its day would have; returns a job id to show the page of."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        ids = [new_job(conn, chunks // jobs, 500) for _ in range(jobs)]
        print(f"created {jobs:,} jobs, {chunks:,} chunks in {time.perf_counter() - started:.1f} s", flush=True)
        repo, job_repo = JobChunkRepository(conn), CrawlJobRepository(conn)
        held = repo.claim("bench", limit=1000)
        done = 0
        while done < chunks // 10:  # a tenth crawled: the oldest hundred jobs finish
            held = repo.complete_and_claim([chunk.lease for chunk in held], "bench", limit=1000)
            done += 1000
        for chunk in held[:500]:  # failures, recorded, some retried
            repo.fail(
                chunk.id,
                chunk.attempt,
                f"HTTP 503 fetching image {chunk.image_start}",
                retry=chunk.id % 2 == 0,
                lease_token=chunk.lease_token,
            )
        for job_id in ids[-10:]:
            job_repo.pause(job_id)
        repo.claim("bench-in-flight", limit=200)  # held by a worker now
        vacuum_queue(conn)
        print(f"crawled {done:,} chunks, 500 failures, 10 jobs paused, 200 in flight", flush=True)
        return ids[len(ids) // 10]  # the job being crawled


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_ms(response: httpx.Response) -> float:
    return float(response.headers["server-timing"].split("dur=")[1])


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--chunks", type=int, default=1_000_000)
    p.add_argument("--requests", type=int, default=300, help="requests per page (default 300)")
    args = p.parse_args()
    with bench_database(args.dsn) as dsn:
        print(server_line(dsn), flush=True)
        job_id = fill(dsn, args.jobs, args.chunks)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("CHUNKQ_WEB_TOKEN", "CHUNKQ_DSN")}
        web = subprocess.Popen(
            [sys.executable, "-m", "chunkq", "web", "--dsn", dsn, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        http.get("/healthz")
                        break
                    except httpx.TransportError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
                pages = {
                    "/metrics": "/metrics (top 20 jobs)",
                    "/": "jobs page",
                    "/api/jobs": "jobs page, live JSON",
                    "/?page=15": "jobs page 15 (offset 700)",
                    "/?status=running&name=bench": "jobs page, filtered",
                    f"/jobs/{job_id}": "a running job's page",
                    f"/api/jobs/{job_id}": "its live JSON",
                    "/workers": "workers page",
                }
                print(f"\n{'page':34} {'server p50':>11} {'p99':>8} {'client p50':>11}   ({args.requests} requests)")
                for path, what in pages.items():
                    for _ in range(20):  # warm the pool, the plans and the caches
                        http.get(path).raise_for_status()
                    server, client = [], []
                    for _ in range(args.requests):
                        started = time.perf_counter()
                        response = http.get(path)
                        client.append((time.perf_counter() - started) * 1000)
                        response.raise_for_status()
                        server.append(server_ms(response))
                    print(
                        f"{what:34} {statistics.median(server):8.1f} ms {percentile(server, 0.99):5.1f} ms"
                        f" {statistics.median(client):8.1f} ms",
                        flush=True,
                    )
        finally:
            os.killpg(web.pid, signal.SIGTERM)
            web.wait(30)


if __name__ == "__main__":
    main()
