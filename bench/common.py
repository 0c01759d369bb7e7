"""Shared by the benchmarks: a fresh migrated database on the server you point at, timing helpers."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

import chunkq
from chunkq.embedded import embedded_server
from chunkq.sync import CrawlJobRepository, JobChunkRepository
from chunkq.testing import TemplateDatabases, other_connections


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--dsn",
        default=os.environ.get("CHUNKQ_DSN"),
        help="admin DSN of the server to use (default: $CHUNKQ_DSN, else an embedded Postgres)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    return p


@contextlib.contextmanager
def bench_database(admin_dsn: str | None, checkout: Path | None = None) -> Iterator[str]:
    """A new database with the chunkq schema on the given server (or an embedded one); dropped afterwards.
    With ``checkout``, the schema is that of another copy of chunkq (its migrations, applied by its code)."""
    with contextlib.ExitStack() as stack:
        if admin_dsn is None:
            admin_dsn = stack.enter_context(embedded_server())
        dbs = TemplateDatabases(admin_dsn, prefix="chunkq_bench")
        name = dbs.create(template=False)
        dsn = dbs.dsn(name)
        with psycopg.connect(dsn, autocommit=True) as conn:  # durable commits, as in production
            conn.execute(f'ALTER DATABASE "{name}" RESET synchronous_commit')
        if checkout is None:
            chunkq.migrate(dsn)
        else:
            subprocess.run(
                [sys.executable, "-c", "import sys, chunkq; chunkq.migrate(sys.argv[1])", dsn], cwd=checkout, check=True
            )
        try:
            yield dsn
        finally:
            dbs.drop(name)


def one(conn: psycopg.Connection[Any], query: str, params: Sequence[object] = ()) -> tuple[Any, ...]:
    """The one row a query returns."""
    row: tuple[Any, ...] | None = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError(f"no row from {query}")
    return row


def allow_chunks_per_job(conn: psycopg.Connection[Any], chunks: int) -> None:
    """Raises the deployment's guard against absurdly large jobs (a documented setting) if needed."""
    conn.execute("UPDATE chunkq.settings SET max_chunks_per_job = %s WHERE max_chunks_per_job < %s", (chunks, chunks))


def new_job(conn: psycopg.Connection[Any], chunks: int, chunk_size: int, *, split: bool = True) -> int:
    """A job of ``chunks`` chunks of ``chunk_size`` images, through the client API; split into its
    chunks unless ``split`` is false (then ``JobChunkRepository.create_for_job`` does it later). Its id."""
    allow_chunks_per_job(conn, chunks)
    job = CrawlJobRepository(conn).create(
        project_id=1, name="bench", max_images=chunks * chunk_size, chunk_size=chunk_size
    )
    if split:
        JobChunkRepository(conn).create_for_job(job.id)
    return job.id


def vacuum_queue(conn: psycopg.Connection[Any]) -> None:
    """VACUUM ANALYZE of both queue tables, so that one measurement does not pay for the last one's dead rows."""
    conn.execute("VACUUM ANALYZE chunkq.job_chunks")
    conn.execute("VACUUM ANALYZE chunkq.job_chunk_counts")


def server_line(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        version, fsync, sync = one(
            conn,
            "SELECT current_setting('server_version'), current_setting('fsync'), current_setting('synchronous_commit')",
        )
    return f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync}, {os.cpu_count()} CPUs"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A markdown table under a heading, as docs/benchmarks.md shows them."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def median_ms(call: Callable[[], object], times: int) -> tuple[float, float, float]:
    """Median, min and max wall time of ``call`` in milliseconds."""
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), min(samples), max(samples)


def pgbench(dsn: str, script: str, clients: int, transactions: int) -> float:
    """Runs ``script`` with pgbench, ``clients`` at once, ``transactions`` runs of it in all; its runs/s."""
    binary = shutil.which("pgbench") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))), None)
    if binary is None:
        raise RuntimeError("pgbench not found: install PostgreSQL's client tools (Debian: postgresql-contrib)")
    params = conninfo_to_dict(dsn)
    command = [str(binary), "-n", "-c", str(clients), "-j", str(clients), "-t", str(max(1, transactions // clients))]
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
        if params.get(key):
            command += [flag, str(params[key])]
    env = {**os.environ, "PGPASSWORD": str(params.get("password") or "")}
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as file:
        file.write(script)
        file.flush()
        done = subprocess.run(
            [*command, "-f", file.name, str(params["dbname"])], capture_output=True, text=True, env=env
        )
    if done.returncode != 0 or "tps = " not in done.stdout:
        raise RuntimeError(f"pgbench failed: {done.stderr.strip()[-500:]}")
    return float(re.search(r"tps = ([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """User + system CPU seconds each of the given processes has used so far (Linux /proc; a process
    that is gone is left out)."""
    seconds = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return seconds


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid``."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def postgres_pids(conn: psycopg.Connection[Any]) -> list[int] | None:
    """Every process of the server, if it runs on this machine (its backend for ``conn`` is in /proc);
    None for a remote server, whose CPU cannot be read from here."""
    backend = conn.info.backend_pid
    if not Path(f"/proc/{backend}").exists():
        return None
    postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
    return [postmaster, *children(postmaster)]


def wait_for_connections(conn: psycopg.Connection[Any], at_least: int, timeout: float = 60.0) -> None:
    """Waits until ``at_least`` other sessions are connected to conn's database and their number has
    held still for a second: the workers have started, connected and are waiting for work."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(other_connections(conn))
        if count != last:
            last, since = count, time.monotonic()
        elif count >= at_least and time.monotonic() - since >= 1.0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the workers did not connect: {last} sessions after {timeout:.0f} s, wanted {at_least}")


@dataclass(frozen=True)
class Drain:
    """One drain of a queue by a system's workers: what it measured."""

    rate: float  # jobs (chunks) per second, first claim to last completion, from the system's own records
    worker_cpu_ms: float  # CPU of the worker processes per job, from the enqueue to the queue empty
    postgres_cpu_ms: float | None  # CPU of the whole server per job over the same span (None: remote server)


class CpuMeter:
    """CPU of the worker processes and of the whole server between start() and stop(), process by
    process (a process started meanwhile counts from 0; one that exited meanwhile is missed)."""

    def __init__(self, conn: psycopg.Connection[Any], workers: Callable[[], list[int]]) -> None:
        self.conn, self.workers = conn, workers
        self.local_server = postgres_pids(conn) is not None

    def _read(self) -> tuple[dict[int, float], dict[int, float]]:
        server = postgres_pids(self.conn) if self.local_server else None
        return cpu_seconds(self.workers()), cpu_seconds(server or [])

    def start(self) -> None:
        self.before = self._read()

    def stop(self, rate: float, jobs: int) -> Drain:
        worker, server = (
            sum(now - then.get(pid, 0.0) for pid, now in after.items())
            for after, then in zip(self._read(), self.before, strict=True)
        )
        return Drain(rate, worker / jobs * 1000, server / jobs * 1000 if self.local_server else None)


@dataclass(frozen=True)
class Summary:
    """Median, min and max of repeated measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))

    def __format__(self, spec: str) -> str:
        spec = spec or ",.0f"
        if self.low == self.high:
            return format(self.median, spec)
        return f"{self.median:{spec}} ({self.low:{spec}}-{self.high:{spec}})"
