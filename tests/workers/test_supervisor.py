"""The supervisor against what production does to it: forged notifications, dead workers, its own death."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from chunkq.workers.config import PoolConfig
from chunkq.workers.supervisor import Supervisor
from tests.helpers.db import assert_counters_consistent, login_role, new_job
from tests.helpers.pool import alive, progress, wait_until

NOOP = ("--handler", "chunkq.workers.sample:noop")

HOSTILE_PAYLOADS = [
    "5",
    "-1",
    '{"chunks":"x"}',
    '{"chunks":1e999}',
    '{"chunks":-1e999}',
    '{"chunks":NaN}',
    '{"chunks":-7}',
    '{"chunks":99999999999999999999999999999999}',
    '{"chunks":true}',
    '{"chunks":[1,2]}',
    '{"job_id":"x","chunks":1}',
    '{"job_id":{"a":1}}',
    '{"job_id":1e999}',
    "[]",
    "null",
    '"text"',
    "",
    "not json at all",
    "{" * 3000,  # nested past the JSON parser's recursion limit
    "[" * 3990 + "]" * 3990,
    json.dumps({"chunks": 1, "pad": "x" * 7900}),  # near NOTIFY's 8000-byte limit
    "\u00e9\u2603 \ufffd",
]


@pytest.fixture
def stranger(dsn: str) -> Iterator[str]:
    """The DSN of a login role with no chunkq grants at all: NOTIFY needs no privilege."""
    with login_role(dsn, "chunkq_test_stranger") as stranger:
        yield stranger


def test_forged_notifications_cannot_break_the_supervisor(dsn, conn, start_pool, stranger):
    pool = start_pool(*NOOP, "--processes", "2", "--poll", "0.5")
    wait_until(lambda: len(pool.worker_pids()) == 2, 30, "two workers")
    with psycopg.connect(stranger, autocommit=True) as forger:
        for payload in HOSTILE_PAYLOADS:
            forger.execute("SELECT pg_notify('chunkq_claimable', %s)", (payload,))
        with forger.transaction():  # a flood, delivered at once on commit
            for n in range(2000):
                forger.execute("SELECT pg_notify('chunkq_claimable', %s)", (f'{{"chunks": {n}}}',))
    time.sleep(1)
    assert pool.proc.poll() is None, pool.text()

    # Still supervising: a dead worker is replaced...
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(pool.worker_pids()) == 3, 30, "a replacement worker")
    # ...new work is done...
    job_id = new_job(conn, 500 * 20)
    wait_until(lambda: progress(dsn, job_id) == {"completed": 20}, 30, "the job to complete")
    # ...and SIGTERM still drains.
    assert pool.stop() == 0
    assert not any("Traceback" in line.get("exception", "") for line in pool.lines())
    assert_counters_consistent(conn)


def test_the_supervisor_loop_survives_a_failure_in_its_housekeeping(caplog):
    supervisor = Supervisor(PoolConfig(dsn="dbname=x", handler="chunkq.workers.sample:noop", processes=1, listen=False))
    calls = {"n": 0}

    def broken_restart() -> None:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise RuntimeError(f"housekeeping bug {calls['n']}")
        if calls["n"] == 6:
            supervisor.signals = 1  # as SIGTERM would

    supervisor.restart_dead = broken_restart  # type: ignore[method-assign]
    done: list[int] = []
    runner = threading.Thread(target=lambda: done.append(supervisor.supervise()), daemon=True)
    runner.start()
    runner.join(30)
    assert done == [0], "the loop stopped on an exception instead of carrying on to the drain"
    logged = [r for r in caplog.records if r.getMessage() == "supervisor housekeeping failed"]
    assert len(logged) == 3 and all(r.exc_info for r in logged)


def test_killing_an_idle_worker_does_not_wedge_the_pool(dsn, conn, start_pool):
    pool = start_pool(*NOOP, "--processes", "1", "--poll", "2")
    wait_until(lambda: len(pool.worker_pids()) == 1, 30, "a worker")
    time.sleep(1)  # idle, waiting for a wake-up
    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    wait_until(lambda: len(pool.worker_pids()) == 2, 30, "the replacement worker")
    job_id = new_job(conn, 500 * 5)
    wait_until(lambda: progress(dsn, job_id) == {"completed": 5}, 30, "the job to complete")
    assert pool.stop() == 0


def test_a_worker_killed_while_being_woken_does_not_wedge_the_pool(dsn, conn, start_pool):
    """Kill workers again and again while notifications keep arriving: no wake-up can wait on a dead worker."""
    pool = start_pool(*NOOP, "--processes", "2", "--poll", "5")
    wait_until(lambda: len(pool.worker_pids()) == 2, 30, "two workers")
    for round_ in range(4):
        time.sleep(0.4)
        for pid in pool.worker_pids()[-2:]:
            os.kill(pid, signal.SIGKILL)
        conn.execute("SELECT pg_notify('chunkq_claimable', '{\"chunks\": 5}')")
        wait_until(lambda n=4 + 2 * round_: len(pool.worker_pids()) == n, 30, "replacement workers")
    job_id = new_job(conn, 500 * 5)
    wait_until(lambda: progress(dsn, job_id) == {"completed": 5}, 30, "the job to complete")
    assert pool.stop() == 0


def test_workers_stop_and_hand_back_when_the_supervisor_is_killed(dsn, conn, start_pool):
    job_id = new_job(conn, 500 * 5000)
    pool = start_pool(
        "--handler", "tests.helpers.handlers:tiny", "--processes", "2", "--batch", "5", "--lease", "60", "--grace", "30"
    )
    wait_until(lambda: progress(dsn, job_id).get("completed", 0) >= 100, 60, "work under way")
    workers = pool.worker_pids()
    os.kill(pool.proc.pid, signal.SIGKILL)  # the supervisor only, not its process group
    wait_until(lambda: not any(alive(pid) for pid in workers), 5, "the orphaned workers to exit")
    settled = progress(dsn, job_id)
    assert settled.get("processing", 0) == 0, "held chunks must be handed back, not left to their 60 s lease"
    time.sleep(2)
    assert progress(dsn, job_id) == settled, "nothing may be claimed or completed once the supervisor is gone"
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)
    assert conn.execute("SELECT max(retry_count) FROM chunkq.job_chunks").fetchone() == (0,)
    assert_counters_consistent(conn)


def test_pool_errors_are_one_line(dsn):
    from tests.workers.test_pool import run_cli

    unreachable = run_cli("--dsn", "postgresql://nobody@127.0.0.1:1/nothing", *NOOP)
    bad_number = run_cli("--dsn", dsn, *NOOP, "--processes", "many")
    unknown = run_cli("--dsn", dsn, *NOOP, "--no-such-option")
    missing = run_cli("--dsn", dsn)
    for result, code in ((unreachable, 4), (bad_number, 2), (unknown, 2), (missing, 2)):
        assert result.returncode == code, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--processes" in bad_number.stderr and "--no-such-option" in unknown.stderr
    assert "--handler" in missing.stderr
