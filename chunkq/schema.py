"""Applying chunkq's yoyo migrations from Python, and checking a database is current.

The same folder the stock CLI applies; an installed wheel carries it inside the
package. yoyo's bookkeeping (``_yoyo_migration``, ``_yoyo_log``, ``_yoyo_version``,
``yoyo_lock``) lives in its own schema, ``chunkq_migrations``, not in the
application's ``public``: the stock CLI is pointed there with ``?schema=`` in its
URL (``yoyo apply --database 'postgresql+psycopg://...?schema=chunkq_migrations'
migrations``, after a one-time ``CREATE SCHEMA chunkq_migrations``).

``migrate`` checks, before it applies anything, that the role may do what the
pending migrations do (create schemas; create the cluster-wide ``chunkq_*`` roles
when they are missing), and refuses in one line otherwise. If a migration still
fails, the migrations this run applied are rolled back (their rollback scripts
restore the schema exactly), so a database is never left half-migrated.

A database migrated before the bookkeeping moved (yoyo's tables in ``public``)
has chunkq's rows moved to ``chunkq_migrations`` by the next ``migrate`` or
``rollback``; other applications' yoyo rows stay where they are.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg import Connection, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from yoyo import get_backend, read_migrations

from . import _queries as q
from ._sync.execute import fetch
from .errors import MigrationError, SchemaNotMigrated, ValidationError, one_line

logger = logging.getLogger("chunkq")

#: The chunkq.schema_version() this client needs (the number of the last migration).
SCHEMA_VERSION = 11

#: Where yoyo keeps chunkq's bookkeeping.
BOOKKEEPING_SCHEMA = "chunkq_migrations"
#: The migration that creates the cluster-wide roles, and the statements a superuser runs instead, once per cluster.
ROLES_MIGRATION = "0005.roles"
ROLES = {
    "chunkq_reader": "CREATE ROLE chunkq_reader NOLOGIN;",
    "chunkq_worker": "CREATE ROLE chunkq_worker NOLOGIN;",
    "chunkq_app": "CREATE ROLE chunkq_app NOLOGIN IN ROLE chunkq_reader, chunkq_worker;",
}
#: chunkq.migrate and chunkq.rollback wait for each other on this advisory lock (the characters "chunkq").
_LOCK_KEY = 0x6368756E6B71


def migrations_path() -> Path:
    """The migrations folder: inside the installed package, else the repository's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("chunkq's migrations folder is missing from this installation")


def yoyo_url(dsn: str, schema: str | None = BOOKKEEPING_SCHEMA) -> str:
    """A ``postgresql+psycopg://`` URL for yoyo from any libpq DSN (URL or ``key=value`` form).

    Every connection parameter goes in the query string, which yoyo hands to
    psycopg as is, so socket directories and options survive the trip. ``schema``
    is where yoyo keeps its bookkeeping (yoyo sets it as the search_path); None
    leaves it in ``public``, as yoyo does by default.
    """
    try:
        params = {key: str(value) for key, value in conninfo_to_dict(dsn).items()}
    except Exception as exc:  # psycopg.ProgrammingError for a malformed DSN
        raise ValidationError(f"invalid DSN: {exc}") from exc
    if schema is not None:
        params["schema"] = schema
    return "postgresql+psycopg:///?" + urlencode(params)


def migrate(dsn: str) -> list[str]:
    """Applies the migrations the database lacks; returns their ids. Safe to run concurrently.

    MigrationError, with nothing changed, when the role may not do what a pending migration does, or when a
    migration fails (the ones this run applied are rolled back first).
    """
    migrations = read_migrations(str(migrations_path()))
    known = [m.id for m in migrations]
    url = yoyo_url(dsn)
    with _admin(dsn) as conn:
        applied = _applied_ids(conn, known)
        pending = [m for m in known if m not in applied]
        problems = _problems(conn, pending=pending, undoing=[])
        if problems:
            raise MigrationError("cannot migrate, nothing was changed: " + "; ".join(problems))
        created = _create_bookkeeping(conn)
        done: list[Any] = []
        backend = get_backend(url)
        try:
            backend.ensure_internal_schema_updated()
            _adopt_public_bookkeeping(conn, known)
            with backend.lock():
                pending_list = backend.to_apply(migrations)
                for migration in pending_list:  # one at a time, each in its own transaction
                    try:
                        backend.apply_migrations_only([migration])
                    except Exception as exc:
                        raise _undo(backend, done, migration.id, exc) from exc
                    done.append(migration)
                backend.run_post_apply(pending_list)  # chunkq has no post-apply hooks; a folder might
        except BaseException:
            backend.connection.close()
            if created:  # nothing was recorded there: leave no trace of this run
                _drop_bookkeeping_if_unused(conn)
            raise
        backend.connection.close()
    ids = [m.id for m in done]
    if ids:
        logger.info("applied migrations: %s", ", ".join(ids))
    return ids


def rollback(dsn: str, steps: int | None = None) -> list[str]:
    """Rolls back the last ``steps`` applied migrations, or all of them (dropping the schema and its
    data); returns their ids, newest first. MigrationError, with nothing changed, when the role may not."""
    migrations = read_migrations(str(migrations_path()))
    known = [m.id for m in migrations]
    with _admin(dsn) as conn:
        applied = [m for m in known if m in _applied_ids(conn, known)][::-1]
        undoing = applied if steps is None else applied[:steps]
        if not undoing:
            return []
        problems = _problems(conn, pending=[], undoing=undoing)
        if problems:
            raise MigrationError("cannot roll back, nothing was changed: " + "; ".join(problems))
        _create_bookkeeping(conn)
        backend = get_backend(yoyo_url(dsn))
        try:
            backend.ensure_internal_schema_updated()
            _adopt_public_bookkeeping(conn, known)
            with backend.lock():
                going = backend.to_rollback(migrations)
                going = going if steps is None else going[:steps]
                backend.rollback_migrations(going)
        finally:
            backend.connection.close()
    return [m.id for m in going]


def status(dsn: str) -> list[tuple[str, bool]]:
    """Every migration this client knows, oldest first, with whether the database has it. Changes nothing."""
    known = [m.id for m in read_migrations(str(migrations_path()))]
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        applied = _applied_ids(conn, known)
    return [(m, m in applied) for m in known]


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


# ---------------------------------------------------------------------------
# Before anything is applied: what the pending migrations need
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _admin(dsn: str) -> Iterator[Connection[Any]]:
    """A connection of our own beside yoyo's, holding the advisory lock that serialises migrate and rollback."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        yield conn


def _exists(conn: Connection[Any], relation: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (relation,)).fetchone() == (True,)


def _applied_ids(conn: Connection[Any], known: Sequence[str]) -> set[str]:
    """chunkq's migrations the database has, from the bookkeeping schema and, migrated the old way, public."""
    applied: set[str] = set()
    for schema in (BOOKKEEPING_SCHEMA, "public"):
        table = sql.Identifier(schema, "_yoyo_migration")
        if _exists(conn, f"{schema}._yoyo_migration"):
            rows = conn.execute(
                sql.SQL("SELECT migration_id FROM {} WHERE migration_id = ANY(%s)").format(table), (list(known),)
            ).fetchall()
            applied.update(row[0] for row in rows)
    return applied


def _problems(conn: Connection[Any], *, pending: Sequence[str], undoing: Sequence[str]) -> list[str]:
    """What the role lacks to apply ``pending`` or roll back ``undoing``, each with its fix; empty when nothing."""
    me, database, superuser, createrole, may_create = conn.execute(
        "SELECT current_user, current_database(), r.rolsuper, r.rolcreaterole,"
        "       has_database_privilege(current_database(), 'CREATE')"
        "  FROM pg_roles r WHERE r.rolname = current_user"
    ).fetchone()  # type: ignore[misc]
    schemas = dict(
        conn.execute(
            "SELECT nspname, pg_has_role(current_user, nspowner, 'USAGE') FROM pg_namespace WHERE nspname = ANY(%s)",
            (["chunkq", BOOKKEEPING_SCHEMA],),
        ).fetchall()
    )
    problems = []
    new = [s for s in (BOOKKEEPING_SCHEMA, "chunkq") if s not in schemas and (pending or s == BOOKKEEPING_SCHEMA)]
    if new and not may_create:
        problems.append(
            f"creating schema {' and '.join(new)} needs CREATE on database {database}: "
            f"as its owner or a superuser, run GRANT CREATE ON DATABASE {database} TO {me}"
        )
    if (pending or undoing) and schemas.get("chunkq") is False:
        owner = conn.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'chunkq'").fetchone()
        problems.append(f"schema chunkq belongs to {owner[0] if owner else '?'}: migrate as that role or a member")
    roles = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(ROLES),))}
    missing = [role for role in ROLES if role not in roles]
    if ROLES_MIGRATION in pending and missing and not (superuser or createrole):
        problems.append(
            f"{ROLES_MIGRATION} creates the cluster-wide roles {', '.join(missing)}, which needs CREATEROLE; "
            f"a superuser creates them once per cluster: {' '.join(ROLES[role] for role in missing)}"
        )
    if ROLES_MIGRATION in undoing and roles and not (superuser or createrole):
        problems.append(
            f"rolling back {ROLES_MIGRATION} drops the roles {', '.join(sorted(roles))}, which needs CREATEROLE: "
            "a superuser rolls it back"
        )
    return problems


# ---------------------------------------------------------------------------
# yoyo's bookkeeping, in its own schema
# ---------------------------------------------------------------------------


def _create_bookkeeping(conn: Connection[Any]) -> bool:
    """Creates the bookkeeping schema (yoyo needs it before it connects); True if this call created it."""
    if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (BOOKKEEPING_SCHEMA,)).fetchone():
        return False
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(BOOKKEEPING_SCHEMA)))
        comment = (
            "chunkq: yoyo's bookkeeping of chunkq's migrations (which are applied, and a log). "
            "chunkq's own objects are in schema chunkq."
        )
        conn.execute(
            sql.SQL("COMMENT ON SCHEMA {} IS {}").format(sql.Identifier(BOOKKEEPING_SCHEMA), sql.Literal(comment))
        )
    return True


def _drop_bookkeeping_if_unused(conn: Connection[Any]) -> None:
    """After a failed first run: drops the bookkeeping schema when it records no applied migration."""
    table = f"{BOOKKEEPING_SCHEMA}._yoyo_migration"
    used = _exists(conn, table) and conn.execute(f"SELECT count(*) FROM {table}").fetchone() != (0,)
    if not used:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(BOOKKEEPING_SCHEMA)))


def _adopt_public_bookkeeping(conn: Connection[Any], known: Sequence[str]) -> None:
    """Moves chunkq's rows from yoyo's tables in public (a database migrated before the bookkeeping schema) to
    the bookkeeping schema, in one transaction. Other applications' rows stay; public's yoyo tables are dropped
    only when nothing is left in them, i.e. they were chunkq's alone."""
    if not _exists(conn, "public._yoyo_migration"):
        return
    columns = {
        "_yoyo_migration": ["migration_hash", "migration_id", "applied_at_utc"],
        "_yoyo_log": [
            "id",
            "migration_hash",
            "migration_id",
            "operation",
            "username",
            "hostname",
            "comment",
            "created_at_utc",
        ],
    }
    ids = list(known)
    with conn.transaction():
        left = 0
        for table, names in columns.items():
            if not _exists(conn, f"public.{table}"):
                continue
            old, new = sql.Identifier("public", table), sql.Identifier(BOOKKEEPING_SCHEMA, table)
            cols = sql.SQL(", ").join(map(sql.Identifier, names))
            conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(old))
            moved = conn.execute(
                sql.SQL(
                    "INSERT INTO {new} ({cols}) SELECT {cols} FROM {old} WHERE migration_id = ANY(%s) "
                    "ON CONFLICT DO NOTHING"
                ).format(new=new, old=old, cols=cols),
                (ids,),
            ).rowcount
            conn.execute(sql.SQL("DELETE FROM {} WHERE migration_id = ANY(%s)").format(old), (ids,))
            left += conn.execute(sql.SQL("SELECT count(*) FROM {}").format(old)).fetchone()[0]  # type: ignore[index]
            if moved:
                logger.info("moved %d rows of public.%s to %s.%s", moved, table, BOOKKEEPING_SCHEMA, table)
        locked = _exists(conn, "public.yoyo_lock") and conn.execute("SELECT count(*) FROM public.yoyo_lock").fetchone()
        if left == 0 and locked in (None, False, (0,)):
            conn.execute("DROP TABLE IF EXISTS public._yoyo_migration, public._yoyo_log, public._yoyo_version")
            conn.execute("DROP TABLE IF EXISTS public.yoyo_lock")


def _undo(backend: Any, done: list[Any], failed: str, exc: BaseException) -> MigrationError:
    """Rolls back the migrations this run applied, newest first, after ``failed`` failed; the error to raise."""
    cause = f"migration {failed} failed: {_reason(exc)}"
    if not done:
        return MigrationError(f"{cause}; nothing else was applied, the database is as it was")
    undone: list[str] = []
    try:
        for migration in reversed(done):
            backend.rollback_migrations([migration])
            undone.append(migration.id)
    except Exception as again:
        left = done[len(done) - len(undone) - 1].id
        return MigrationError(
            f"{cause}; rolling back what this run applied failed too at {left} ({_reason(again)}): "
            f"the database is at {left}"
        )
    return MigrationError(f"{cause}; rolled back {', '.join(undone)} (applied by this run): the database is as it was")


def _reason(exc: BaseException) -> str:
    """Postgres's own message for a database error (without its CONTEXT lines), else the exception's, on one line."""
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return one_line(exc.diag.message_primary)
    return one_line(exc)
