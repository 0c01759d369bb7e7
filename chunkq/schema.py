"""Applying chunkq's yoyo migrations from Python, and checking a database is current.

The same folder the stock CLI applies (``yoyo apply --database
postgresql+psycopg://... migrations``); an installed wheel carries it inside the
package.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from psycopg import Connection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from yoyo import get_backend, read_migrations

from . import _queries as q
from ._sync.execute import fetch
from .errors import SchemaNotMigrated, ValidationError

logger = logging.getLogger("chunkq")

#: The chunkq.schema_version() this client needs (the number of the last migration).
SCHEMA_VERSION = 11


def migrations_path() -> Path:
    """The migrations folder: inside the installed package, else the repository's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("chunkq's migrations folder is missing from this installation")


def yoyo_url(dsn: str) -> str:
    """A ``postgresql+psycopg://`` URL for yoyo from any libpq DSN (URL or ``key=value`` form).

    Every connection parameter goes in the query string, which yoyo hands to
    psycopg as is, so socket directories and options survive the trip.
    """
    try:
        params = {key: str(value) for key, value in conninfo_to_dict(dsn).items()}
    except Exception as exc:  # psycopg.ProgrammingError for a malformed DSN
        raise ValidationError(f"invalid DSN: {exc}") from exc
    return "postgresql+psycopg:///?" + urlencode(params)


@contextlib.contextmanager
def _locked_backend(dsn: str) -> Iterator[tuple[Any, Any]]:
    """yoyo's backend for ``dsn``, holding yoyo's migration lock, and chunkq's migrations."""
    backend = get_backend(yoyo_url(dsn))
    # No server-side prepared statements (yoyo repeats a few of its own): through PgBouncer in transaction mode
    # they would stay behind on a server connection that other clients are lent next.
    backend.connection.prepare_threshold = None
    try:
        with backend.lock():
            yield backend, read_migrations(str(migrations_path()))
    finally:
        backend.connection.close()


def migrate(dsn: str) -> list[str]:
    """Applies the migrations the database lacks; returns their ids. Safe to run concurrently."""
    with _locked_backend(dsn) as (backend, migrations):
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    applied = [m.id for m in pending]
    if applied:
        logger.info("applied migrations: %s", ", ".join(applied))
    return applied


def rollback(dsn: str, steps: int | None = None) -> list[str]:
    """Rolls back the last ``steps`` applied migrations, or all of them (dropping the schema and its
    data); returns their ids, newest first."""
    with _locked_backend(dsn) as (backend, migrations):
        applied = backend.to_rollback(migrations)
        if steps is not None:
            applied = applied[:steps]
        backend.rollback_migrations(applied)
    return [m.id for m in applied]


def status(dsn: str) -> list[tuple[str, bool]]:
    """Every migration this client knows, oldest first, with whether the database has it."""
    with _locked_backend(dsn) as (backend, migrations):
        return [(m.id, bool(backend.is_applied(m))) for m in migrations]


def check_schema(conn: Connection[Any]) -> int:
    """The database's chunkq schema version; SchemaNotMigrated if it is older than this client needs."""
    rows = fetch(conn, q.SCHEMA_VERSION, {}, dict_row)
    version = int(rows[0]["version"])
    if version < SCHEMA_VERSION:
        raise SchemaNotMigrated(
            f"the chunkq schema is at version {version}, this client needs {SCHEMA_VERSION}: "
            "run chunkq.migrate(dsn) or `yoyo apply`"
        )
    return version
