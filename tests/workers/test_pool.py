"""The pool end to end: draining many chunks exactly once, bad input, graceful and forced shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter

import psycopg
import pytest

from chunkq.testing import other_connections
from tests.helpers.db import assert_counters_consistent, new_job
from tests.helpers.pool import ROOT, progress, wait_until

NOOP = ("--handler", "chunkq.workers.sample:noop")


@pytest.mark.slow
def test_four_processes_drain_10000_chunks_of_3_jobs_exactly_once(dsn, conn, start_pool):
    jobs = [new_job(conn, 500 * n, chunk_size=500) for n in (4000, 3500, 2500)]
    pool = start_pool(*NOOP, "--processes", "4")
    wait_until(lambda: progress(dsn).get("completed") == 10_000, 240, "10,000 completed chunks")
    assert pool.stop() == 0

    rows = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'completed'), max(attempt), max(retry_count)"
        " FROM chunkq.job_chunks"
    ).fetchone()
    assert rows == (10_000, 10_000, 1, 0)  # every chunk claimed once, completed once
    outcomes = pool.outcomes()
    assert Counter(o["outcome"] for o in outcomes) == {"completed": 10_000}
    assert len({o["chunk"] for o in outcomes}) == 10_000
    assert {o["job"] for o in outcomes} == set(jobs)
    assert len({o["worker"] for o in outcomes}) == 4, "all four workers should have worked"
    assert conn.execute("SELECT count(*) FROM chunkq.crawl_jobs WHERE status = 'completed'").fetchone() == (3,)
    assert_counters_consistent(conn)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--handler", "no.such.module:f"), "cannot import 'no.such.module'"),
        (("--handler", "chunkq.workers.sample:missing"), "has no 'missing'"),
        (("--handler", "tests.helpers.handlers:NOT_CALLABLE"), "is a str, not a function"),
        (("--handler", "workers.sample"), "must look like package.module:function"),
        (("--handler", "chunkq.workers.sample:noop", "--processes", "0"), "--processes must be at least 1"),
        (("--handler", "chunkq.workers.sample:noop", "--lease", "-5"), "--lease must be a positive"),
        (("--handler", "chunkq.workers.sample:noop", "--poll", "0"), "--poll must be a positive"),
        (("--handler", "chunkq.workers.sample:noop", "--heartbeat", "0"), "--heartbeat must be a positive"),
        (
            ("--handler", "chunkq.workers.sample:noop", "--lease", "5", "--heartbeat", "5"),
            "must be shorter than --lease",
        ),
        (("--handler", "chunkq.workers.sample:noop", "--batch", "0"), "--batch must be between 1 and 1000"),
        (("--handler", "chunkq.workers.sample:noop", "--max-retries", "-1"), "--max-retries must not be negative"),
    ],
)
def test_bad_options_exit_2_before_claiming(dsn, conn, args, message):
    new_job(conn, 1500)
    result = run_cli("--dsn", dsn, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert progress(dsn) == {"pending": 3}


@pytest.mark.parametrize(
    ("dsn_arg", "code", "message"),
    [
        ("host=localhost dbname", 2, "invalid DSN"),
        ("postgresql://nobody@127.0.0.1:1/nothing", 4, "cannot connect to the database"),
    ],
)
def test_bad_or_unreachable_dsn(dsn_arg, code, message):
    result = run_cli("--dsn", dsn_arg, "--handler", "chunkq.workers.sample:noop")
    assert (result.returncode, "Traceback" in result.stderr) == (code, False)
    assert message in result.stderr


def test_missing_dsn_exits_4(monkeypatch):
    monkeypatch.delenv("CHUNKQ_DSN", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    result = run_cli("--handler", "chunkq.workers.sample:noop")
    assert result.returncode == 4 and "no database" in result.stderr


def test_unknown_job_filter_exits_2(dsn, conn):
    new_job(conn, 1500)
    result = run_cli("--dsn", dsn, "--handler", "chunkq.workers.sample:noop", "--job", "4242")
    assert result.returncode == 2 and "--job 4242: no such crawl job" in result.stderr
    assert progress(dsn) == {"pending": 3}


def test_unmigrated_database_exits_2(empty_dsn):
    result = run_cli("--dsn", empty_dsn, "--handler", "chunkq.workers.sample:noop")
    assert result.returncode == 2 and "chunkq schema is missing or outdated" in result.stderr


def test_older_schema_exits_2_before_claiming(dsn, conn):
    new_job(conn, 1500)
    conn.execute("CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer LANGUAGE sql AS 'SELECT 1'")
    result = run_cli("--dsn", dsn, "--handler", "chunkq.workers.sample:noop")
    assert result.returncode == 2 and "schema is at version 1" in result.stderr
    assert progress(dsn) == {"pending": 3}


def processing(dsn: str) -> int:
    return progress(dsn).get("processing", 0)


def test_sigterm_while_workers_are_still_starting_is_a_clean_stop(dsn, conn, start_pool):
    new_job(conn, 500 * 4)
    pool = start_pool(*NOOP, "--processes", "2")
    # The supervisor has started both workers; they are still importing, before their SIGTERM handler.
    wait_until(lambda: pool.text().count("worker process started") == 2, 30, "two workers started")
    pool.signal(signal.SIGTERM)
    assert pool.wait(30) == 0
    assert any(line["message"] == "pool stopped" for line in pool.lines())
    assert progress(dsn).get("processing", 0) == 0


def test_sigterm_lets_running_chunks_finish(dsn, conn, start_pool):
    new_job(conn, 500 * 10)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:sleepy",
        "--processes",
        "2",
        "--grace",
        "20",
        env={"CHUNKQ_TEST_SLEEP": "1.5"},
    )
    wait_until(lambda: processing(dsn) == 2, 30, "two running chunks")
    pool.signal(signal.SIGTERM)
    assert pool.wait(30) == 0
    counts = progress(dsn)
    assert counts.get("processing", 0) == 0 and counts["completed"] >= 2 and counts["pending"] >= 6
    assert conn.execute("SELECT max(retry_count) FROM chunkq.job_chunks").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)
    assert any(line["message"].startswith("draining") for line in pool.lines())


def test_sigterm_hands_back_chunks_that_outlast_the_grace_period(dsn, conn, start_pool):
    job_id = new_job(conn, 500 * 10)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:sleepy",
        "--processes",
        "2",
        "--batch",
        "3",
        "--grace",
        "1",
        env={"CHUNKQ_TEST_SLEEP": "60"},
    )
    wait_until(lambda: processing(dsn) == 6, 30, "six claimed chunks")
    pool.signal(signal.SIGTERM)
    started = time.monotonic()
    assert pool.wait(30) == 0
    assert time.monotonic() - started < 10
    assert progress(dsn) == {"pending": 10}  # all back, nothing failed
    row = conn.execute("SELECT max(retry_count), max(attempt) FROM chunkq.job_chunks").fetchone()
    assert row == (0, 1)  # no retry spent; the six released chunks had been claimed once
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)
    released = [o for o in pool.lines() if o.get("outcome") == "released"]
    assert len(released) == 6
    # Handed back chunks are claimable again at once.
    again = start_pool(*NOOP, "--processes", "1")
    wait_until(lambda: progress(dsn, job_id) == {"completed": 10}, 30, "the released chunks completed")
    assert again.stop() == 0


def test_a_drain_past_its_grace_reports_finished_chunks_as_finished(dsn, conn, start_pool, tmp_path):
    """Chunks 0-2 finish at once and wait to be reported with the next claim; chunk 3 outlasts the grace."""
    job_id = new_job(conn, 500 * 4)
    mark = tmp_path / "slow-started"
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:slow_index",
        "--processes",
        "1",
        "--batch",
        "4",
        "--grace",
        "1",
        env={"CHUNKQ_TEST_SLEEP": "60", "CHUNKQ_TEST_SLOW_INDEX": "3", "CHUNKQ_TEST_MARK": str(mark)},
    )
    wait_until(mark.exists, 30, "the slow chunk to start")
    pool.signal(signal.SIGTERM)
    assert pool.wait(30) == 0
    rows = conn.execute(
        "SELECT chunk_index, status::text, attempt, retry_count FROM chunkq.job_chunks WHERE job_id = %s"
        " ORDER BY chunk_index",
        (job_id,),
    ).fetchall()
    assert rows == [(0, "completed", 1, 0), (1, "completed", 1, 0), (2, "completed", 1, 0), (3, "pending", 1, 0)]
    assert [line.get("outcome") for line in pool.lines()].count("released") == 1
    assert_counters_consistent(conn)


def test_second_signal_exits_at_once(dsn, conn, start_pool):
    new_job(conn, 500 * 4)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:sleepy",
        "--processes",
        "2",
        "--grace",
        "60",
        env={"CHUNKQ_TEST_SLEEP": "60"},
    )
    wait_until(lambda: processing(dsn) == 2, 30, "two running chunks")
    pool.signal(signal.SIGTERM)
    time.sleep(0.5)
    pool.signal(signal.SIGTERM)
    assert pool.wait(10) == 1
    assert processing(dsn) == 2  # left to expire: the next claim after the lease reclaims them


def test_sigint_twice_as_from_a_terminal(dsn, conn, start_pool):
    """Ctrl-C reaches every process of the group; workers ignore it and the supervisor counts."""
    new_job(conn, 500 * 4)
    pool = start_pool("--handler", "tests.helpers.handlers:sleepy", "--processes", "2", env={"CHUNKQ_TEST_SLEEP": "60"})
    wait_until(lambda: processing(dsn) == 2, 30, "two running chunks")
    import os

    os.killpg(pool.proc.pid, signal.SIGINT)
    time.sleep(0.5)
    assert pool.proc.poll() is None, "one Ctrl-C must drain, not kill"
    os.killpg(pool.proc.pid, signal.SIGINT)
    assert pool.wait(10) == 1


def test_log_lines_are_human_readable_by_default(dsn, conn, tmp_path):
    new_job(conn, 500)
    log = tmp_path / "text.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "--dsn", dsn, *NOOP, "--processes", "1"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(lambda: "chunk completed" in log.read_text(), 30, "an outcome line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    line = next(line for line in log.read_text().splitlines() if "chunk completed" in line)
    for field in ("job=", "chunk=", "index=0", "attempt=1", "outcome=completed", "duration_ms=", "worker="):
        assert field in line
    assert not line.startswith("{")


def test_connection_count_is_processes_plus_one(dsn, conn, start_pool):
    pool = start_pool(*NOOP, "--processes", "3")
    wait_until(lambda: len(pool.worker_pids()) == 3, 30, "three workers")
    time.sleep(0.5)
    assert len(other_connections(conn)) == 4
    assert pool.stop() == 0


def test_database_unchanged_by_an_idle_pool(dsn, conn, start_pool):
    pool = start_pool(*NOOP, "--processes", "2", "--poll", "0.2")
    wait_until(lambda: len(pool.worker_pids()) == 2, 30, "two workers")
    time.sleep(1)
    assert pool.stop() == 0
    with psycopg.connect(dsn) as check:
        assert check.execute("SELECT count(*) FROM chunkq.job_chunks").fetchone() == (0,)


def test_job_deleted_under_a_job_filter_idles_the_pool(dsn, conn, start_pool):
    job_id = new_job(conn, 500)
    pool = start_pool(*NOOP, "--processes", "1", "--poll", "0.2", "--job", str(job_id))
    wait_until(lambda: progress(dsn, job_id) == {"completed": 1}, 30, "the chunk to complete")
    conn.execute("DELETE FROM chunkq.crawl_jobs WHERE id = %s", (job_id,))
    wait_until(
        lambda: any(line["message"] == "the job to work on no longer exists" for line in pool.lines()),
        10,
        "the worker to notice",
    )
    assert pool.stop() == 0
    assert not any("died" in line["message"] or "crashed" in line["message"] for line in pool.lines())
