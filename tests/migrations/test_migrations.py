"""Migrations: the stock yoyo CLI, chunkq.migrate(), rollbacks, comments (sql/chunkq.sql: test_schema_dump.py)."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

import chunkq
from chunkq.schema import migrations_path, status, yoyo_url
from tests.helpers.db import MIGRATIONS
from tools.dump_schema import dump

ROOT = Path(__file__).resolve().parents[2]


def yoyo(*args: str, dsn: str, schema: str | None = "chunkq_migrations", folder: str = "migrations"):
    """The stock yoyo CLI, as the README shows it: its bookkeeping in schema chunkq_migrations, which is created
    once beforehand (None: yoyo's default, public, as databases were migrated before)."""
    if schema is not None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    command = [str(Path(sys.executable).with_name("yoyo")), *args, "--batch", "--database", yoyo_url(dsn, schema)]
    return subprocess.run(command + [folder], cwd=ROOT, capture_output=True, text=True, timeout=120)


def tables(dsn: str, schema: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relnamespace = to_regnamespace(%s) AND c.relkind = 'r'"
            " ORDER BY 1",
            (schema,),
        ).fetchall()
    return [row[0] for row in rows]


def bookkept(dsn: str, schema: str) -> list[str]:
    """Migration ids yoyo's table in ``schema`` records as applied."""
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(f"SELECT migration_id FROM {schema}._yoyo_migration ORDER BY 1")]


YOYO_TABLES = ["_yoyo_log", "_yoyo_migration", "_yoyo_version", "yoyo_lock"]


def chunkq_schema_exists(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'chunkq'").fetchone()[0] == 1


def test_stock_yoyo_cli_applies_rolls_back_and_reapplies(empty_dsn):
    applied = yoyo("apply", dsn=empty_dsn)
    assert applied.returncode == 0, applied.stderr
    assert chunkq_schema_exists(empty_dsn)
    assert tables(empty_dsn, "public") == [] and tables(empty_dsn, "chunkq_migrations") == YOYO_TABLES
    assert chunkq.migrate(empty_dsn) == []  # chunkq.migrate reads the same bookkeeping
    rolled_back = yoyo("rollback", "--all", dsn=empty_dsn)
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert not chunkq_schema_exists(empty_dsn)
    again = yoyo("apply", dsn=empty_dsn)
    assert again.returncode == 0, again.stderr
    with psycopg.connect(empty_dsn) as conn:
        assert chunkq.check_schema(conn) == chunkq.SCHEMA_VERSION


def test_migrate_leaves_public_alone(empty_dsn):
    """yoyo's tables are not the application's: Alembic's autogenerate of the host app must not see them."""
    assert chunkq.migrate(empty_dsn) == MIGRATIONS
    assert tables(empty_dsn, "public") == []
    assert tables(empty_dsn, "chunkq_migrations") == YOYO_TABLES
    assert bookkept(empty_dsn, "chunkq_migrations") == MIGRATIONS
    with psycopg.connect(empty_dsn) as conn:
        assert (
            conn.execute("SELECT obj_description('chunkq_migrations'::regnamespace)")
            .fetchone()[0]
            .startswith("chunkq: yoyo's bookkeeping")
        )


OTHER_APP = "other-app-0001"


def other_apps_yoyo_migration(dsn: str, tmp_path: Path) -> None:
    """Another application of the same database that uses yoyo too, its bookkeeping in public."""
    folder = tmp_path / "other-app"
    folder.mkdir()
    (folder / f"{OTHER_APP}.sql").write_text("CREATE TABLE other_app_things (id integer);\n")
    (folder / f"{OTHER_APP}.rollback.sql").write_text("DROP TABLE other_app_things;\n")
    applied = yoyo("apply", dsn=dsn, schema=None, folder=str(folder))
    assert applied.returncode == 0, applied.stderr


@pytest.mark.parametrize("shared", [False, True], ids=["chunkq-alone", "with-another-app"])
def test_a_database_migrated_the_old_way_moves_its_bookkeeping_out_of_public(empty_dsn, tmp_path, shared):
    """Applied with the stock CLI as the README used to say (bookkeeping in public), then `chunkq migrate`."""
    if shared:
        other_apps_yoyo_migration(empty_dsn, tmp_path)
    old_way = yoyo("apply", dsn=empty_dsn, schema=None)
    assert old_way.returncode == 0, old_way.stderr
    assert set(YOYO_TABLES) <= set(tables(empty_dsn, "public"))

    migrated = subprocess.run(
        [sys.executable, "-m", "chunkq", "migrate", "--dsn", empty_dsn], cwd=ROOT, capture_output=True, text=True
    )
    assert (migrated.returncode, migrated.stdout.strip()) == (0, "the schema is up to date"), migrated.stderr
    assert bookkept(empty_dsn, "chunkq_migrations") == MIGRATIONS
    if shared:  # the other application's rows and tables stay where its yoyo looks for them
        assert bookkept(empty_dsn, "public") == [OTHER_APP]
        assert set(YOYO_TABLES) <= set(tables(empty_dsn, "public"))
        with psycopg.connect(empty_dsn) as conn:
            logged = conn.execute("SELECT DISTINCT migration_id FROM public._yoyo_log").fetchall()
        assert logged == [(OTHER_APP,)]
    else:  # chunkq's alone: gone from public
        assert tables(empty_dsn, "public") == []
    assert status(empty_dsn) == [(m, True) for m in MIGRATIONS]
    assert chunkq.rollback(empty_dsn, steps=1) == MIGRATIONS[-1:]  # from the bookkeeping's new home
    assert chunkq.migrate(empty_dsn) == MIGRATIONS[-1:]


def test_yoyo_url_accepts_every_dsn_form():
    assert yoyo_url("postgresql://u:p%40ss@db.example:6543/app?sslmode=disable").startswith("postgresql+psycopg:///?")
    assert "host=%2Ftmp%2Fsock" in yoyo_url("postgresql://postgres:@/postgres?host=/tmp/sock")
    assert "dbname=app" in yoyo_url("host=localhost dbname=app user=me")
    assert yoyo_url("dbname=app").endswith("schema=chunkq_migrations") and "schema" not in yoyo_url("dbname=a", None)
    with pytest.raises(chunkq.ValidationError, match="invalid DSN"):
        yoyo_url("host=localhost dbname")


def test_migrate_is_idempotent_and_rollback_removes_everything(empty_dsn):
    assert chunkq.migrate(empty_dsn) == MIGRATIONS
    assert chunkq.migrate(empty_dsn) == []
    assert chunkq.rollback(empty_dsn) == MIGRATIONS[::-1]
    assert not chunkq_schema_exists(empty_dsn)


def test_a_database_one_migration_behind_is_refused_then_upgraded(empty_dsn):
    first = yoyo("apply", "--revision", "0001.chunk-queue", dsn=empty_dsn)
    assert first.returncode == 0, first.stderr
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT chunkq.schema_version()").fetchone() == (1,)
        with pytest.raises(chunkq.SchemaNotMigrated, match=f"version 1, this client needs {chunkq.SCHEMA_VERSION}"):
            chunkq.check_schema(conn)
        assert chunkq.migrate(empty_dsn) == MIGRATIONS[1:]
        assert chunkq.check_schema(conn) == chunkq.SCHEMA_VERSION


def test_rolling_back_to_0001_restores_its_api(empty_dsn):
    chunkq.migrate(empty_dsn)
    rolled = yoyo("rollback", "--revision", "0002.worker-pool", dsn=empty_dsn)  # the newest back to 0002
    assert rolled.returncode == 0, rolled.stderr
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        signatures = {
            row[0]
            for row in conn.execute(
                "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'chunkq'::regnamespace"
                " AND p.proname IN ('fail_chunk', 'release_chunk', 'heartbeat_chunks', 'schema_version', 'list_chunks',"
                " 'list_jobs', 'job_progress')"
            )
        }
        assert signatures == {
            "chunkq.fail_chunk(bigint,integer,text,boolean)",
            "chunkq.schema_version()",
            "chunkq.list_chunks(bigint,chunkq.chunk_status)",
            "chunkq.job_progress(bigint)",
        }
        assert conn.execute("SELECT chunkq.schema_version()").fetchone() == (1,)


def test_each_rollback_restores_the_schema_before_its_migration(empty_dsn):
    """Compares the whole dump (sql/chunkq.sql's text): function bodies, comments, grants, columns, ..."""
    before = []  # the schema before each migration, then after the last
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        for migration in MIGRATIONS:
            before.append(dump(conn) if chunkq_schema_exists(empty_dsn) else "no schema")
            applied = yoyo("apply", "--revision", migration, dsn=empty_dsn)
            assert applied.returncode == 0, applied.stderr
        for migration, expected in zip(MIGRATIONS[::-1], before[::-1], strict=True):
            assert chunkq.rollback(empty_dsn, steps=1) == [migration]
            after = dump(conn) if chunkq_schema_exists(empty_dsn) else "no schema"
            diff = "".join(difflib.unified_diff(expected.splitlines(True), after.splitlines(True), "before", "after"))
            assert after == expected, f"rolling back {migration} left a different schema:\n{diff}"


def test_every_migration_has_a_rollback():
    forward = sorted(p for p in migrations_path().glob("*.sql") if not p.name.endswith(".rollback.sql"))
    assert forward, "no migrations found"
    for path in forward:
        assert path.with_name(path.stem + ".rollback.sql").exists(), path.name


def test_every_object_in_the_schema_has_a_comment(conn):
    missing = conn.execute(
        """
        SELECT 'schema chunkq' WHERE obj_description('chunkq'::regnamespace, 'pg_namespace') IS NULL
        UNION ALL
        SELECT 'relation ' || c.relname FROM pg_class c
         WHERE c.relnamespace = 'chunkq'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'i')
           AND obj_description(c.oid, 'pg_class') IS NULL
           AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = c.oid)  -- PK/UNIQUE indexes
        UNION ALL
        SELECT 'column ' || c.relname || '.' || a.attname FROM pg_class c
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE c.relnamespace = 'chunkq'::regnamespace AND c.relkind IN ('r', 'v', 'm')
           AND col_description(c.oid, a.attnum) IS NULL
        UNION ALL
        SELECT 'type ' || t.typname FROM pg_type t
         WHERE t.typnamespace = 'chunkq'::regnamespace AND t.typtype IN ('e', 'c')
           AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
           AND obj_description(t.oid, 'pg_type') IS NULL
        UNION ALL
        SELECT 'function ' || p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'chunkq'::regnamespace AND obj_description(p.oid, 'pg_proc') IS NULL
        """
    ).fetchall()
    assert missing == []
