"""chunkq: operate the chunk queue from a shell.

Every command is one or two calls of the SQL API, through the sync client. The
database is --dsn, else $CHUNKQ_DSN, else $DATABASE_URL, else an embedded
PostgreSQL that chunkq starts (or reuses) in a per-user directory.

Exit codes: 0 done; 1 refused by chunkq (wrong state) or a watched job ended with
failed or cancelled chunks; 2 bad usage or input; 3 no such job or chunk;
4 database unreachable; 5 schema missing or outdated (run `chunkq migrate`);
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from .. import embedded, schema
from ..errors import (
    ChunkqError,
    InvalidTransition,
    LeaseLost,
    NotFound,
    PermissionDenied,
    SchemaNotMigrated,
    ValidationError,
    one_line,
)
from ..records import ChunkStatus, JobStatus
from ..sync import CrawlJobRepository, JobChunkRepository
from . import limits
from .output import console, emit_json, errors, record, table

EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_SCHEMA, EXIT_INTERRUPTED = 1, 2, 3, 4, 5, 130

JOB_COLUMNS = [
    "id",
    "name",
    "status",
    "priority",
    "total_chunks",
    "completed_chunks",
    "failed_chunks",
    "processing_chunks",
    "completion_percentage",
    "created_at",
]
JOB_HEADERS = ["id", "name", "status", "prio", "chunks", "done", "failed", "running", "%", "created"]
CHUNK_COLUMNS = [
    "id",
    "chunk_index",
    "image_start",
    "image_end",
    "status",
    "attempt",
    "retry_count",
    "worker_id",
    "error_message",
]
CHUNK_HEADERS = ["id", "index", "first image", "last image", "status", "attempt", "retries", "worker", "last error"]


class Failure(Exception):
    """Ends the command with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------


def resolve_dsn(args: argparse.Namespace) -> str:
    dsn = (
        getattr(args, "dsn", None)
        or getattr(args, "global_dsn", None)
        or os.environ.get("CHUNKQ_DSN")
        or os.environ.get("DATABASE_URL")
    )
    if dsn:
        try:
            psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise Failure(f"invalid DSN: {exc}", EXIT_USAGE) from exc
        return dsn
    errors.print(
        f"chunkq: no CHUNKQ_DSN or DATABASE_URL: using the embedded PostgreSQL in {embedded.data_dir()}"
        " (it keeps running; `chunkq embedded stop` stops it)",
        highlight=False,
    )
    return embedded.shared_server()


def connect(args: argparse.Namespace, *, check: bool = True) -> psycopg.Connection[Any]:
    dsn = resolve_dsn(args)
    args.resolved_dsn = dsn
    try:
        # prepare_threshold=None: no server-side prepared statements. A command's calls are few (a watched
        # progress repeats one), and through PgBouncer in transaction mode each call may run on another
        # server connection, where a statement prepared on the last one does not exist.
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10, prepare_threshold=None)
    except psycopg.OperationalError as exc:
        raise Failure(f"cannot connect to the database: {one_line(exc)}", EXIT_UNREACHABLE) from exc
    if check:
        schema.check_schema(conn)
    return conn


def job_status(value: str) -> str:
    if value not in {s.value for s in JobStatus}:
        raise argparse.ArgumentTypeError(f"one of {', '.join(s.value for s in JobStatus)}")
    return value


def chunk_status(value: str) -> str:
    if value not in {s.value for s in ChunkStatus}:
        raise argparse.ArgumentTypeError(f"one of {', '.join(s.value for s in ChunkStatus)}")
    return value


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def listed(
    args: argparse.Namespace,
    rows: Sequence[Any],
    columns: Sequence[str],
    headers: Sequence[str] | None = None,
    title: str | None = None,
) -> int:
    """What a command that lists things prints: the rows as JSON, or a table of some columns."""
    if args.json:
        emit_json(rows)
    else:
        table(rows, columns, title=title, headers=headers)
    return 0


def done(args: argparse.Namespace, value: Any, sentence: str) -> int:
    """What a command that changed something prints: the value as JSON, or one sentence."""
    if args.json:
        emit_json(value)
    else:
        console.print(sentence, highlight=False)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(args)
    try:
        if args.action == "apply":
            applied = schema.migrate(dsn)
            result: Any = {"applied": applied}
            message = f"applied {', '.join(applied)}" if applied else "the schema is up to date"
        elif args.action == "rollback":
            rolled = schema.rollback(dsn, None if args.all else 1)
            result, message = {"rolled_back": rolled}, f"rolled back {', '.join(rolled) or 'nothing'}"
        else:
            rows = [{"migration": name, "applied": applied} for name, applied in schema.status(dsn)]
            return listed(args, rows, ["migration", "applied"])
    except psycopg.OperationalError as exc:
        raise Failure(f"cannot connect to the database: {one_line(exc)}", EXIT_UNREACHABLE) from exc
    return done(args, result, message)


def keywords_of(args: argparse.Namespace) -> Any:
    if args.keywords_json is not None:
        try:
            return json.loads(args.keywords_json)
        except ValueError as exc:
            raise Failure(f"--keywords-json is not JSON: {exc}", EXIT_USAGE) from exc
    return args.keyword or []


def cmd_job_create(args: argparse.Namespace) -> int:
    keywords = keywords_of(args)
    with connect(args) as conn, conn.transaction():  # the job and its chunks, or nothing
        job = CrawlJobRepository(conn).create(
            project_id=args.project,
            name=args.name,
            keywords=keywords,
            max_images=args.max_images,
            priority=args.priority,
            max_retries=args.max_retries,
            chunk_size=args.chunk_size,
            **limits.job_limits(args),
        )
        job = JobChunkRepository(conn).create_for_job(job.id)
    return done(
        args,
        job,
        f"job {job.id} created: {job.max_images:,} images in {job.total_chunks:,} chunks "
        f"of {job.chunk_size}, priority {job.priority}",
    )


def cmd_job_list(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        jobs = CrawlJobRepository(conn).overview(args.status, args.limit)
    return listed(args, jobs, JOB_COLUMNS, JOB_HEADERS)


def cmd_job_show(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        repo = CrawlJobRepository(conn)
        job = repo.get_by_id(args.job_id)
        if job is None:
            raise Failure(f"crawl job {args.job_id} does not exist", EXIT_NOT_FOUND)
        progress = repo.progress(args.job_id)
        failures = repo.error_summary(args.job_id)
    if args.json:
        emit_json({"job": job, "progress": progress, "errors": failures})
    else:
        record(job, title=f"job {job.id}")
        record(progress, title="progress")
        record(failures, title="errors")
    return 0


def cmd_job_progress(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        jobs = CrawlJobRepository(conn)
        if args.watch:
            from .watch import watch

            progress = watch(jobs, args.job_id, args.interval)
            if progress.failed_chunks or progress.cancelled_chunks:
                errors.print(
                    f"job {args.job_id} finished {progress.status}: {progress.failed_chunks} failed, "
                    f"{progress.cancelled_chunks} cancelled chunks",
                    highlight=False,
                )
                return EXIT_REFUSED
            return 0
        progress = jobs.progress(args.job_id)
    if args.json:
        emit_json(progress)
    else:
        record(progress, title=f"job {args.job_id}")
    return 0


def cmd_job_cancel(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        job = CrawlJobRepository(conn).cancel(args.job_id)
    return done(args, job, f"job {job.id} {job.status}")


def cmd_job_retry_failed(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        retried = JobChunkRepository(conn).retry_failed(args.job_id)
    return done(
        args, {"job_id": args.job_id, "retried": retried}, f"job {args.job_id}: {retried} failed chunks back to pending"
    )


def cmd_job_delete(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        job = CrawlJobRepository(conn).delete(args.job_id)
    return done(args, job, f"job {job.id} deleted with its {job.total_chunks:,} chunks")


def cmd_job_pause(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        job = CrawlJobRepository(conn).pause(args.job_id)
    return done(args, job, f"job {job.id} paused: its pending chunks wait until `chunkq job resume {job.id}`")


def cmd_job_resume(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        job = CrawlJobRepository(conn).resume(args.job_id)
    return done(args, job, f"job {job.id} {job.status}, not paused")


def cmd_job_priority(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        job = CrawlJobRepository(conn).set_priority(args.job_id, args.priority)
    return done(args, job, f"job {job.id} now has priority {job.priority}")


def cmd_prune(args: argparse.Namespace) -> int:
    """Calls prune_finished_jobs until it is done: each call is a short transaction."""
    jobs = chunks = 0
    with connect(args) as conn:
        repo = CrawlJobRepository(conn)
        while True:
            result = repo.prune(args.older_than, args.batch)
            jobs, chunks = jobs + result.jobs_deleted, chunks + result.chunks_deleted
            if result.done:
                break
    return done(
        args,
        {"jobs_deleted": jobs, "chunks_deleted": chunks},
        f"pruned {jobs:,} jobs finished more than {args.older_than} ago ({chunks:,} chunks)",
    )


def cmd_workers(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        workers = JobChunkRepository(conn).live_workers()
    return listed(
        args,
        workers,
        ["worker_id", "backend_pid", "connected_since", "chunks_held", "heartbeat_age", "next_lease_expiry"],
    )


def cmd_failures(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        kinds = JobChunkRepository(conn).failure_summary()
    return listed(
        args, kinds, ["error_kind", "occurrences", "chunks", "jobs", "ended_failed", "last_seen", "example_chunk_id"]
    )


def cmd_chunk_list(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        chunks = JobChunkRepository(conn).list_for_job(args.job, args.status, args.limit)
    return listed(args, chunks, CHUNK_COLUMNS, CHUNK_HEADERS)


def cmd_chunk_retry(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        chunk = JobChunkRepository(conn).retry(args.chunk_id)
    return done(args, chunk, f"chunk {chunk.id} of job {chunk.job_id} back to pending (retry {chunk.retry_count})")


def cmd_stats(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        chunks = JobChunkRepository(conn)
        stats, depth = chunks.stats(), chunks.depth()
    if args.json:
        emit_json({"stats": stats, "depth_by_priority": depth})
    else:
        record(stats, title="queue")
        table(
            depth, ["priority", "pending_chunks", "claimable_chunks", "oldest_pending_age"], title="pending by priority"
        )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from ..workers import __main__ as pool
    from ..workers.config import ConfigError, from_args

    args.dsn = resolve_dsn(args)
    try:
        config = from_args(args)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from exc
    return pool.run(config)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    return demo(args, resolve_dsn(args))


def cmd_embedded(args: argparse.Namespace) -> int:
    if args.action == "stop":
        stopped = embedded.stop_shared_server()
        console.print(
            f"embedded PostgreSQL in {embedded.data_dir()} {'stopped' if stopped else 'was not running'}",
            highlight=False,
        )
    else:
        running = (embedded.data_dir() / "postmaster.pid").exists()
        console.print(
            f"embedded PostgreSQL in {embedded.data_dir()}: {'running' if running else 'stopped'}", highlight=False
        )
    return 0


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ..workers.config import OneLineParser

    class Parser(OneLineParser):
        error_prefix = "chunkq: "

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help="database (default: $CHUNKQ_DSN, then $DATABASE_URL, else embedded)")
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")

    parser = Parser(prog="chunkq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dsn", dest="global_dsn", metavar="DSN", help="database for any command (also accepted after the command)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(
        parent: Any,
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
        parents: Sequence[argparse.ArgumentParser] = (common,),
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help, parents=list(parents))
        sub.set_defaults(func=func)
        return sub

    migrate = command(commands, "migrate", cmd_migrate, "apply, roll back or list the schema migrations")
    migrate.add_argument("action", nargs="?", choices=("apply", "rollback", "status"), default="apply")
    migrate.add_argument("--all", action="store_true", help="with rollback: every migration (drops all data)")

    job = commands.add_parser("job", help="crawl jobs", description="Create, inspect and steer crawl jobs.")
    jobs = job.add_subparsers(dest="job_command", required=True, metavar="command")
    create = command(jobs, "create", cmd_job_create, "create a crawl job and its chunks")
    create.add_argument("--name", required=True)
    create.add_argument("--project", type=int, default=1, help="project id (default 1)")
    create.add_argument("--max-images", type=int, required=True, help="images to crawl")
    create.add_argument("--keyword", "-k", action="append", help="a search keyword (repeatable)")
    create.add_argument("--keywords-json", help="keywords as any JSON value, instead of --keyword")
    create.add_argument("--priority", type=int, help="0-10 by default; higher is claimed first")
    create.add_argument("--chunk-size", type=int, help="images per chunk (default 500)")
    create.add_argument("--max-retries", type=int, help="automatic retries per chunk (default 3)")
    limits.add_job_options(create, removable=False)
    job_limit = command(
        jobs,
        "limit",
        lambda a: limits.cmd_job_limit(a, connect, done),
        "change a running job's scheduling limits (none removes one)",
    )
    job_limit.add_argument("job_id", type=int, metavar="ID")
    limits.add_job_options(job_limit, removable=True)
    listing = command(jobs, "list", cmd_job_list, "list the newest jobs with their progress")
    listing.add_argument("--status", type=job_status)
    listing.add_argument("--limit", type=positive, default=50)
    for name, func, help in (
        ("show", cmd_job_show, "a job's details and progress"),
        ("cancel", cmd_job_cancel, "cancel a job's pending and processing chunks"),
        ("retry-failed", cmd_job_retry_failed, "put a job's failed chunks back to pending"),
        ("delete", cmd_job_delete, "delete a job that is not running, with its chunks"),
    ):
        command(jobs, name, func, help).add_argument("job_id", type=int, metavar="ID")
    for name, func, help in (
        ("pause", cmd_job_pause, "stop handing out a job's chunks (running ones carry on)"),
        ("resume", cmd_job_resume, "let a paused job's chunks be claimed again"),
    ):
        command(jobs, name, func, help).add_argument("job_id", type=int, metavar="ID")
    priority = command(jobs, "priority", cmd_job_priority, "give a job and its unfinished chunks a new priority")
    priority.add_argument("job_id", type=int, metavar="ID")
    priority.add_argument("priority", type=int)
    progress = command(jobs, "progress", cmd_job_progress, "a job's progress; --watch follows it to the end")
    progress.add_argument("job_id", type=int, metavar="ID")
    progress.add_argument(
        "--watch", action="store_true", help="live progress until the job finishes; exit 1 if chunks failed"
    )
    progress.add_argument("--interval", type=float, default=0.5, help="seconds between updates (default 0.5)")

    chunk = commands.add_parser("chunk", help="chunks", description="Inspect and retry chunks.")
    chunks = chunk.add_subparsers(dest="chunk_command", required=True, metavar="command")
    chunk_list = command(chunks, "list", cmd_chunk_list, "a job's chunks in order")
    chunk_list.add_argument("--job", type=int, required=True, metavar="ID")
    chunk_list.add_argument("--status", type=chunk_status)
    chunk_list.add_argument("--limit", type=positive, default=50)
    command(chunks, "retry", cmd_chunk_retry, "put a failed chunk back to pending").add_argument(
        "chunk_id", type=int, metavar="ID"
    )

    command(
        commands,
        "stats",
        cmd_stats,
        "queue depth by priority, oldest pending, leases, failure rate, vacuum and the oldest transaction",
    )
    command(commands, "workers", cmd_workers, "connected workers and the chunks they hold")
    limit = commands.add_parser(
        "limit",
        help="rate limits by key",
        description="Limits of rate keys, across every "
        "job that names the key (--rate-key): a token bucket and a cap on running chunks.",
    )
    limit_commands = limit.add_subparsers(dest="limit_command", required=True, metavar="command")
    limit_set = command(
        limit_commands,
        "set",
        lambda a: limits.cmd_limit_set(a, connect, done),
        "set a key's limits, e.g. --rate 5/s --burst 10 --max-running 8",
    )
    limit_set.add_argument("key", metavar="KEY")
    limit_set.add_argument("--rate", type=limits.rate, help="chunks claimed per second at most: 5/s, 300/min, 2/hour")
    limit_set.add_argument("--burst", type=int, help="chunks claimed at once after a quiet spell (default: the rate)")
    limit_set.add_argument("--max-running", type=int, metavar="N", help="chunks of the key running at once at most")
    command(
        limit_commands,
        "list",
        lambda a: limits.cmd_limit_list(a, connect, listed),
        "every key with limits: bucket, running and pending chunks, what holds it back",
    )
    command(
        limit_commands, "delete", lambda a: limits.cmd_limit_delete(a, connect, done), "remove a key's limits"
    ).add_argument("key", metavar="KEY")
    command(commands, "failures", cmd_failures, "errors grouped by kind, most frequent first")
    prune = command(commands, "prune", cmd_prune, "delete jobs that finished long ago, in short transactions")
    prune.add_argument("--older-than", required=True, metavar="INTERVAL", help="a PostgreSQL interval, e.g. '30 days'")
    prune.add_argument("--batch", type=positive, default=10_000, help="chunks deleted per transaction")

    from ..workers.config import add_arguments

    worker = command(
        commands, "worker", cmd_worker, "run a worker pool (same options as python -m workers)", parents=()
    )
    add_arguments(worker)

    demo = command(commands, "demo", cmd_demo, "crawl a simulated job end to end with a live progress bar", parents=())
    demo.add_argument("--dsn", help="database (default: $CHUNKQ_DSN, then $DATABASE_URL, else embedded)")
    demo.add_argument("--images", type=positive, default=250_000, help="images in the job (default 250000)")
    demo.add_argument("--processes", type=positive, default=4, help="worker processes (default 4)")
    demo.add_argument(
        "--failure-rate", type=float, default=0.03, help="share of chunk attempts that fail (default 0.03)"
    )
    demo.add_argument(
        "--seconds-per-image", type=float, default=0.0002, help="simulated crawl time per image (default 0.0002)"
    )

    emb = command(commands, "embedded", cmd_embedded, "status or stop of the embedded PostgreSQL", parents=())
    emb.add_argument("action", choices=("status", "stop"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Failure as exc:
        code, message = exc.code, str(exc)
    except NotFound as exc:
        code, message = EXIT_NOT_FOUND, str(exc)
    except ValidationError as exc:
        code, message = EXIT_USAGE, str(exc)
    except SchemaNotMigrated as exc:
        code, message = EXIT_SCHEMA, str(exc).replace("chunkq.migrate(dsn) or `yoyo apply`", "`chunkq migrate`")
    except PermissionDenied as exc:
        code, message = EXIT_REFUSED, f"permission denied: {exc}"
    except (InvalidTransition, LeaseLost, ChunkqError) as exc:
        code, message = EXIT_REFUSED, str(exc)
    except psycopg.OperationalError as exc:
        code, message = EXIT_UNREACHABLE, f"database error: {one_line(exc)}"
    except KeyboardInterrupt:
        code, message = EXIT_INTERRUPTED, "interrupted"
    errors.print(f"chunkq: {message}", highlight=False, markup=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
