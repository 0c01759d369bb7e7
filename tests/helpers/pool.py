"""Running ``python -m chunkq.workers`` as a real process group, and reading its JSON log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Pool:
    def __init__(self, dsn: str, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.dsn, self.log_path = dsn, log
        self.log = log.open("w")
        command = [sys.executable, "-m", "chunkq.workers", "--dsn", dsn, "--log-format", "json", *args]
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """SIGTERM and wait for the drain; the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def text(self) -> str:
        return self.log_path.read_text()

    def outcomes(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == "chunk"]

    def worker_pids(self) -> list[int]:
        return [line["pid"] for line in self.lines() if line.get("message") == "worker started"]


def alive(pid: int) -> bool:
    """False once the process is gone or a zombie (dead, not yet reaped by whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and line.split()[1] == "Z" for line in status)
    except FileNotFoundError:
        return False


def progress(dsn: str, job_id: int | None = None) -> dict[str, int]:
    """Chunk counts by status, over one job or all."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT status::text, count(*) FROM chunkq.job_chunks WHERE %(job)s::bigint IS NULL OR job_id = %(job)s"
            " GROUP BY 1",
            {"job": job_id},
        ).fetchall()
    return dict(rows)


def chunk_row(dsn: str, job_id: int, index: int) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(
            "SELECT id, status::text AS status, attempt, retry_count, worker_id FROM chunkq.job_chunks"
            " WHERE job_id = %s AND chunk_index = %s",
            (job_id, index),
        )
        names = [c.name for c in cur.description]
        return dict(zip(names, cur.fetchone(), strict=True))
