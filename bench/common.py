"""Shared by the benchmarks: a fresh migrated database on the server you point at, timing helpers."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import psycopg

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


def server_line(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        version, fsync, sync = conn.execute(
            "SELECT current_setting('server_version'), current_setting('fsync'),"
            " current_setting('synchronous_commit')"
        ).fetchone()
    return f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync}, {os.cpu_count()} CPUs"


def median_ms(call: Callable[[], object], times: int) -> tuple[float, float, float]:
    """Median, min and max wall time of ``call`` in milliseconds."""
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), min(samples), max(samples)
