"""Many chunks per worker process: async handlers, threads, SIGTERM and kill -9 with chunks in flight, checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict

import pytest

from chunkq.testing import other_connections
from tests.helpers.db import assert_counters_consistent, new_job, statuses
from tests.helpers.pool import ROOT, progress, wait_until
from tests.sql.test_scheduling import job, overlap

FAST_LEASE = ("--lease", "2", "--heartbeat", "0.4", "--poll", "0.3")


def overlaps(marks) -> int:
    runs = [tuple(map(float, line.split()[1:])) for line in marks.read_text().splitlines()]
    return overlap(runs)


def connections(conn) -> int:
    return len(other_connections(conn))


@pytest.mark.slow
def test_an_async_handler_runs_many_chunks_at_once_over_one_connection(dsn, conn, start_pool, tmp_path):
    marks = tmp_path / "marks"
    job_id = job(conn, 60)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:async_record_overlap",
        "--processes",
        "1",
        "--concurrency",
        "20",
        env={"CHUNKQ_TEST_SLEEP": "0.5", "CHUNKQ_TEST_MARK": str(marks)},
    )
    wait_until(lambda: progress(dsn, job_id).get("processing", 0) >= 15, 30, "many chunks running at once")
    assert connections(conn) == 2  # the worker's one connection and the supervisor's LISTEN
    wait_until(lambda: progress(dsn, job_id) == {"completed": 60}, 60, "the job to complete")
    assert pool.stop() == 0
    assert 15 <= overlaps(marks) <= 20
    assert Counter(o["outcome"] for o in pool.outcomes()) == {"completed": 60}
    assert conn.execute("SELECT max(attempt) FROM chunkq.job_chunks").fetchone() == (1,)
    assert_counters_consistent(conn)


@pytest.mark.slow
def test_a_plain_handler_runs_in_threads_up_to_the_concurrency(dsn, conn, start_pool, tmp_path):
    marks = tmp_path / "marks"
    job_id = job(conn, 24)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:record_overlap",
        "--processes",
        "1",
        "--concurrency",
        "4",
        env={"CHUNKQ_TEST_SLEEP": "0.2", "CHUNKQ_TEST_MARK": str(marks)},
    )
    wait_until(lambda: progress(dsn, job_id) == {"completed": 24}, 60, "the job to complete")
    assert pool.stop() == 0
    assert overlaps(marks) == 4
    assert_counters_consistent(conn)


def test_sigterm_lets_every_chunk_in_flight_finish_within_the_grace(dsn, conn, start_pool):
    job_id = job(conn, 30)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:async_slow_first",
        "--processes",
        "1",
        "--concurrency",
        "10",
        "--grace",
        "20",
        env={"CHUNKQ_TEST_SLEEP": "1"},
    )
    wait_until(lambda: progress(dsn, job_id).get("processing", 0) == 10, 30, "ten chunks in flight")
    pool.signal(signal.SIGTERM)
    assert pool.wait(30) == 0
    assert statuses(conn, job_id) == {"completed": 10, "pending": 20}
    assert conn.execute("SELECT max(retry_count) FROM chunkq.job_chunks").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)


def test_sigterm_hands_back_every_chunk_in_flight_that_outlasts_the_grace(dsn, conn, start_pool):
    job_id = job(conn, 30)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:async_slow_first",
        "--processes",
        "1",
        "--concurrency",
        "10",
        "--batch",
        "15",
        "--grace",
        "1",
        env={"CHUNKQ_TEST_SLEEP": "60"},
    )
    wait_until(lambda: progress(dsn, job_id).get("processing", 0) == 15, 30, "fifteen chunks held, ten running")
    pool.signal(signal.SIGTERM)
    started = time.monotonic()
    assert pool.wait(30) == 0
    assert time.monotonic() - started < 10
    assert statuses(conn, job_id) == {"pending": 30}
    assert conn.execute("SELECT max(retry_count), max(attempt) FROM chunkq.job_chunks").fetchone() == (0, 1)
    released = [line for line in pool.lines() if line.get("outcome") == "released"]
    assert len(released) == 15


@pytest.mark.slow
def test_kill_9_with_chunks_in_flight_loses_and_doubles_nothing(dsn, conn, start_pool):
    job_id = job(conn, 10)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:async_slow_first",
        "--processes",
        "1",
        "--concurrency",
        "10",
        *FAST_LEASE,
        env={"CHUNKQ_TEST_SLEEP": "60"},
    )
    wait_until(lambda: progress(dsn, job_id).get("processing", 0) == 10, 30, "ten chunks in flight")
    (victim,) = pool.worker_pids()
    os.kill(victim, signal.SIGKILL)
    # The replacement reclaims the ten once their leases lapse; their second attempts are instant.
    wait_until(lambda: progress(dsn, job_id) == {"completed": 10}, 60, "the ten abandoned chunks re-run")
    assert pool.stop() == 0
    rows = conn.execute("SELECT attempt, retry_count FROM chunkq.job_chunks WHERE job_id = %s", (job_id,)).fetchall()
    assert rows == [(2, 1)] * 10  # each re-run once, its lapse counted as one retry
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors WHERE lease_expired").fetchone() == (10,)
    assert Counter(o["outcome"] for o in pool.outcomes() if o["pid"] != victim) == {"completed": 10}
    assert_counters_consistent(conn)


def test_cancelling_a_job_stops_every_chunk_in_flight(dsn, conn, start_pool):
    job_id = job(conn, 20)
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:async_until_stopped",
        "--processes",
        "1",
        "--concurrency",
        "8",
        *FAST_LEASE,
    )
    wait_until(lambda: progress(dsn, job_id).get("processing", 0) == 8, 30, "eight chunks in flight")
    conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    wait_until(
        lambda: len([o for o in pool.outcomes() if o["outcome"] in ("cancelled", "lease_lost")]) == 8,
        10,
        "every handler to notice",
    )
    assert statuses(conn, job_id) == {"cancelled": 20}
    assert pool.stop() == 0


@pytest.mark.slow
def test_a_retry_resumes_after_the_checkpoint_of_the_attempt_that_died(dsn, conn, start_pool, tmp_path):
    marks = tmp_path / "marks"
    job_id = new_job(conn, 500, max_retries=3)  # one chunk of 500 images
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:checkpointing",
        "--processes",
        "1",
        "--lease",
        "1",
        "--heartbeat",
        "0.25",
        "--poll",
        "0.2",
        env={"CHUNKQ_TEST_SLEEP": "0.01", "CHUNKQ_TEST_MARK": str(marks)},
    )
    done_so_far = lambda: len(marks.read_text().splitlines()) if marks.exists() else 0  # noqa: E731
    wait_until(lambda: done_so_far() >= 450, 60, "90 % of the chunk done")
    (victim,) = pool.worker_pids()
    os.kill(victim, signal.SIGKILL)
    seen_images = []
    while progress(dsn, job_id) != {"completed": 1}:
        seen_images.append(
            conn.execute("SELECT images_completed FROM chunkq.job_progress(%s)", (job_id,)).fetchone()[0]
        )
        time.sleep(0.05)
        assert time.monotonic() and len(seen_images) < 2000, "the retry should have finished"
    assert pool.stop() == 0
    by_attempt: dict[int, list[int]] = defaultdict(list)
    for line in marks.read_text().splitlines():
        _, attempt, image = map(int, line.split())
        by_attempt[attempt].append(image)
    assert by_attempt[2][0] > 400  # the retry continued from the checkpoint, it did not start again at image 0
    redone = [image for image in by_attempt[2] if image <= max(by_attempt[1])]
    assert len(redone) <= 30  # at 10 ms an image, what the last quarter second before the kill did, at most
    assert set(by_attempt[1]) | set(by_attempt[2]) == set(range(500))  # nothing skipped
    assert max(seen_images) <= 500  # progress never counted an image twice
    assert conn.execute("SELECT images_completed FROM chunkq.job_progress(%s)", (job_id,)).fetchone() == (500,)


def test_a_bad_checkpoint_fails_the_chunk_with_a_clear_error(dsn, conn, start_pool):
    job_id = new_job(conn, 500, max_retries=0)
    pool = start_pool("--handler", "tests.helpers.handlers:bad_checkpoint", "--processes", "1", "--poll", "0.2")
    wait_until(lambda: progress(dsn, job_id) == {"failed": 1}, 30, "the chunk to fail")
    assert pool.stop() == 0
    error = conn.execute("SELECT error FROM chunkq.chunk_errors").fetchone()[0]
    assert error.startswith("ValidationError: checkpoint position 500 is outside chunk")


@pytest.mark.parametrize("value", ["0", "-3", "1001", "many"])
def test_a_bad_concurrency_is_refused_in_one_line(dsn, value):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers",
            "--dsn",
            dsn,
            "--handler",
            "chunkq.workers.sample:noop",
            "--concurrency",
            value,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--concurrency" in result.stderr
