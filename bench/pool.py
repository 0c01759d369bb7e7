"""chunkq end to end: the worker pool (python -m workers) draining chunks with a no-op handler.

The pool starts first, on an empty job; once its workers are connected and
waiting, create_chunks adds the whole backlog in one transaction and its NOTIFY
wakes them. The rate comes from the queue's own records, first claim to last
completion (claimed_at, finished_at), as bench/peers.py does for the peers, so
interpreter start-up counts for no system. CPU of the pool's processes and of
the server is counted from create_chunks to the empty queue; the resident memory
of the supervisor and of each worker process is sampled from /proc (Linux).
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

from bench.common import CpuMeter, Drain, allow_chunks_per_job, children, one, vacuum_queue, wait_for_connections

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PoolDrain:
    drain: Drain
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


def plain_job(conn: psycopg.Connection, chunks: int) -> int:
    """A job of ``chunks`` one-image chunks, not split yet, made with the arguments create_job has taken since
    0001: bench.versus drains an older commit's database with this checkout's code, whose client names
    arguments and columns that older schemas lack."""
    allow_chunks_per_job(conn, chunks)
    return int(one(conn, "SELECT id FROM chunkq.create_job(1, 'bench', '[]', %s, NULL, NULL, 1)", (chunks,))[0])


def drain(dsn: str, conn: psycopg.Connection, processes: int, batch: int, chunks: int, root: Path = ROOT) -> PoolDrain:
    """The pool of the chunkq checkout in ``root`` (this one by default) drains a job of ``chunks`` chunks."""
    vacuum_queue(conn)
    job_id = plain_job(conn, chunks)
    peak = {"supervisor": 0.0, "worker": 0.0}
    done = threading.Event()
    with tempfile.TemporaryFile() as log:
        pool = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers",
                "--dsn",
                dsn,
                "--handler",
                "workers.sample:noop",
                "--processes",
                str(processes),
                "--batch",
                str(batch),
                "--job",
                str(job_id),
                "--log-level",
                "warning",
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def sample() -> None:
            while not done.wait(0.5):
                peak["supervisor"] = max(peak["supervisor"], rss_mb(pool.pid))
                peak["worker"] = max([peak["worker"], *(rss_mb(child) for child in children(pool.pid))])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        meter = CpuMeter(conn, lambda: [pool.pid, *children(pool.pid)])
        try:
            wait_for_connections(conn, processes + 1)  # the workers and the supervisor's LISTEN
            meter.start()
            conn.execute("SELECT total_chunks FROM chunkq.create_chunks(%s)", (job_id,))
            while one(conn, "SELECT pending_chunks + processing_chunks FROM chunkq.job_progress(%s)", (job_id,))[0]:
                if pool.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the pool exited early:\n{log.read().decode()[-2000:]}")
                time.sleep(0.05)
            seconds = one(
                conn,
                "SELECT extract(epoch FROM max(finished_at) - min(claimed_at)) FROM chunkq.job_chunks"
                " WHERE job_id = %s",
                (job_id,),
            )[0]
            measured = meter.stop(chunks / float(seconds), chunks)
        finally:
            done.set()
            pool.send_signal(signal.SIGTERM)
            pool.wait(60)
    return PoolDrain(measured, peak["supervisor"], peak["worker"])
