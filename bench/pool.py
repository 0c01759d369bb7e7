"""chunkq end to end: the worker pool (python -m workers) draining pre-created chunks with a no-op handler.

Timed like the peers in bench/peers.py, from the queue's own records: first
claim to last completion (claimed_at, finished_at), so that interpreter start-up
is left out for every system alike. Meanwhile the resident memory of the
supervisor and of each worker process is sampled from /proc (Linux).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from bench.ceiling import fresh_chunks
from bench.common import one

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Drain:
    rate: float  # chunks/s
    supervisor_mb: float  # peak resident memory
    worker_mb: float  # peak resident memory of the largest worker


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def drain(dsn: str, conn: psycopg.Connection, processes: int, batch: int, chunks: int) -> Drain:
    job_id = fresh_chunks(conn, chunks)
    peak = {"supervisor": 0.0, "worker": 0.0}
    done = threading.Event()
    with tempfile.TemporaryFile() as log:
        pool = subprocess.Popen(
            [sys.executable, "-m", "workers", "--dsn", dsn, "--handler", "workers.sample:noop",
             "--processes", str(processes), "--batch", str(batch), "--job", str(job_id),
             "--log-level", "warning"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def sample() -> None:
            while not done.wait(0.5):
                peak["supervisor"] = max(peak["supervisor"], rss_mb(pool.pid))
                peak["worker"] = max([peak["worker"], *(rss_mb(child) for child in children(pool.pid))])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            while one(conn, "SELECT pending_chunks + processing_chunks FROM chunkq.job_progress(%s)", (job_id,))[0]:
                if pool.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the pool exited early:\n{log.read().decode()[-2000:]}")
                time.sleep(0.05)
        finally:
            done.set()
            pool.send_signal(signal.SIGTERM)
            pool.wait(60)
    seconds = one(conn, "SELECT extract(epoch FROM max(finished_at) - min(claimed_at)) FROM chunkq.job_chunks"
                        " WHERE job_id = %s", (job_id,))[0]
    return Drain(chunks / float(seconds), peak["supervisor"], peak["worker"])
