"""Server CPU of the worker's call, complete_and_claim, on this schema and on the one before it.

    python -m bench.hot_path [--dsn DSN] [--calls 2000] [--repeats 5]

Two fresh databases on the same (local) server: one migrated to the newest
schema, one rolled back by one migration. In each, one connection completes the
chunk it holds and claims the next, ``--calls`` times, with the call the client
makes (JobChunkRepository.complete_and_claim; the same SQL on both schemas, with
the lease tokens where the schema has them), with one chunk and then 100 per call, on
a job just created, then again with the table analyzed by hand after creating it.
The CPU its backend used is read from /proc, so the server must run on this
machine (the embedded one does). Repeats alternate between the two databases;
the table shows medians, min-max and the ratio of the medians.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import psycopg

import chunkq
from bench.common import Summary, bench_database, cpu_seconds, new_job, one, parser, server_line

BATCHES = (1, 100)
#: As a user gets it (the job just created), then with the table analyzed by hand:
#: the second leaves out what 0007 changed about plans made on stale statistics.
CASES = ((1, False), (100, False), (1, True), (100, True))


def add_calls_option(p: argparse.ArgumentParser) -> None:
    """--calls, shared with bench.call_profile: how many calls of one chunk (see calls_of)."""

    def at_least_100(text: str) -> int:
        if int(text) < 100:
            raise argparse.ArgumentTypeError("at least 100: the calls of 100 chunks number calls // 100 * 10")
        return int(text)

    p.add_argument(
        "--calls",
        type=at_least_100,
        default=2000,
        help="calls of one chunk; the case of 100 chunks per call makes a tenth as many calls (at least 100)",
    )


def calls_of(batch: int, calls: int) -> int:
    """The calls made with ``batch`` chunks each: ``calls`` of one chunk, else a tenth as many of 100."""
    return calls if batch == 1 else calls // batch * 10


def worker_calls(conn: psycopg.Connection, batch: int, calls: int, analyze: bool = False) -> Callable[[], None]:
    """Sets up a job just created for ``calls`` complete_and_claim calls of ``batch`` chunks from ``conn``,
    the first batch already claimed (with ``analyze``, the table analyzed after creating the job);
    returns what makes the calls, so that the caller can measure them alone."""
    job_id = new_job(conn, batch * (calls + 1), chunk_size=1)
    if analyze:
        conn.execute("ANALYZE chunkq.job_chunks")
    tokens = (
        one(
            conn,
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'chunkq.job_chunks'::regclass"
            " AND attname = 'lease_token'",
        )[0]
        == 1
    )  # since 0008
    sql = (
        "SELECT id, attempt" + (", lease_token" if tokens else "") + " FROM chunkq.complete_and_claim("
        "%(ids)s::bigint[], %(attempts)s::integer[], 'bench', %(limit)s::integer, %(job)s::bigint, NULL"
        + (", %(tokens)s::uuid[]" if tokens else "")
        + ")"
    )

    def complete_and_claim(held: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        params = {
            "ids": [h[0] for h in held],
            "attempts": [h[1] for h in held],
            "limit": batch,
            "job": job_id,
            "tokens": [h[-1] for h in held],
        }
        return conn.execute(sql, params).fetchall()

    held = complete_and_claim([])

    def make_calls() -> None:
        nonlocal held
        for _ in range(calls):
            held = complete_and_claim(held)

    return make_calls


def cpu_per_chunk(conn: psycopg.Connection, batch: int, calls: int, analyze: bool) -> float:
    """Microseconds of backend CPU per chunk over ``calls`` complete_and_claim calls of ``batch`` chunks,
    on a job just created (and, with ``analyze``, the table analyzed after it)."""
    make_calls = worker_calls(conn, batch, calls, analyze)
    backend = conn.info.backend_pid
    before = cpu_seconds([backend])[backend]
    make_calls()
    return (cpu_seconds([backend])[backend] - before) / (calls * batch) * 1e6


def main() -> None:
    p = parser("server CPU of complete_and_claim, this schema against the one before")
    add_calls_option(p)
    p.set_defaults(repeats=5)
    args = p.parse_args()
    samples: dict[tuple[str, int, bool], list[float]] = {}
    with ExitStack() as stack:
        newest = stack.enter_context(bench_database(args.dsn))
        previous = stack.enter_context(bench_database(args.dsn))
        (newest_migration,) = chunkq.rollback(previous, steps=1)
        before_last = f"before {newest_migration}"
        print(server_line(newest))
        schemas = {"newest": newest, before_last: previous}
        for _ in range(args.repeats):
            for name, dsn in schemas.items():
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(
                        "TRUNCATE chunkq.crawl_jobs, chunkq.job_chunks, chunkq.job_chunk_counts, chunkq.chunk_errors"
                    )
                    for batch, analyze in CASES:
                        value = cpu_per_chunk(conn, batch, calls_of(batch, args.calls), analyze)
                        samples.setdefault((name, batch, analyze), []).append(value)
                        print(
                            f"    {name} batch {batch}{' analyzed' if analyze else ''}: {value:.0f} us/chunk",
                            flush=True,
                        )
    print(f"\n| chunks per call | table | newest schema, us/chunk | {before_last}, us/chunk | newest / older |")
    print("|---|---|---:|---:|---:|")
    for batch, analyze in CASES:
        new = Summary.of(samples[("newest", batch, analyze)])
        old = Summary.of(samples[(before_last, batch, analyze)])
        table = "analyzed by hand" if analyze else "as create_chunks left it"
        print(f"| {batch} | {table} | {new:,.0f} | {old:,.0f} | {new.median / old.median:.2f} |")


if __name__ == "__main__":
    main()
