"""python -m workers --dsn ... --processes N --handler package.module:function

Exit codes, the same as `chunkq worker`: 0 after a clean drain (SIGTERM/SIGINT),
1 when workers had to be killed or could not drain, 2 for a bad option, handler,
DSN or schema, 4 when no database is given or it cannot be reached (nothing was
claimed in either case).
"""

from __future__ import annotations

import sys

import psycopg

from chunkq import ChunkqError
from chunkq.errors import one_line
from chunkq.schema import check_schema
from chunkq.sync import CrawlJobRepository

from . import logs
from .config import ConfigError, NoDatabase, OneLineParser, PoolConfig, add_arguments, from_args
from .handler import HandlerError, load_handler
from .supervisor import Supervisor


def preflight(config: PoolConfig) -> None:
    """Everything that can be wrong before a worker starts: the handler, the database, the schema, the job."""
    load_handler(config.handler)
    try:
        # A few calls, once: nothing to gain from prepared statements, which PgBouncer in transaction mode
        # (the --no-listen set-up) may not follow from one call to the next.
        with psycopg.connect(config.dsn, connect_timeout=10, autocommit=True, prepare_threshold=None) as conn:
            check_schema(conn)
            if config.job_id is not None and CrawlJobRepository(conn).get_by_id(config.job_id) is None:
                raise ConfigError(f"--job {config.job_id}: no such crawl job")
    except psycopg.OperationalError as exc:
        raise NoDatabase(f"cannot connect to the database: {one_line(exc)}") from exc


def run(config: PoolConfig, error_prefix: str = "error: ") -> int:
    """Checks, then runs the pool; ``error_prefix`` starts an error's one line (``chunkq: `` for chunkq worker)."""
    logs.setup(config.log_format, config.log_level)
    try:
        preflight(config)
    except (ConfigError, HandlerError, ChunkqError) as exc:
        print(f"{error_prefix}{one_line(exc)}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, ConfigError) else 2
    return Supervisor(config).run()


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m workers", description="Run a chunkq worker pool.")
    add_arguments(parser)
    try:
        config = from_args(parser.parse_args(argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
