"""The pool's options: one frozen record, built from the command line and checked before anything starts."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from typing import NoReturn

from psycopg.conninfo import conninfo_to_dict

from chunkq.errors import one_line

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """An option is wrong; the message says which and why. The pool exits with ``exit_code``."""

    exit_code = 2


class NoDatabase(ConfigError):
    """No database was given, or it cannot be reached: exit 4, as every chunkq command does."""

    exit_code = 4


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line, as every error of the pool and the CLI is, instead of a usage
    block: ``error: argument --processes: invalid int value: 'many' (see python -m workers --help)``."""

    error_prefix = "error: "

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.error_prefix}{one_line(message)} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class PoolConfig:
    dsn: str
    handler: str  # package.module:function
    processes: int = os.cpu_count() or 1
    lease: float = 60.0  # seconds a claim lasts without a heartbeat
    heartbeat: float = 15.0  # seconds between heartbeats while a worker holds chunks
    poll: float = 2.0  # seconds an idle worker waits before looking for work again
    batch: int = 1  # chunks claimed at a time
    concurrency: int = 1  # chunks each worker process runs at once (threads, or tasks of an async handler)
    job_id: int | None = None  # only this job's chunks
    max_retries: int | None = None  # overrides each job's max_retries for handler failures
    grace: float = 30.0  # seconds running chunks get to finish after SIGTERM
    listen: bool = True  # LISTEN for new chunks; off for PgBouncer transaction pooling
    log_format: str = "text"  # or "json"
    log_level: str = "info"  # info logs every chunk's outcome; warning only retries, failures and trouble
    name: str = socket.gethostname()  # worker ids are name:pid

    def check(self) -> None:
        """Raises ConfigError for the first wrong option."""
        try:
            conninfo_to_dict(self.dsn)
        except Exception as exc:
            raise ConfigError(f"invalid DSN: {one_line(exc)}") from exc
        if self.processes < 1:
            raise ConfigError(f"--processes must be at least 1, got {self.processes}")
        for option, value in (("--lease", self.lease), ("--heartbeat", self.heartbeat), ("--poll", self.poll)):
            if not value > 0:
                raise ConfigError(f"{option} must be a positive number of seconds, got {value}")
        if self.heartbeat >= self.lease:
            raise ConfigError(f"--heartbeat ({self.heartbeat} s) must be shorter than --lease ({self.lease} s)")
        if self.grace < 0:
            raise ConfigError(f"--grace must not be negative, got {self.grace}")
        if not 1 <= self.batch <= 1000:
            raise ConfigError(f"--batch must be between 1 and 1000, got {self.batch}")
        if not 1 <= self.concurrency <= 1000:
            raise ConfigError(f"--concurrency must be between 1 and 1000, got {self.concurrency}")
        if self.max_retries is not None and self.max_retries < 0:
            raise ConfigError(f"--max-retries must not be negative, got {self.max_retries}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"--log-format must be text or json, got {self.log_format!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The pool's options; ``chunkq worker`` uses the same ones."""
    defaults = PoolConfig(dsn="", handler="")
    parser.add_argument(
        "--dsn",
        help="database to work on (default: $CHUNKQ_DSN, then $DATABASE_URL; with the chunkq command, "
        "'embedded': the local embedded PostgreSQL)",
    )
    parser.add_argument("--handler", required=True, help="the function to run per chunk, package.module:function")
    parser.add_argument(
        "--processes",
        type=int,
        default=defaults.processes,
        help="worker processes (default: one per CPU, %(default)s here)",
    )
    parser.add_argument(
        "--lease",
        type=float,
        default=defaults.lease,
        help="seconds a claim lasts without a heartbeat (default %(default)s)",
    )
    parser.add_argument("--heartbeat", type=float, help="seconds between heartbeats (default: a quarter of --lease)")
    parser.add_argument(
        "--poll",
        type=float,
        default=defaults.poll,
        help="seconds an idle worker waits before looking again (default %(default)s)",
    )
    parser.add_argument("--batch", type=int, default=defaults.batch, help="chunks claimed at a time (default 1)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="chunks each process runs at once: tasks of an async handler, threads of a plain one (default 1)",
    )
    parser.add_argument("--job", type=int, dest="job_id", help="only work on this job's chunks")
    parser.add_argument("--max-retries", type=int, help="retries per chunk, overriding each job's max_retries")
    parser.add_argument(
        "--grace",
        type=float,
        default=defaults.grace,
        help="seconds running chunks get to finish after SIGTERM (default %(default)s)",
    )
    parser.add_argument(
        "--no-listen",
        dest="listen",
        action="store_false",
        help="poll only, no LISTEN/NOTIFY (for PgBouncer in transaction pooling mode)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines (default text)")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="info (default) logs every chunk's outcome; warning only retries, failures and trouble",
    )
    parser.add_argument("--name", default=defaults.name, help="worker ids are NAME:pid (default: the host name)")


def from_args(args: argparse.Namespace) -> PoolConfig:
    dsn = args.dsn or os.environ.get("CHUNKQ_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        raise NoDatabase("no database: nothing in --dsn, $CHUNKQ_DSN or $DATABASE_URL; set one")
    if dsn == "embedded":  # `chunkq worker` resolves the word before it gets here
        raise ConfigError("--dsn embedded: only the chunkq command starts the embedded PostgreSQL (chunkq worker ...)")
    config = PoolConfig(
        dsn=dsn,
        handler=args.handler,
        processes=args.processes,
        lease=args.lease,
        heartbeat=args.heartbeat if args.heartbeat is not None else args.lease / 4,
        poll=args.poll,
        batch=args.batch,
        concurrency=args.concurrency,
        job_id=args.job_id,
        max_retries=args.max_retries,
        grace=args.grace,
        listen=args.listen,
        log_format=args.log_format,
        log_level=args.log_level,
        name=args.name,
    )
    config.check()
    return config
