"""chunkq migrate checks what the pending migrations need before it applies anything, and never leaves a
database half-migrated: the "second app database on a shared or managed cluster" case (docs/dba.md)."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import chunkq
from chunkq.embedded import embedded_server
from tests.helpers.db import MIGRATIONS
from tests.helpers.pool import ROOT

CLUSTER_SETUP = re.search(r"<!-- cluster-setup -->\n```sql\n(.*?)```", (ROOT / "docs" / "dba.md").read_text(), re.S)[1]


def run_migrate(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chunkq", "migrate", *args, "--dsn", dsn],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def schemas(dsn: str) -> list[str]:
    """Every schema but the system's, and every table outside them: a database's visible state."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"
            " UNION ALL SELECT n.nspname || '.' || c.relname"
            "  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' ORDER BY 1"
        ).fetchall()
    return [row[0] for row in rows]


@pytest.fixture
def app_database(pg_server) -> Iterator[tuple[str, str, str]]:
    """(admin DSN, owner DSN, database): a database owned by a login role without CREATEROLE, as a managed
    cluster hands out; dropped afterwards with its role."""
    name = f"chunkq_test_owned_{uuid.uuid4().hex[:8]}"
    admin = pg_server.dsn
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw' NOCREATEROLE").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
    try:
        yield make_conninfo(admin, dbname=name), make_conninfo(admin, dbname=name, user=name, password="pw"), name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_a_database_owner_without_createrole_migrates_where_the_roles_exist(app_database):
    """The shared cluster: another database made the chunkq_* roles already (the test cluster has them)."""
    admin, owner, _ = app_database
    with psycopg.connect(admin) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'chunkq\\_%' AND rolname IN"
            " ('chunkq_app', 'chunkq_reader', 'chunkq_worker')"
        ).fetchone() == (3,)
    result = run_migrate(owner)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"applied {', '.join(MIGRATIONS)}"
    with psycopg.connect(owner) as conn:
        assert chunkq.check_schema(conn) == chunkq.SCHEMA_VERSION


def test_a_role_without_create_on_the_database_is_refused_and_nothing_changes(app_database, pg_server):
    admin, _, owner_name = app_database
    name = f"chunkq_test_deployer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(name)))
    try:
        deployer = make_conninfo(admin, user=name, password="pw")
        before = schemas(admin)
        result = run_migrate(deployer)
        assert result.returncode == 1, result
        assert result.stderr.strip().splitlines() == [
            f"chunkq: cannot migrate, nothing was changed: creating schema chunkq_migrations and chunkq needs CREATE on"
            f" database {owner_name}: as its owner or a superuser, run GRANT CREATE ON DATABASE {owner_name} TO {name}"
        ]
        assert schemas(admin) == before
        with psycopg.connect(admin, autocommit=True) as conn:  # the fix the message gives
            conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(*map(sql.Identifier, (owner_name, name))))
        assert run_migrate(deployer).returncode == 0
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(owner_name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.mark.slow
def test_a_database_owner_without_createrole_on_a_cluster_without_the_roles_is_refused(tmp_path):
    """A fresh cluster of its own (the roles are cluster-wide: the shared test cluster has them)."""
    with embedded_server(tmp_path) as superuser:
        with psycopg.connect(superuser, autocommit=True) as conn:
            conn.execute("CREATE ROLE app_owner LOGIN NOCREATEROLE")
            conn.execute("CREATE DATABASE app OWNER app_owner")
        owner, admin = make_conninfo(superuser, user="app_owner", dbname="app"), make_conninfo(superuser, dbname="app")
        before = schemas(admin)

        result = run_migrate(owner)
        assert result.returncode == 1, result
        (line,) = result.stderr.strip().splitlines()
        prefix = (
            "chunkq: cannot migrate, nothing was changed: 0005.roles creates the cluster-wide roles chunkq_reader,"
            " chunkq_worker, chunkq_app, which needs CREATEROLE; a superuser creates them once per cluster: "
        )
        assert line.startswith(prefix), line
        assert schemas(admin) == before  # not 0001-0004, nor the bookkeeping: nothing
        with pytest.raises(chunkq.MigrationError, match="needs CREATEROLE"):
            chunkq.migrate(owner)

        statements = line.removeprefix(prefix)
        assert statements.split() == CLUSTER_SETUP.split()  # what docs/dba.md shows
        with psycopg.connect(superuser, autocommit=True) as conn:  # what the message says a superuser runs
            conn.execute(statements)
        result = run_migrate(owner)
        assert result.returncode == 0, result.stderr
        with psycopg.connect(owner) as conn:
            assert chunkq.check_schema(conn) == chunkq.SCHEMA_VERSION


FAIL_AT_0009 = """
CREATE FUNCTION public.fail_0009() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands() WHERE object_identity = 'chunkq.job_chunks_retry_wait') THEN
        RAISE EXCEPTION 'no room for that index';
    END IF;
END $$;
CREATE EVENT TRIGGER fail_0009 ON ddl_command_end EXECUTE FUNCTION public.fail_0009();
"""


def test_a_migration_that_fails_half_way_rolls_back_what_the_run_applied(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(FAIL_AT_0009)
    before = schemas(empty_dsn)
    with pytest.raises(chunkq.MigrationError) as failed:
        chunkq.migrate(empty_dsn)
    assert str(failed.value) == (
        "migration 0009.operator-safety failed: no room for that index; rolled back "
        f"{', '.join(reversed(MIGRATIONS[: MIGRATIONS.index('0009.operator-safety')]))} (applied by this run): "
        "the database is as it was"
    )
    assert schemas(empty_dsn) == before  # no schema chunkq, no bookkeeping either

    result = run_migrate(empty_dsn)  # the CLI: one line, exit 1
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result
    assert "the database is as it was" in result.stderr and "Traceback" not in result.stderr


def test_a_failed_upgrade_goes_back_to_where_it_started(empty_dsn):
    first = MIGRATIONS[:4]
    chunkq.migrate(empty_dsn)
    chunkq.rollback(empty_dsn, steps=len(MIGRATIONS) - len(first))  # now at 0004
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(FAIL_AT_0009)
    with pytest.raises(chunkq.MigrationError, match="rolled back 0008.lease-token, .*, 0005.roles"):
        chunkq.migrate(empty_dsn)
    assert chunkq.schema.status(empty_dsn) == [(m, m in first) for m in MIGRATIONS]
    with psycopg.connect(empty_dsn) as conn:
        assert conn.execute("SELECT chunkq.schema_version()").fetchone() == (4,)
