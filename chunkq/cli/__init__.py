"""chunkq: operate the chunk queue from a shell.

Every command is one or two calls of the SQL API, through the sync client. The
database is --dsn, else $CHUNKQ_DSN, else $DATABASE_URL; `--dsn embedded` (or
CHUNKQ_DSN=embedded) is a local embedded PostgreSQL that chunkq starts (or reuses)
in a per-user directory, and so is `chunkq demo` without a database. No other
command falls back to it: without a database they exit 4.

Destructive commands (migrate rollback, job delete, prune) ask on a terminal;
--yes skips the question, and without a terminal they refuse unless --yes.

Exit codes: 0 done; 1 refused by chunkq (wrong state, missing privilege, not
confirmed) or a watched job ended with failed or cancelled chunks; 2 bad usage or
input; 3 no such job or chunk; 4 no database given, or it is unreachable;
5 schema missing or outdated (run `chunkq migrate`); 130 interrupted.
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
from .output import console, emit_json, errors, first_line, record, table

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
ERROR_COLUMNS = ["attempt", "worker_id", "failed_at", "lease_expired", "retried", "error"]
#: Characters of a chunk's last error that `chunk list` shows (its first line); `chunk errors ID` has it all.
ERROR_PREVIEW = 60

BIGINT_MAX, INTEGER_MAX = 2**63 - 1, 2**31 - 1
EMBEDDED = "embedded"  # --dsn embedded: the opt-in to the embedded PostgreSQL
NO_DATABASE = (
    "no database: nothing in --dsn, $CHUNKQ_DSN or $DATABASE_URL; set one, "
    "or pass --dsn embedded for a local embedded PostgreSQL"
)


class Failure(Exception):
    """Ends the command with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------


def resolve_dsn(args: argparse.Namespace, *, embedded_default: bool = False) -> str:
    """--dsn, else $CHUNKQ_DSN, else $DATABASE_URL; the word ``embedded`` starts (or reuses) the embedded
    PostgreSQL, and so does nothing at all when ``embedded_default`` (the demo only). Otherwise no database
    is exit 4: a typo in a container's environment must not quietly run against a private server."""
    dsn = (
        getattr(args, "dsn", None)
        or getattr(args, "global_dsn", None)
        or os.environ.get("CHUNKQ_DSN")
        or os.environ.get("DATABASE_URL")
    )
    if dsn == EMBEDDED or (not dsn and embedded_default):
        try:
            uri = embedded.shared_server()
        except embedded.EmbeddedUnavailable as exc:
            raise Failure(str(exc), EXIT_UNREACHABLE) from exc
        errors.print(
            f"chunkq: using the embedded PostgreSQL in {embedded.data_dir()}"
            " (it keeps running; `chunkq embedded stop` stops it)",
            highlight=False,
        )
        return uri
    if not dsn:
        raise Failure(NO_DATABASE, EXIT_UNREACHABLE)
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise Failure(f"invalid DSN: {one_line(exc)}", EXIT_USAGE) from exc
    return dsn


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


def whole(value: str, low: int, high: int) -> int:
    """An integer between ``low`` and ``high``: what argparse reports as ``argument --max-images: must be ...``."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number > high:
        raise argparse.ArgumentTypeError(f"must be at most {high}")
    if number < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {number}")
    return number


def bigint(value: str) -> int:
    """Ids and image counts: a Postgres bigint (the SQL says what makes sense within it)."""
    return whole(value, -BIGINT_MAX - 1, BIGINT_MAX)


def integer(value: str) -> int:
    """Priorities, chunk sizes, retries: a Postgres integer."""
    return whole(value, -INTEGER_MAX - 1, INTEGER_MAX)


def positive(value: str) -> int:
    return whole(value, 1, INTEGER_MAX)


def confirm(args: argparse.Namespace, what: str) -> None:
    """Asks on a terminal before a destructive command: ``what`` is what it will do. --yes skips the question;
    without a terminal to ask on, the command is refused (exit 2) rather than done unasked."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise Failure(f"{what}: pass --yes to confirm (no terminal to ask on)", EXIT_USAGE)
    sys.stderr.write(f"{what[0].upper()}{what[1:]}. Go ahead? [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise Failure("not confirmed: nothing was changed", EXIT_REFUSED)


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
        console.print(sentence, highlight=False, soft_wrap=True)  # one line, however long
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.all and args.action != "rollback":
        raise Failure("--all goes with rollback: chunkq migrate rollback --all", EXIT_USAGE)
    dsn = resolve_dsn(args)
    try:
        if args.action == "apply":
            applied = schema.migrate(dsn)
            result: Any = {"applied": applied}
            message = f"applied {', '.join(applied)}" if applied else "the schema is up to date"
        elif args.action == "rollback":
            applied_ids = [name for name, applied in schema.status(dsn) if applied][::-1]
            going = applied_ids if args.all else applied_ids[:1]
            if going and len(going) == len(applied_ids):
                what = going[0] if len(going) == 1 else f"all {len(going)} migrations"
                confirm(args, f"rolling back {what} drops schema chunkq with every job and chunk")
            elif going:
                confirm(args, f"rolling back {going[0]} undoes the last migration")
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
            id=args.id,
            **limits.job_limits(args),
        )
        if not args.no_chunks:
            job = JobChunkRepository(conn).create_for_job(job.id)
    if args.no_chunks:
        sentence = (
            f"job {job.id} created without chunks: {job.max_images:,} images, priority {job.priority}; "
            f"its chunks come from create_chunks_for_job(job_id={job.id}, ...) or POST /jobs/{job.id}/chunks"
        )
    else:
        sentence = (
            f"job {job.id} created: {job.max_images:,} images in {job.total_chunks:,} chunks "
            f"of {job.chunk_size}, priority {job.priority}"
        )
    return done(args, job, sentence)


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
    cancel_first = f"crawl job {args.job_id} is running: cancel it first: chunkq job cancel {args.job_id}"
    with connect(args) as conn:
        jobs = CrawlJobRepository(conn)
        job = jobs.get_by_id(args.job_id)
        if job is None:
            raise Failure(f"crawl job {args.job_id} does not exist", EXIT_NOT_FOUND)
        if job.status == JobStatus.RUNNING:  # refused anyway: say so before asking
            raise Failure(cancel_first, EXIT_REFUSED)
        chunks = f"{job.total_chunks:,} chunk{'' if job.total_chunks == 1 else 's'}"
        confirm(args, f"deleting job {job.id} ({job.name!r}, {job.status}) deletes its {chunks} and their errors")
        try:
            job = jobs.delete(args.job_id)
        except InvalidTransition as exc:  # it started running meanwhile
            raise Failure(cancel_first, EXIT_REFUSED) from exc
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
        confirm(args, f"pruning deletes every job that finished more than {args.older_than} ago, with its chunks")
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
    if args.json:
        return listed(args, chunks, CHUNK_COLUMNS)
    # One line per chunk: the first line of its last error, cut (`chunkq chunk errors ID` has them all).
    rows = [
        {
            c: first_line(chunk.error_message, ERROR_PREVIEW) if c == "error_message" else getattr(chunk, c)
            for c in CHUNK_COLUMNS
        }
        for chunk in chunks
    ]
    table(rows, CHUNK_COLUMNS, headers=CHUNK_HEADERS, one_line=True)
    return 0


def cmd_chunk_errors(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        history = JobChunkRepository(conn).error_history(args.chunk_id)
    return listed(args, history, ERROR_COLUMNS, title=f"chunk {args.chunk_id}: every error, oldest first")


def cmd_chunk_show(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        chunks = JobChunkRepository(conn)
        chunk = chunks.get_by_id(args.chunk_id)
        if chunk is None:
            raise Failure(f"chunk {args.chunk_id} does not exist", EXIT_NOT_FOUND)
        history = chunks.error_history(args.chunk_id)
    if args.json:
        emit_json({"chunk": chunk, "errors": history})
    else:
        record(chunk, title=f"chunk {chunk.id}")
        table(history, ERROR_COLUMNS, title="errors, oldest first")
    return 0


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
            depth,
            [
                "priority",
                "pending_chunks",
                "claimable_chunks",
                "limited_chunks",
                "retrying_chunks",
                "paused_chunks",
                "oldest_pending_age",
            ],
            title="pending by priority",
        )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """The pool, as `python -m chunkq.workers` runs it, with the same exit codes (4 no database or unreachable,
    2 a bad option, handler or schema) and every error on one line starting with ``chunkq:``."""
    from ..workers import __main__ as pool
    from ..workers.config import ConfigError, from_args

    args.dsn = resolve_dsn(args)
    try:
        config = from_args(args)
    except ConfigError as exc:
        raise Failure(str(exc), exc.exit_code) from exc
    return pool.run(config, error_prefix="chunkq: ")


def cmd_web(args: argparse.Namespace) -> int:
    try:
        from ..web import WebConfig, serve
        from ..web.auth import TokenError, load_token
    except ImportError as exc:
        raise Failure(f"chunkq web needs the web extra: pip install 'chunkq[web]' ({exc})", EXIT_USAGE) from exc
    try:
        token = load_token(args.token_file)
    except TokenError as exc:
        raise Failure(str(exc), EXIT_USAGE) from exc
    dsn = resolve_dsn(args)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            schema.check_schema(conn)
    except psycopg.OperationalError as exc:  # started before the database: the pages say 503 until it answers
        errors.print(f"chunkq web: the database does not answer yet: {one_line(exc)}", highlight=False, markup=False)
    mode = "actions need the operator token" if token else "read-only"
    errors.print(f"chunkq web: http://{args.host}:{args.port}/ ({mode})", highlight=False, markup=False)
    serve(WebConfig(dsn, token, args.top_jobs, args.refresh), args.host, args.port)
    return 0


def port(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {number}")
    return number


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    return demo(args, resolve_dsn(args, embedded_default=True))


def cmd_embedded(args: argparse.Namespace) -> int:
    where = embedded.data_dir()
    if args.action == "stop":
        try:
            stopped = embedded.stop_shared_server()
        except embedded.EmbeddedUnavailable as exc:
            raise Failure(str(exc), EXIT_UNREACHABLE) from exc
        console.print(f"embedded PostgreSQL in {where} {'stopped' if stopped else 'was not running'}", highlight=False)
        return 0
    dsn = embedded.shared_server_dsn()
    if args.json:
        emit_json({"running": dsn is not None, "dsn": dsn, "data_dir": str(where)})
    elif dsn is None:
        console.print(f"embedded PostgreSQL in {where}: stopped", highlight=False)
    else:
        console.print(f"embedded PostgreSQL in {where}: running at {dsn}", highlight=False, soft_wrap=True)
    return 0


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ..workers.config import OneLineParser

    class Parser(OneLineParser):
        error_prefix = "chunkq: "

    dsn_help = "database (default: $CHUNKQ_DSN, then $DATABASE_URL; 'embedded': a local embedded PostgreSQL)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help=dsn_help)
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    asks = argparse.ArgumentParser(add_help=False)
    asks.add_argument("--yes", "-y", action="store_true", help="do it without asking (needed without a terminal)")

    parser = Parser(prog="chunkq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_text())
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

    migrate = command(
        commands, "migrate", cmd_migrate, "apply, roll back or list the schema migrations", (common, asks)
    )
    migrate.add_argument("action", nargs="?", choices=("apply", "rollback", "status"), default="apply")
    migrate.add_argument("--all", action="store_true", help="with rollback: every migration (drops all data)")

    job = commands.add_parser("job", help="crawl jobs", description="Create, inspect and steer crawl jobs.")
    jobs = job.add_subparsers(dest="job_command", required=True, metavar="command")
    create = command(jobs, "create", cmd_job_create, "create a crawl job and its chunks")
    create.add_argument("--name", required=True)
    create.add_argument("--project", type=bigint, default=1, help="project id (default 1)")
    create.add_argument("--max-images", type=bigint, required=True, help="images to crawl")
    given = create.add_mutually_exclusive_group()
    given.add_argument("--keyword", "-k", action="append", help="a search keyword (repeatable)")
    given.add_argument("--keywords-json", help="keywords as any JSON value, instead of --keyword")
    create.add_argument("--priority", type=integer, help="0-10 by default; higher is claimed first")
    create.add_argument("--chunk-size", type=integer, help="images per chunk (default 500)")
    create.add_argument("--max-retries", type=integer, help="automatic retries per chunk (default 3)")
    create.add_argument(
        "--id", type=bigint, help="the job's id, e.g. your application's own job id (default: the next)"
    )
    create.add_argument(
        "--no-chunks",
        action="store_true",
        help="create the job only; your application makes its chunks (create_chunks_for_job)",
    )
    limits.add_job_options(create, removable=False)
    job_limit = command(
        jobs,
        "limit",
        lambda a: limits.cmd_job_limit(a, connect, done),
        "change a running job's scheduling limits (none removes one)",
    )
    job_limit.add_argument("job_id", type=bigint, metavar="ID")
    limits.add_job_options(job_limit, removable=True)
    job_states = ", ".join(s.value for s in JobStatus)
    listing = command(jobs, "list", cmd_job_list, "list the newest jobs with their progress")
    listing.add_argument("--status", type=job_status, metavar="STATUS", help=f"only jobs in this state: {job_states}")
    listing.add_argument("--limit", type=positive, default=50)
    for name, func, help in (
        ("show", cmd_job_show, "a job's details and progress"),
        ("cancel", cmd_job_cancel, "cancel a job's pending and processing chunks"),
        ("retry-failed", cmd_job_retry_failed, "put a job's failed chunks back to pending"),
        ("pause", cmd_job_pause, "stop handing out a job's chunks (running ones carry on)"),
        ("resume", cmd_job_resume, "let a paused job's chunks be claimed again"),
    ):
        command(jobs, name, func, help).add_argument("job_id", type=bigint, metavar="ID")
    delete = command(
        jobs, "delete", cmd_job_delete, "delete a job that is not running, with its chunks", (common, asks)
    )
    delete.add_argument("job_id", type=bigint, metavar="ID")
    priority = command(jobs, "priority", cmd_job_priority, "give a job and its unfinished chunks a new priority")
    priority.add_argument("job_id", type=bigint, metavar="ID")
    priority.add_argument("priority", type=integer)
    progress = command(jobs, "progress", cmd_job_progress, "a job's progress; --watch follows it to the end")
    progress.add_argument("job_id", type=bigint, metavar="ID")
    progress.add_argument(
        "--watch", action="store_true", help="live progress until the job finishes; exit 1 if chunks failed"
    )
    progress.add_argument("--interval", type=float, default=0.5, help="seconds between updates (default 0.5)")

    chunk = commands.add_parser("chunk", help="chunks", description="Inspect and retry chunks.")
    chunks = chunk.add_subparsers(dest="chunk_command", required=True, metavar="command")
    chunk_list = command(chunks, "list", cmd_chunk_list, "a job's chunks in order, one line each")
    chunk_list.add_argument("--job", type=bigint, required=True, metavar="ID")
    chunk_states = ", ".join(s.value for s in ChunkStatus)
    chunk_list.add_argument(
        "--status", type=chunk_status, metavar="STATUS", help=f"only chunks in this state: {chunk_states}"
    )
    chunk_list.add_argument("--limit", type=positive, default=50)
    for name, func, help in (
        ("show", cmd_chunk_show, "a chunk and every error it recorded"),
        ("errors", cmd_chunk_errors, "every error a chunk recorded, in full, oldest first"),
        ("retry", cmd_chunk_retry, "put a failed chunk back to pending"),
    ):
        command(chunks, name, func, help).add_argument("chunk_id", type=bigint, metavar="ID")

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
    limit_set.add_argument(
        "--burst", type=integer, help="chunks claimed at once after a quiet spell (default: the rate)"
    )
    limit_set.add_argument("--max-running", type=integer, metavar="N", help="chunks of the key running at once at most")
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
    prune = command(
        commands, "prune", cmd_prune, "delete jobs that finished long ago, in short transactions", (common, asks)
    )
    prune.add_argument("--older-than", required=True, metavar="INTERVAL", help="a PostgreSQL interval, e.g. '30 days'")
    prune.add_argument("--batch", type=positive, default=10_000, help="chunks deleted per transaction")

    from ..workers.config import add_arguments

    worker = command(
        commands, "worker", cmd_worker, "run a worker pool (same options as python -m chunkq.workers)", parents=()
    )
    add_arguments(worker)

    web = command(commands, "web", cmd_web, "the dashboard and /metrics over HTTP (needs chunkq[web])", parents=())
    web.add_argument("--dsn", help="database (default: $CHUNKQ_DSN, then $DATABASE_URL, else embedded)")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=port, default=8080, help="port (default 8080)")
    web.add_argument(
        "--token-file",
        metavar="FILE",
        help="its first line is the operator token that allows actions "
        "(default: $CHUNKQ_WEB_TOKEN; neither: read-only)",
    )
    web.add_argument(
        "--top-jobs",
        type=int,
        default=20,
        choices=range(0, 1001),
        metavar="N",
        help="jobs with series of their own in /metrics, the rest summed (default 20, at most 1000)",
    )
    web.add_argument("--refresh", type=float, default=2.0, help="seconds between live updates (default 2)")

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

    emb = command(
        commands,
        "embedded",
        cmd_embedded,
        "the embedded PostgreSQL: status (with its DSN) or stop",
        parents=(),
    )
    emb.add_argument("action", choices=("status", "stop"))
    emb.add_argument("--json", action="store_true", help="status as JSON: running, dsn, data_dir")
    return parser


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("chunkq")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        installed = "(not installed)"
    return f"chunkq {installed} (schema version {schema.SCHEMA_VERSION})"


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
    except psycopg.Error as exc:  # anything else the server refused (e.g. a write on a standby): one line
        code, message = EXIT_REFUSED, f"database error: {one_line(exc.diag.message_primary or exc)}"
    except KeyboardInterrupt:
        code, message = EXIT_INTERRUPTED, "interrupted"
    errors.print(f"chunkq: {message}", highlight=False, markup=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
