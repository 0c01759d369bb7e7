"""Bad input: one line on stderr, a meaningful exit code, no traceback, the database unchanged."""

from __future__ import annotations

import pytest

from tests.cli.conftest import cli_env
from tests.helpers.db import new_job, snapshot


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["job", "show", "4242"], 3, "crawl job 4242 does not exist"),
        (["job", "progress", "4242"], 3, "crawl job 4242 does not exist"),
        (["job", "cancel", "4242"], 3, "crawl job 4242 does not exist"),
        (["job", "retry-failed", "4242"], 3, "crawl job 4242 does not exist"),
        (["job", "delete", "4242"], 3, "crawl job 4242 does not exist"),
        (["chunk", "list", "--job", "4242"], 3, "crawl job 4242 does not exist"),
        (["chunk", "retry", "4242"], 3, "chunk 4242 does not exist"),
        (["job", "create", "--name", "x", "--max-images", "-5"], 2, "max_images must be a positive number"),
        (["job", "create", "--name", "x", "--max-images", "10", "--chunk-size", "0"], 2, "chunk_size must be"),
        (["job", "create", "--name", "x", "--max-images", "10", "--priority", "99"], 2, "priority must be between"),
        (["job", "create", "--name", " ", "--max-images", "10"], 2, "name must be"),
        (["job", "create", "--name", "x", "--max-images", "10", "--keywords-json", "{nope"], 2, "is not JSON"),
        (["job", "create", "--name", "x", "--max-images", "10", "--max-retries", "-1"], 2, "max_retries"),
        (["chunk", "retry", "1"], 1, "cannot retry chunk 1: it is pending, not failed"),
    ],
)
def test_bad_input(chunkq, conn, args, code, message):
    new_job(conn, 500)
    before = snapshot(conn)
    result = chunkq(*args)
    assert result.code == code, result
    assert result.err.strip() == f"chunkq: {result.err.strip()[8:]}" and message in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert snapshot(conn) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["job", "list", "--limit", "0"], "must be at least 1"),
        (["job", "list", "--status", "done"], "one of pending, running"),
        (["chunk", "list", "--job", "1", "--status", "nope"], "one of pending, processing"),
        (["job", "create", "--max-images", "10"], "the following arguments are required: --name"),
    ],
)
def test_usage_errors_exit_2(chunkq, args, message):
    result = chunkq(*args)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err


def test_malformed_dsn(chunkq):
    result = chunkq("job", "list", env=cli_env(CHUNKQ_DSN="host=x dbname"))
    assert result.code == 2 and result.err.startswith("chunkq: invalid DSN") and "Traceback" not in result.err


def test_unreachable_database(chunkq):
    result = chunkq("stats", env=cli_env(CHUNKQ_DSN="postgresql://nobody@127.0.0.1:1/nothing"))
    assert result.code == 4 and result.err.startswith("chunkq: cannot connect to the database")
    assert len(result.err.strip().splitlines()) == 1


def test_unmigrated_database(chunkq, empty_dsn):
    result = chunkq("job", "list", env=cli_env(CHUNKQ_DSN=empty_dsn))
    assert result.code == 5 and "chunkq migrate" in result.err and "Traceback" not in result.err


def test_a_write_the_server_refuses_is_one_line(chunkq, conn, dsn):
    """Pointed at a standby (here: a read-only session), a write is refused with the server's own words."""
    before = snapshot(conn)
    result = chunkq(
        "job",
        "create",
        "--name",
        "x",
        "--max-images",
        "10",
        env=cli_env(CHUNKQ_DSN=dsn, PGOPTIONS="-c default_transaction_read_only=on"),
    )
    assert result.code == 1, result
    assert result.err.strip() == "chunkq: database error: cannot execute INSERT in a read-only transaction"
    assert snapshot(conn) == before
