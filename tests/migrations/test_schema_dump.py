"""sql/chunkq.sql, the schema in one readable file, is what the migrations make (tools/dump_schema.py)."""

from __future__ import annotations

import psycopg
import pytest

from tools.dump_schema import TARGET, dump, stale_diff, unqualify_single_relation


def test_sql_chunkq_sql_is_the_migrated_schema(dsn):
    with psycopg.connect(dsn) as conn:
        actual = dump(conn)
    committed = TARGET.read_text() if TARGET.exists() else ""
    if actual != committed:
        pytest.fail(
            "sql/chunkq.sql is not the schema the migrations make: run ./dev gen and commit it\n"
            + stale_diff(committed, actual),
            pytrace=False,
        )


def test_the_dump_shows_every_kind_of_change(conn):
    """The rollback test compares dumps: each of these must change one."""
    job_progress = conn.execute("SELECT pg_get_functiondef('chunkq.job_progress(bigint)'::regprocedure)").fetchone()[0]
    changes = {
        "a function body": job_progress.replace("$function$", "$function$ ", 1),
        "a function's comment": "COMMENT ON FUNCTION chunkq.job_progress(bigint) IS 'changed'",
        "a type's comment": "COMMENT ON TYPE chunkq.chunk_outcome IS 'changed'",
        "a column's comment": "COMMENT ON COLUMN chunkq.job_chunks.priority IS 'changed'",
        "a grant to PUBLIC": "GRANT EXECUTE ON FUNCTION chunkq.job_progress(bigint) TO PUBLIC",
        "a role's grant": "REVOKE SELECT ON chunkq.settings FROM chunkq_reader",
        "a column's default": "ALTER TABLE chunkq.crawl_jobs ALTER COLUMN keywords SET DEFAULT '{}'",
        "a new column": "ALTER TABLE chunkq.job_chunks ADD COLUMN note text",
        "a storage parameter": "ALTER TABLE chunkq.job_chunks SET (fillfactor = 90)",
        "an index": "DROP INDEX chunkq.job_chunks_failed_by_job",
        "a trigger": "ALTER TABLE chunkq.job_chunks DISABLE TRIGGER job_chunks_job_id_fixed",
        "a constraint": "ALTER TABLE chunkq.job_chunks DROP CONSTRAINT job_chunks_failed_has_error",
        "a view": "CREATE OR REPLACE VIEW chunkq.queue_depth AS SELECT * FROM chunkq.queue_depth WHERE true",
    }
    before = dump(conn)
    for change, statement in changes.items():
        conn.execute(statement)
        after = dump(conn)
        assert after != before, f"the dump does not show {change}"
        before = after


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # PostgreSQL 15 qualifies the columns of a single-relation view; 16 and later do not
        (
            "SELECT c.id, c.job_id FROM chunkq.job_chunks c WHERE c.id > 0 GROUP BY c.id;",
            "SELECT id, job_id FROM chunkq.job_chunks c WHERE id > 0 GROUP BY id;",
        ),
        ("SELECT job_chunks.id FROM chunkq.job_chunks;", "SELECT id FROM chunkq.job_chunks;"),
        ("SELECT count(*) FILTER (WHERE c.x) FROM t c;", "SELECT count(*) FILTER (WHERE x) FROM t c;"),
        ("SELECT w.a FROM chunkq.f() w(a, b);", "SELECT a FROM chunkq.f() w(a, b);"),
        ("SELECT s.id FROM ( SELECT c.id FROM t c) s;", "SELECT id FROM ( SELECT c.id FROM t c) s;"),
        # ... but sub-queries stay qualified on every version
        (
            "SELECT c.id FROM t c WHERE EXISTS ( SELECT 1 FROM u WHERE u.id = c.id);",
            "SELECT id FROM t c WHERE EXISTS ( SELECT 1 FROM u WHERE u.id = c.id);",
        ),
        # and nothing else is touched: a whole-row reference, a string, a quoted name
        ("SELECT f(c.*), 'c.id', \"c.id\" FROM t c;", "SELECT f(c.*), 'c.id', \"c.id\" FROM t c;"),
    ],
)
def test_views_of_one_relation_read_the_same_on_15_and_18(before, after):
    assert unqualify_single_relation(before) == after


@pytest.mark.parametrize(
    "viewdef",
    [
        "SELECT c.id, j.id FROM t c JOIN u j ON j.id = c.id;",
        "SELECT c.id FROM t c, u j;",
        "SELECT c.id FROM t c UNION SELECT c.id FROM u c;",
        "SELECT c.id FROM (t c JOIN u j ON true) x;",
    ],
)
def test_views_of_several_relations_are_left_qualified(viewdef):
    assert unqualify_single_relation(viewdef) == viewdef
