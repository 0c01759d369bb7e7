"""Two peer Postgres job queues, PGQueuer and procrastinate, measured for the table beside chunkq.

    python -m bench.peers --dsn DSN [--jobs 5000]

Each measurement gets a fresh database on the server of the admin DSN, with the
peer's own schema, dropped afterwards. Server settings are left as they are
(durable commits), the same for every system.

drain_rate: two worker processes run the peer at its documented settings for two
cores; once they are connected and waiting, ``jobs`` no-op jobs are bulk-enqueued
in one call, and the workers empty the queue. The rate is taken from the peer's
own records, first claim to last completion, as bench.pool does for chunkq:
interpreter start-up and shutdown are left out for every system alike. CPU of
the worker processes and of the server is counted from the enqueue to the empty queue.

- PGQueuer: ``pgqueuer.run``, what ``pgq run`` runs (on uvloop, as ``pgq run``
  does), a QueueManager on one psycopg 3 async connection, batch size 10,
  ``max_concurrent_tasks=20``: the cap is per process and PGQueuer refuses one
  under twice the batch size, so 20 is the tightest it allows with batches of 10.
  Schema: what ``pgq install`` then ``pgq autovac`` (its performance checklist) run.
- procrastinate: ``procrastinate worker --concurrency 10`` with a
  PsycopgConnector whose pool holds concurrency + 1 connections, which its docs
  ask for when jobs are short. Schema: ``app.schema_manager.apply_schema_async()``.

enqueue_rate: the peer's bulk-enqueue call, timed alone (schema and connection
set up beforehand): ``Queries.enqueue`` with lists, ``Task.batch_defer_async``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench.common import CpuMeter, Drain, wait_for_connections

if TYPE_CHECKING:
    import procrastinate
    from pgqueuer import Job, QueueManager

PEERS: tuple[str, ...] = ("pgqueuer", "procrastinate")

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2
CONCURRENCY = 10  # no-op jobs in flight per worker process
#: PGQueuer's documented batch size is 10; bench/__main__.py also runs it at chunkq's larger batch.
PGQUEUER_BATCH = int(os.environ.get("PEERS_PGQUEUER_BATCH", "10"))
NOOP = "noop"  # the entrypoint / task name
# The worker processes load our factory and app by import path, which takes no
# arguments: they find their database here.
DSN_ENV = "PEERS_BENCH_DSN"

WORKER_COMMANDS: dict[str, list[str]] = {
    # pgqueuer.run is `pgq run` without the CLI, which fails at start-up under typer 0.29
    # (its --log-level parser); uvloop is the loop `pgq run` picks.
    "pgqueuer": [
        sys.executable,
        "-c",
        "import uvloop, pgqueuer, bench.peers as p; uvloop.run(pgqueuer.run("
        "p.pgqueuer_manager, batch_size=p.PGQUEUER_BATCH, max_concurrent_tasks=2 * p.PGQUEUER_BATCH))",
    ],
    # Its CLI logs two INFO lines a job by default: that would measure logging, not the queue.
    "procrastinate": [
        sys.executable,
        "-m",
        "procrastinate",
        "--app",
        "bench.peers.procrastinate_app",
        "--log-level",
        "warning",
        "worker",
        "--concurrency",
        str(CONCURRENCY),
    ],
}
#: Jobs not yet done. PGQueuer deletes a job when it is done (its log keeps the record).
REMAINING = {
    "pgqueuer": "SELECT count(*) FROM pgqueuer",
    "procrastinate": "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
}
#: Jobs that succeeded, and seconds from the first claim to the last completion, as the peer logs them.
DONE_SPAN = {
    "pgqueuer": """
        SELECT count(*) FILTER (WHERE status = 'successful'),
               extract(epoch FROM max(created) FILTER (WHERE status = 'successful')
                                - min(created) FILTER (WHERE status = 'picked'))
          FROM pgqueuer_log""",
    "procrastinate": """
        SELECT count(*) FILTER (WHERE type = 'succeeded'),
               extract(epoch FROM max(at) FILTER (WHERE type = 'succeeded')
                                - min(at) FILTER (WHERE type = 'started'))
          FROM procrastinate_events""",
}


def peer_versions() -> dict[str, str]:
    try:
        return {peer: importlib.metadata.version(peer) for peer in PEERS}
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(f"{exc.name} is not installed: pip install -e '.[bench]'") from exc


def drain_rate(peer: str, admin_dsn: str, jobs: int, batch: int | None = None) -> Drain:
    """PROCESSES worker processes emptying a queue of ``jobs`` no-op jobs: jobs/s and CPU per job;
    ``batch`` is PGQueuer's batch size (default PGQUEUER_BATCH)."""
    with (
        fresh_database(admin_dsn) as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
        tempfile.TemporaryFile() as log,
    ):
        asyncio.run(INSTALL[peer](dsn))
        env = {**os.environ, DSN_ENV: dsn, "PEERS_PGQUEUER_BATCH": str(batch or PGQUEUER_BATCH)}
        workers = [
            subprocess.Popen(
                WORKER_COMMANDS[peer], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            for _ in range(PROCESSES)
        ]
        meter = CpuMeter(conn, lambda: [w.pid for w in workers])
        try:
            wait_for_connections(conn, PROCESSES)
            meter.start()
            asyncio.run(ENQUEUE[peer](dsn, jobs))
            while one_row(conn, REMAINING[peer])[0]:
                if any(w.poll() is not None for w in workers):
                    raise RuntimeError(f"a {peer} worker exited early:\n{tail(log)}")
                time.sleep(0.2)
            done, seconds = one_row(conn, DONE_SPAN[peer])
            measured = meter.stop(jobs / float(seconds), jobs)
        finally:
            stop(workers)
    if done != jobs:
        raise RuntimeError(f"{peer}: {done} of {jobs} jobs succeeded")
    return measured


def enqueue_rate(peer: str, admin_dsn: str, jobs: int) -> float:
    """Jobs/s of one bulk-enqueue call of ``jobs`` no-op jobs (schema and connection set up beforehand)."""
    with fresh_database(admin_dsn) as dsn:
        asyncio.run(INSTALL[peer](dsn))
        return jobs / asyncio.run(ENQUEUE[peer](dsn, jobs))


@contextlib.contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    name = f"peers_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            # FORCE first terminates whatever is still connected (a worker that
            # would not stop, a pool closing late): the drop must not fail on it.
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, which both peers take as a graceful shutdown; SIGKILL whatever still runs after 30 s."""
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def one_row(conn: psycopg.Connection[tuple[Any, ...]], query: str) -> tuple[Any, ...]:
    row = conn.execute(query).fetchone()
    assert row is not None  # an aggregate without GROUP BY returns one row
    return row


def tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


async def install_pgqueuer(dsn: str) -> None:
    from pgqueuer import Queries
    from pgqueuer.db import PsycopgDriver

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        queries = Queries(PsycopgDriver(conn))
        await queries.install()  # what `pgq install` runs (durable tables, the default)
        await queries.optimize_autovacuum()  # what `pgq autovac` runs


async def enqueue_pgqueuer(dsn: str, jobs: int) -> float:
    """Bulk-enqueues ``jobs`` no-op jobs; the seconds the call took."""
    from pgqueuer import Queries
    from pgqueuer.db import PsycopgDriver

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        queries = Queries(PsycopgDriver(conn))
        start = time.perf_counter()
        await queries.enqueue([NOOP] * jobs, [None] * jobs, [0] * jobs)
        return time.perf_counter() - start


async def install_procrastinate(dsn: str) -> None:
    app = procrastinate_app_for(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def enqueue_procrastinate(dsn: str, jobs: int) -> float:
    """Bulk-enqueues ``jobs`` no-op jobs; the seconds the call took."""
    app = procrastinate_app_for(dsn)
    async with app.open_async():
        start = time.perf_counter()
        await app.tasks[NOOP].batch_defer_async(*({} for _ in range(jobs)))
        return time.perf_counter() - start


INSTALL: dict[str, Callable[[str], Coroutine[Any, Any, None]]] = {
    "pgqueuer": install_pgqueuer,
    "procrastinate": install_procrastinate,
}
ENQUEUE: dict[str, Callable[[str, int], Coroutine[Any, Any, float]]] = {
    "pgqueuer": enqueue_pgqueuer,
    "procrastinate": enqueue_procrastinate,
}


# What the worker processes load.


async def pgqueuer_noop(job: Job) -> None:
    pass


@contextlib.asynccontextmanager
async def pgqueuer_manager() -> AsyncIterator[QueueManager]:
    """The worker's factory: a QueueManager on one connection, which its docs advise over a pool."""
    from pgqueuer import Queries, QueueManager
    from pgqueuer.db import PsycopgDriver

    async with await psycopg.AsyncConnection.connect(os.environ[DSN_ENV], autocommit=True) as conn:
        manager = QueueManager(Queries(PsycopgDriver(conn)))
        manager.entrypoint(NOOP)(pgqueuer_noop)
        yield manager


async def procrastinate_noop() -> None:
    pass


def procrastinate_app_for(dsn: str) -> procrastinate.App:
    import procrastinate

    # A sub-worker of a short job waits for a pool connection unless there is one per sub-worker, plus one.
    connector = procrastinate.PsycopgConnector(conninfo=dsn, min_size=CONCURRENCY + 1, max_size=CONCURRENCY + 1)
    app = procrastinate.App(connector=connector)
    app.task(name=NOOP)(procrastinate_noop)
    return app


# bench.io's I/O-bound crawl: chunkq's sample handler io_wait as a procrastinate task (the same await of
# CHUNKQ_SAMPLE_SECONDS, no CPU), run by `procrastinate --app bench.peers.procrastinate_io_app worker`.
IO_TASK = "io_wait"
#: Connections of each worker process's pool for the I/O run (PEERS_POOL_SIZE overrides).
IO_POOL_SIZE = 10


async def procrastinate_io_wait() -> None:
    from chunkq.workers.sample import io_seconds

    await asyncio.sleep(io_seconds())


def procrastinate_io_app_for(dsn: str) -> procrastinate.App:
    import procrastinate

    size = int(os.environ.get("PEERS_POOL_SIZE", IO_POOL_SIZE))
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=size, max_size=size))
    app.task(name=IO_TASK)(procrastinate_io_wait)
    return app


async def enqueue_procrastinate_io(dsn: str, jobs: int) -> None:
    app = procrastinate_io_app_for(dsn)
    async with app.open_async():
        await app.tasks[IO_TASK].batch_defer_async(*({} for _ in range(jobs)))


def __getattr__(name: str) -> object:
    # `procrastinate --app bench.peers.procrastinate_app` in a worker process.
    # Built on first use, so that importing this module needs neither peer installed.
    if name == "procrastinate_app":
        return procrastinate_app_for(os.environ[DSN_ENV])
    if name == "procrastinate_io_app":
        return procrastinate_io_app_for(os.environ[DSN_ENV])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description="drain and enqueue rates of the peer job queues")
    p.add_argument("--dsn", required=True, help="admin DSN of the server; scratch databases are made there")
    p.add_argument("--jobs", type=int, default=5_000)
    args = p.parse_args()
    versions = peer_versions()
    print(f"{args.jobs:,} no-op jobs, {PROCESSES} worker processes, jobs/s")
    print(f"{'peer':<22} | {'drain':>8} | {'enqueue':>8}")
    for peer in PEERS:
        drain = drain_rate(peer, args.dsn, args.jobs)
        enqueue = enqueue_rate(peer, args.dsn, args.jobs)
        print(f"{peer + ' ' + versions[peer]:<22} | {drain.rate:>8,.0f} | {enqueue:>8,.0f}")


if __name__ == "__main__":
    # Through the importable module rather than __main__, where procrastinate
    # warns against defining an app (its "top-level app" discussion).
    from bench.peers import main as peers_main

    peers_main()
