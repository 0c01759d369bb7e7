"""Shared by the benchmarks: a fresh migrated database on the server you point at, timing helpers."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

import chunkq
from chunkq.embedded import embedded_server
from chunkq.testing import TemplateDatabases


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dsn", default=os.environ.get("CHUNKQ_DSN"),
                   help="admin DSN of the server to use (default: $CHUNKQ_DSN, else an embedded Postgres)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    return p


@contextlib.contextmanager
def bench_database(admin_dsn: str | None) -> Iterator[str]:
    """A new database with the chunkq schema on the given server (or an embedded one); dropped afterwards."""
    with contextlib.ExitStack() as stack:
        if admin_dsn is None:
            admin_dsn = stack.enter_context(embedded_server())
        dbs = TemplateDatabases(admin_dsn, prefix="chunkq_bench")
        name = dbs.create(template=False)
        dsn = dbs.dsn(name)
        with psycopg.connect(dsn, autocommit=True) as conn:  # durable commits, as in production
            conn.execute(f'ALTER DATABASE "{name}" RESET synchronous_commit')
        chunkq.migrate(dsn)
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


def server_line(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        version, fsync, sync = one(conn, "SELECT current_setting('server_version'), current_setting('fsync'),"
                                         " current_setting('synchronous_commit')")
    return f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync}, {os.cpu_count()} CPUs"


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
        done = subprocess.run([*command, "-f", file.name, str(params["dbname"])],
                              capture_output=True, text=True, env=env)
    if done.returncode != 0 or "tps = " not in done.stdout:
        raise RuntimeError(f"pgbench failed: {done.stderr.strip()[-500:]}")
    return float(re.search(r"tps = ([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]


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
