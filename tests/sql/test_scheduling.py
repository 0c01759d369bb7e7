"""SQL API: the scheduler in the claim (fair share, caps, rate limits by key, retry-after, failure budget)."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter, defaultdict
from datetime import timedelta

import psycopg
import pytest

from tests.helpers import procs
from tests.helpers.db import assert_counters_consistent, snapshot, statuses


def job(conn: psycopg.Connection, chunks: int = 10, *, chunk: bool = True, **options: object) -> int:
    """A job of ``chunks`` one-image chunks with scheduling options (create_job's named arguments)."""
    named = "".join(f", p_{name} => %({name})s" for name in options)
    job_id = conn.execute(
        f"SELECT id FROM chunkq.create_job(1, 'job', '[]', %(images)s, p_chunk_size => 1{named})",
        {"images": chunks, **options},
    ).fetchone()[0]
    if chunk:
        conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    return job_id


def claim_jobs(conn: psycopg.Connection, limit: int = 1, job_id: int | None = None) -> list[int]:
    """Claims; returns the job id of each chunk claimed, in claim order."""
    return [row[0] for row in conn.execute("SELECT job_id FROM chunkq.claim_chunks('w', %s, %s)", (limit, job_id))]


def one_by_one(conn: psycopg.Connection, claims: int) -> list[int]:
    return [j for _ in range(claims) for j in claim_jobs(conn)]


def complete_all_processing(conn: psycopg.Connection) -> None:
    for chunk_id, attempt, token in conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.job_chunks WHERE status = 'processing'"
    ).fetchall():
        conn.execute("SELECT chunkq.complete_chunk(%s, %s, %s)", (chunk_id, attempt, token))


# ---------------------------------------------------------------------------
# Fair share
# ---------------------------------------------------------------------------


def test_jobs_of_one_priority_take_turns_instead_of_first_in_first_out(conn):
    big = job(conn, 1000)
    small = job(conn, 5)
    assert one_by_one(conn, 10) == [big, small] * 5 and claim_jobs(conn, 5) == [big] * 5


def test_a_job_created_later_joins_the_turns_where_the_queue_stands(conn):
    first = job(conn, 100)
    assert one_by_one(conn, 30) == [first] * 30
    later = job(conn, 100)
    # Neither behind all of the first job (first in, first out) nor before all of it (a catch-up burst).
    assert one_by_one(conn, 8) == [first, later] * 4


def test_a_job_of_weight_two_gets_two_claims_for_one(conn):
    light = job(conn, 100)
    heavy = job(conn, 100, weight=2)
    counts = Counter(one_by_one(conn, 60))
    assert (counts[light], counts[heavy]) == (20, 40)


def test_priority_stays_strict_across_levels(conn):
    low = job(conn, 10, priority=3)
    high = job(conn, 10, priority=8)
    assert claim_jobs(conn, 15) == [high] * 10 + [low] * 5


def test_a_batch_claim_interleaves_jobs_too(conn):
    a, b, c = job(conn, 10), job(conn, 10), job(conn, 10)
    assert claim_jobs(conn, 6) == [a, b, c, a, b, c]


def test_a_claim_limited_to_one_job_keeps_its_order(conn):
    job(conn, 10)
    target = job(conn, 10)
    indexes = [row[0] for row in conn.execute("SELECT chunk_index FROM chunkq.claim_chunks('w', 4, %s)", (target,))]
    assert indexes == [0, 1, 2, 3]


def test_resume_and_a_new_priority_place_a_job_at_the_front_not_before_everyone(conn):
    a = job(conn, 100)
    b = job(conn, 100)
    conn.execute("SELECT chunkq.pause_job(%s)", (b,))
    assert one_by_one(conn, 20) == [a] * 20
    conn.execute("SELECT chunkq.resume_job(%s)", (b,))
    assert one_by_one(conn, 6) == [a, b] * 3  # b does not claim its 20 missed turns at once
    conn.execute("SELECT chunkq.set_job_priority(%s, 9)", (a,))
    assert one_by_one(conn, 3) == [a] * 3


def test_changing_the_weight_of_a_running_job(conn):
    a = job(conn, 100)
    b = job(conn, 100)
    one_by_one(conn, 10)
    conn.execute("""SELECT chunkq.set_job_limits(%s, '{"weight": 3}')""", (b,))
    counts = Counter(one_by_one(conn, 40))
    assert (counts[a], counts[b]) == (10, 30)


# ---------------------------------------------------------------------------
# Caps
# ---------------------------------------------------------------------------


def test_max_running_caps_a_job_and_frees_a_slot_per_completion(conn):
    capped = job(conn, 10, max_running=3)
    other = job(conn, 10)
    claimed = claim_jobs(conn, 10)
    assert Counter(claimed) == {capped: 3, other: 7}
    assert claim_jobs(conn, 5) == [other] * 3  # the cap holds while its three run
    chunk_id, attempt, token = conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.job_chunks WHERE job_id = %s AND status = 'processing' LIMIT 1",
        (capped,),
    ).fetchone()
    conn.execute("SELECT chunkq.complete_chunk(%s, %s, %s)", (chunk_id, attempt, token))
    assert claim_jobs(conn, 5) == [capped]
    assert claim_jobs(conn, 5, capped) == []  # a claim for the job alone obeys the cap too


def test_a_cap_set_or_lifted_while_the_job_runs(conn):
    j = job(conn, 20)
    claim_jobs(conn, 4)
    conn.execute("""SELECT chunkq.set_job_limits(%s, '{"max_running": 5}')""", (j,))
    assert claim_jobs(conn, 10) == [j]  # 4 running + 1
    conn.execute("""SELECT chunkq.set_job_limits(%s, '{"max_running": null}')""", (j,))
    assert claim_jobs(conn, 10) == [j] * 10
    assert conn.execute("SELECT limited FROM chunkq.crawl_jobs WHERE id = %s", (j,)).fetchone() == (False,)


def test_claiming_a_given_chunk_obeys_the_cap(conn):
    j = job(conn, 5, max_running=1)
    claim_jobs(conn, 1)
    pending = conn.execute("SELECT id FROM chunkq.job_chunks WHERE job_id = %s AND status = 'pending'", (j,)).fetchone()
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.claim_chunk(%s, 'w')", pending)
    assert caught.value.sqlstate == "CQ009"
    assert snapshot(conn) == before


def overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at any one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def run_processes(target, args_of, n: int) -> list:
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(n), spawn.Queue()
    processes = [spawn.Process(target=target, args=(*args_of(i), barrier, results)) for i in range(n)]
    for process in processes:
        process.start()
    out = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    return out


@pytest.mark.slow
def test_a_cap_is_never_exceeded_by_eight_concurrent_claimers(dsn, conn):
    capped = job(conn, 400, max_running=3)
    keyed = job(conn, 400, rate_key="site-a")
    job(conn, 400)
    conn.execute("SELECT chunkq.set_rate_limit('site-a', NULL, NULL, 2)")  # a key's cap: 2 running at once
    held = run_processes(procs.hold_and_complete, lambda i: (dsn, None, 0.02, 2.5), 8)
    by_job: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for chunks in held:
        for _, job_id, start, end in chunks:
            by_job[job_id].append((start, end))
    assert overlap(by_job[capped]) == 3  # reached, never passed
    assert overlap(by_job[keyed]) == 2
    assert_counters_consistent(conn)


# ---------------------------------------------------------------------------
# Rate limits by key
# ---------------------------------------------------------------------------


def test_a_rate_limit_is_a_token_bucket_shared_by_the_jobs_of_its_key(conn):
    conn.execute("SELECT chunkq.set_rate_limit('images.example.com', 5, 4)")
    a = job(conn, 20, rate_key="images.example.com")
    b = job(conn, 20, rate_key="images.example.com")
    free = job(conn, 20)
    first = claim_jobs(conn, 20)
    assert Counter(first)[a] + Counter(first)[b] == 4 and Counter(first)[free] == 16  # the burst, across both jobs
    assert claim_jobs(conn, 20) == [free] * 4
    time.sleep(0.45)  # 5 per second: two more tokens
    assert len(claim_jobs(conn, 20)) == 2
    state = conn.execute(
        "SELECT rate, burst, jobs, running_chunks, held_back FROM chunkq.rate_limit_state WHERE key = %s",
        ("images.example.com",),
    ).fetchone()
    assert state == (5.0, 4, 2, 6, "rate-limited: 5 chunks/s")


def test_a_key_without_limits_costs_nothing_and_is_not_limited(conn):
    j = job(conn, 10, rate_key="no-limit")
    assert conn.execute("SELECT limited FROM chunkq.crawl_jobs WHERE id = %s", (j,)).fetchone() == (False,)
    assert claim_jobs(conn, 10) == [j] * 10


def test_limits_set_on_a_key_apply_to_its_running_jobs_and_lift_when_deleted(conn):
    j = job(conn, 50, rate_key="site")
    conn.execute("SELECT chunkq.set_rate_limit('site', 2, 2)")
    assert len(claim_jobs(conn, 10)) == 2
    conn.execute("SELECT chunkq.delete_rate_limit('site')")
    assert len(claim_jobs(conn, 10)) == 10
    assert conn.execute("SELECT count(*) FROM chunkq.job_chunks WHERE job_id = %s AND limited", (j,)).fetchone() == (0,)


@pytest.mark.slow
def test_a_rate_holds_across_eight_concurrent_claimers(dsn, conn):
    conn.execute("SELECT chunkq.set_rate_limit('api', 50, 10)")
    j = job(conn, 2000, rate_key="api")
    got = sum(run_processes(procs.claim_for_a_while, lambda i: (dsn, j, 3.0), 8))
    times = sorted(
        row[0]
        for row in conn.execute(
            "SELECT extract(epoch FROM claimed_at)::float FROM chunkq.job_chunks WHERE job_id = %s AND attempt > 0",
            (j,),
        )
    )
    assert len(times) == got
    # In any one second: the rate plus the burst (one more for a claim stamped with its transaction's start).
    most = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert most <= 50 + 10 + 1
    assert 130 <= got <= 50 * 3.2 + 10 + 1


@pytest.mark.parametrize(
    ("call", "args"),
    [
        ("set_rate_limit(%s, %s, %s, %s)", ("k", -1, None, None)),
        ("set_rate_limit(%s, %s, %s, %s)", ("k", 5, 0, None)),
        ("set_rate_limit(%s, %s, %s, %s)", ("k", None, 5, None)),
        ("set_rate_limit(%s, %s, %s, %s)", ("k", 5, 5, 0)),
        ("set_rate_limit(%s, %s, %s, %s)", (" ", 5, 5, None)),
        ("set_rate_limit(%s, %s, %s, %s)", ("k" * 201, 5, 5, None)),
        ("delete_rate_limit(%s)", ("unknown-key",)),
        ("set_job_limits(%s, %s)", ("JOB", '{"max_failed_ratio": 1.5}')),
        ("set_job_limits(%s, %s)", ("JOB", '{"max_running": 0}')),
        ("set_job_limits(%s, %s)", ("JOB", '{"weight": -1}')),
        ("set_job_limits(%s, %s)", ("JOB", '{"weight": null}')),
        ("set_job_limits(%s, %s)", ("JOB", '{"weight": "heavy"}')),
        ("set_job_limits(%s, %s)", ("JOB", '{"max_runing": 3}')),
        ("set_job_limits(%s, %s)", ("JOB", "[1]")),
        ("set_job_limits(%s, %s)", ("JOB", '{"max_running": 99999999999}')),
        ("set_job_limits(%s, %s)", (424242, '{"max_running": 3}')),
        ("create_job(1, 'x', '[]', 10, p_max_failed_ratio => %s)", (2.0,)),
        ("create_job(1, 'x', '[]', 10, p_weight => %s)", (0,)),
        ("create_job(1, 'x', '[]', 10, p_rate_key => %s)", ("",)),
        ("create_job(1, 'x', '[]', 10, p_max_consecutive_failures => %s)", (0,)),
    ],
)
def test_bad_settings_get_a_typed_error_and_change_nothing(conn, call, args):
    j = job(conn, 10)
    conn.execute("SELECT chunkq.set_rate_limit('k', 5, 5)")
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(f"SELECT * FROM chunkq.{call}", tuple(j if a == "JOB" else a for a in args))
    assert caught.value.sqlstate in {"CQ001", "CQ002", "CQ008"}
    assert snapshot(conn) == before
    assert conn.execute("SELECT rate, burst FROM chunkq.rate_limits WHERE key = 'k'").fetchone() == (5.0, 5)


# ---------------------------------------------------------------------------
# Retry after
# ---------------------------------------------------------------------------


def test_defer_puts_a_chunk_back_without_spending_a_retry_and_not_before_its_time(conn):
    j = job(conn, 2, max_retries=0)
    (chunk_id, attempt, token), _ = conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('w', 2, %s)", (j,)
    ).fetchall()
    outcome = conn.execute(
        "SELECT chunk_status::text, retry_count, available_at - now() FROM chunkq.defer_chunk(%s, %s, '2 s',"
        " 'HTTP 429 from images.example.com', p_lease_token => %s)",
        (chunk_id, attempt, token),
    ).fetchone()
    assert outcome[:2] == ("pending", 0) and outcome[2] == timedelta(seconds=2)
    assert claim_jobs(conn, 1, j) == []
    conn.execute("UPDATE chunkq.job_chunks SET available_at = now() WHERE id = %s", (chunk_id,))
    assert claim_jobs(conn, 1, j) == [j]  # max_retries 0, and still not failed
    error = conn.execute(
        "SELECT error, deferred, retried, lease_expired FROM chunkq.chunk_error_history(%s)", (chunk_id,)
    ).fetchone()
    assert error == ("retry after 00:00:02: HTTP 429 from images.example.com", True, True, False)


def test_defer_can_block_the_key_of_the_job(conn):
    conn.execute("SELECT chunkq.set_rate_limit('site', NULL, NULL, 100)")
    a = job(conn, 5, rate_key="site")
    b = job(conn, 5, rate_key="site")
    chunk_id, attempt, token = conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('w', 1, %s)", (a,)
    ).fetchone()
    conn.execute("SELECT chunkq.defer_chunk(%s, %s, '1 hour', 'HTTP 429', true, %s)", (chunk_id, attempt, token))
    assert claim_jobs(conn, 10) == []  # neither job of the key
    held = conn.execute("SELECT held_back FROM chunkq.job_overview WHERE id = %s", (b,)).fetchone()[0]
    assert held.startswith("rate key site blocked: retry after 01:00:00: HTTP 429")


@pytest.mark.parametrize("delay", ["0 s", "-1 s", "8 days", None])
def test_defer_refuses_a_bad_delay(conn, delay):
    j = job(conn, 1)
    chunk_id, attempt, token = conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('w', 1, %s)", (j,)
    ).fetchone()
    before = snapshot(conn)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(
            "SELECT chunkq.defer_chunk(%s, %s, %s::interval, 'x', false, %s)", (chunk_id, attempt, delay, token)
        )
    assert caught.value.sqlstate == "CQ001"
    assert snapshot(conn) == before


def test_defer_is_fenced_like_every_report(conn):
    j = job(conn, 1)
    chunk_id, attempt, _ = conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('w', 1, %s)", (j,)
    ).fetchone()
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT chunkq.defer_chunk(%s, %s, '1 s', 'x', false, gen_random_uuid())", (chunk_id, attempt))
    assert caught.value.sqlstate == "CQ006"


# ---------------------------------------------------------------------------
# Failure budget
# ---------------------------------------------------------------------------


def fail_next(conn: psycopg.Connection, job_id: int, retry: bool = False) -> None:
    chunk_id, attempt, token = conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('w', 1, %s)", (job_id,)
    ).fetchone()
    conn.execute(
        "SELECT chunkq.fail_chunk(%s, %s, 'HTTP 500', %s, p_lease_token => %s)", (chunk_id, attempt, retry, token)
    )


def test_a_job_past_its_failed_ratio_pauses_itself_says_why_and_notifies(dsn, conn):
    j = job(conn, 10, max_failed_ratio=0.2)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN chunkq_job_paused")
        fail_next(conn, j)
        fail_next(conn, j)
        assert conn.execute("SELECT paused_at FROM chunkq.crawl_jobs WHERE id = %s", (j,)).fetchone() == (None,)
        claim_jobs(conn, 1, j)  # a chunk running when the budget trips carries on
        fail_next(conn, j)  # 3 of 10 failed: more than 20 %
        notes = list(listener.notifies(timeout=2, stop_after=1))
    assert notes and f'"job_id" : {j}' in notes[0].payload and "max_failed_ratio" in notes[0].payload
    reason, held = conn.execute(
        "SELECT paused_reason, held_back FROM chunkq.job_overview WHERE id = %s", (j,)
    ).fetchone()
    assert reason == "failure budget: 3 of 10 chunks failed, more than max_failed_ratio 0.2"
    assert held == f"paused: {reason}"
    assert claim_jobs(conn, 10) == []
    assert statuses(conn, j) == {"failed": 3, "processing": 1, "pending": 6}
    conn.execute("SELECT chunkq.resume_job(%s)", (j,))  # clears it
    assert conn.execute("SELECT paused_reason FROM chunkq.crawl_jobs WHERE id = %s", (j,)).fetchone() == (None,)
    assert len(claim_jobs(conn, 10)) == 6


def test_failures_in_a_row_trip_the_budget_and_a_completion_resets_the_count(conn):
    j = job(conn, 20, max_consecutive_failures=3, max_retries=5)
    fail_next(conn, j, retry=True)
    fail_next(conn, j, retry=True)
    claim_jobs(conn, 1, j)
    complete_all_processing(conn)
    fail_next(conn, j, retry=True)
    fail_next(conn, j, retry=True)
    assert conn.execute("SELECT paused_at FROM chunkq.crawl_jobs WHERE id = %s", (j,)).fetchone() == (None,)
    fail_next(conn, j, retry=True)
    assert conn.execute("SELECT paused_reason FROM chunkq.crawl_jobs WHERE id = %s", (j,)).fetchone() == (
        "failure budget: 3 attempts failed in a row with none completed",
    )


def test_a_failed_chunks_count_and_deferrals_are_no_failures(conn):
    j = job(conn, 20, max_failed_chunks=1, max_consecutive_failures=2)
    for _ in range(3):
        chunk_id, attempt, token = conn.execute(
            "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('w', 1, %s)", (j,)
        ).fetchone()
        conn.execute("SELECT chunkq.defer_chunk(%s, %s, '1 ms', 'slow down', false, %s)", (chunk_id, attempt, token))
    fail_next(conn, j)
    assert conn.execute("SELECT paused_at FROM chunkq.crawl_jobs WHERE id = %s", (j,)).fetchone() == (None,)
    fail_next(conn, j)
    assert (
        "2 chunks failed, more than max_failed_chunks 1"
        in conn.execute("SELECT paused_reason FROM chunkq.crawl_jobs WHERE id = %s", (j,)).fetchone()[0]
    )


# ---------------------------------------------------------------------------
# What holds a job back
# ---------------------------------------------------------------------------


def test_job_overview_says_what_holds_each_job_back(conn):
    paused = job(conn, 5)
    conn.execute("SELECT chunkq.pause_job(%s)", (paused,))
    capped = job(conn, 5, max_running=1)
    conn.execute("SELECT chunkq.set_rate_limit('slow.example', 0.001, 1)")
    keyed = job(conn, 5, rate_key="slow.example")
    retrying = job(conn, 1)
    free = job(conn, 5)
    claim_jobs(conn, 20)
    chunk_id, attempt, token = conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.job_chunks WHERE job_id = %s", (retrying,)
    ).fetchone()
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'flaky', true, p_lease_token => %s)", (chunk_id, attempt, token))
    held = dict(conn.execute("SELECT id, held_back FROM chunkq.job_overview").fetchall())
    assert held[paused] == "paused: by an operator"
    assert held[capped] == "capped: 1 of max_running 1"
    assert held[keyed] == "rate key slow.example rate-limited: 0.001 chunks/s"
    assert held[retrying].startswith("waiting to retry: 1 chunks, next at ")
    assert held[free] is None


def test_queue_depth_says_what_holds_each_prioritys_chunks_back(conn):
    paused = job(conn, 5)
    conn.execute("SELECT chunkq.pause_job(%s)", (paused,))
    job(conn, 5, max_running=1)
    retrying = job(conn, 2)
    job(conn, 3)
    ((chunk_id, attempt, token),) = conn.execute(
        "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('w', 1, %s)", (retrying,)
    ).fetchall()
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'flaky', true, p_lease_token => %s)", (chunk_id, attempt, token))
    (row,) = conn.execute(
        "SELECT pending_chunks, claimable_chunks, paused_chunks, retrying_chunks, limited_chunks"
        " FROM chunkq.queue_depth"
    ).fetchall()
    assert row == (15, 15 - 5 - 1, 5, 1, 5)  # paused: 5; waiting out the back-off: 1; the capped job's: 5


def test_claimable_in_says_how_long_until_a_held_back_chunk_may_be_claimed(conn):
    assert conn.execute("SELECT chunkq.claimable_in()").fetchone() == (None,)  # nothing limited: the poll
    conn.execute("SELECT chunkq.set_rate_limit('site', 2, 1)")
    j = job(conn, 10, rate_key="site")
    assert conn.execute("SELECT chunkq.claimable_in()").fetchone() == (timedelta(0),)  # a token is there: now
    claim_jobs(conn, 1)
    wait = conn.execute("SELECT chunkq.claimable_in(%s)", (j,)).fetchone()[0]
    assert timedelta(seconds=0.3) < wait <= timedelta(seconds=0.5)  # the next token, at 2 per second
    capped = job(conn, 10, max_running=1)
    claim_jobs(conn, 1, capped)
    assert conn.execute("SELECT chunkq.claimable_in(%s)", (capped,)).fetchone() == (None,)  # a completion frees it
