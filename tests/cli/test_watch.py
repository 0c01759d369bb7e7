"""job progress --watch: plain lines when piped, a live bar on a terminal, exit status from the outcome."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from tests.cli.conftest import cli_env
from tests.helpers.db import claim, new_job
from tests.helpers.pool import ROOT, wait_until

ANSI = re.compile(r"\x1b\[")


def watch(dsn: str, job_id: int, **popen: object) -> subprocess.Popen:
    popen.setdefault("env", cli_env(CHUNKQ_DSN=dsn))
    return subprocess.Popen(
        [sys.executable, "-m", "chunkq", "job", "progress", str(job_id), "--watch", "--interval", "0.1"],
        cwd=ROOT,
        **popen,
    )


def finish(conn, job_id: int, fail: int = 0) -> None:
    for n, (chunk_id, attempt) in enumerate(claim(conn, limit=100, job_id=job_id)):
        time.sleep(0.15)
        report = "fail_chunk(%s, %s, 'boom')" if n < fail else "complete_chunk(%s, %s)"
        conn.execute(f"SELECT chunkq.{report}", (chunk_id, attempt))


def test_piped_watch_prints_plain_lines_until_the_job_finishes(dsn, conn):
    job_id = new_job(conn, 500 * 4)
    proc = watch(dsn, job_id, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    finish(conn, job_id)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"job {job_id} pending: 0/4 completed (0.0%)")
    assert re.match(
        rf"job {job_id} completed: 4/4 completed \(100\.0%\), 0 failed, 0 processing, "
        r"[\d.,]+ chunks/s, [\d,]+ images/s, ETA",
        lines[-1],
    )
    assert not ANSI.search(out)


def test_watch_exits_1_when_chunks_failed(dsn, conn):
    job_id = new_job(conn, 500 * 3)
    proc = watch(dsn, job_id, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finish(conn, job_id, fail=1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f"job {job_id} finished failed: 1 failed, 0 cancelled chunks" in err
    assert "Traceback" not in err


def read_terminal(master: int, proc: subprocess.Popen, until: bytes | None, timeout: float) -> bytes:
    """What the child wrote to its terminal, until ``until`` shows up or the child is done."""
    screen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its terminal
                break
            if not data:
                break
            screen += data
            if until is not None and until in screen:
                break
        elif proc.poll() is not None:
            break
    return screen


def test_watch_on_a_terminal_draws_a_live_bar(dsn, conn):
    job_id = new_job(conn, 500 * 4)
    master, slave = pty.openpty()
    env = cli_env(CHUNKQ_DSN=dsn, COLUMNS="150", TERM="xterm-256color")
    proc = watch(dsn, job_id, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    screen = read_terminal(master, proc, "━".encode(), 10)  # the bar is drawn before the job moves
    finish(conn, job_id)
    screen += read_terminal(master, proc, None, 30)
    os.close(master)
    assert proc.wait(10) == 0
    text = screen.decode(errors="replace")
    assert "━" in text and ANSI.search(text)  # a drawn bar, redrawn in place
    assert "4/4" in text and "chunks/s" in text and "ETA" in text


def test_watch_of_a_missing_job(chunkq):
    result = chunkq("job", "progress", "424242", "--watch")
    assert (result.code, result.err.strip()) == (3, "chunkq: crawl job 424242 does not exist")


def test_ctrl_c_stops_watching(dsn, conn):
    job_id = new_job(conn, 500)
    proc = watch(dsn, job_id, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "chunkq: interrupted" and "Traceback" not in err


def test_ctrl_c_in_the_demo_drains_the_workers(dsn, conn):
    # No simulated failures: a chunk that fails as it finishes during the drain would spend a retry.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chunkq",
            "demo",
            "--images",
            "500000",
            "--processes",
            "2",
            "--seconds-per-image",
            "0.001",
            "--failure-rate",
            "0",
        ],
        cwd=ROOT,
        env=cli_env(CHUNKQ_DSN=dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: conn.execute("SELECT count(*) FROM chunkq.job_chunks WHERE status = 'processing'").fetchone()[0] == 2,
        60,
        "two chunks being crawled",
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: stopping the workers" in err and "Traceback" not in err
    assert conn.execute("SELECT count(*) FROM chunkq.job_chunks WHERE status = 'processing'").fetchone() == (0,)
    assert conn.execute(
        "SELECT max(retry_count), count(*) FILTER (WHERE status = 'failed') FROM chunkq.job_chunks"
    ).fetchone() == (0, 0)  # nothing spent, nothing lost


def screen_lines(screen: bytes) -> list[str]:
    """What a terminal shows, line by line: escape sequences dropped, each redraw's lines one by one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", screen.decode(errors="replace"))  # colours
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", text)  # cursor moves, line erases
    return [part for line in text.split("\n") for part in line.split("\r") if part.strip()]


def test_the_live_bar_stays_readable_at_80_columns(dsn, conn):
    job_id = new_job(conn, 500 * 4)
    master, slave = pty.openpty()
    env = cli_env(CHUNKQ_DSN=dsn, COLUMNS="80", LINES="24", TERM="xterm-256color")
    proc = watch(dsn, job_id, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    screen = read_terminal(master, proc, "━".encode(), 10)
    finish(conn, job_id)
    screen += read_terminal(master, proc, None, 30)
    os.close(master)
    assert proc.wait(10) == 0
    lines = screen_lines(screen)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    last = [line for line in lines if line.startswith(f"job {job_id} completed")][-1]
    assert "━" in last and "4/4" in last and "100.0%" in last and "ETA" in last  # the headline on one line
    assert any(re.fullmatch(r"0 failed, 0 processing *", line) for line in lines), lines
    assert any(re.fullmatch(r"[\d.,]+ chunks/s, [\d,]+ images/s *", line) for line in lines), lines


def test_the_view_says_what_a_job_waits_for(dsn, conn):
    """Nothing processing, chunks waiting out a retry back-off: say so, rather than look hung at 99 %."""
    job_id = conn.execute(
        "SELECT id FROM chunkq.create_job(1, 'waits', '[]', 1500, p_retry_base_delay => interval '20 seconds')"
    ).fetchone()[0]
    conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    for chunk_id, attempt in claim(conn, limit=2, job_id=job_id):
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'HTTP 503', true)", (chunk_id, attempt))
    proc = watch(dsn, job_id, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
    finally:
        proc.kill()
        proc.communicate()
    assert re.search(r", 0 processing, 2 chunks waiting to retry, next in (2\d|3\d|40) s, ", first), first

    master, slave = pty.openpty()
    env = cli_env(CHUNKQ_DSN=dsn, COLUMNS="80", TERM="xterm-256color")
    proc = watch(dsn, job_id, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    screen = read_terminal(master, proc, b"waiting to retry", 10)
    proc.kill()
    proc.wait()
    os.close(master)
    assert any("0 processing, 2 chunks waiting to retry, next in" in line for line in screen_lines(screen))
