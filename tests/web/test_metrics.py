"""/metrics as Prometheus reads it (prometheus-client's own parser): the dashboard's gauges equal the SQL views,
and a real pool's --metrics-port endpoint counts what it processed."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import pytest

from tests.helpers.db import claim, new_job
from tests.helpers.pool import wait_until
from tests.web.conftest import free_port
from tests.web.test_http import raw


def parse(text: str) -> dict[str, Any]:
    """{metric name: (type, {sorted label items: value})}, as Prometheus would read the exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        samples = {}
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        out[family.name] = (family.type, samples)
    return out


def value(metrics: dict[str, Any], metric: str, sample: str | None = None, **labels: str) -> float:
    return metrics[metric][1][(sample or metric, tuple(sorted(labels.items())))]


def test_metrics_equal_the_sql_views(conn, start_web):
    jobs = [new_job(conn, 500 * n, priority=p) for n, p in ((6, 5), (4, 7), (3, 5), (5, 2))]
    for chunk_id, attempt in claim(conn, limit=3, job_id=jobs[0]):
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    for chunk_id, attempt in claim(conn, limit=2, job_id=jobs[1]):
        conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'HTTP 404')", (chunk_id, attempt))
    conn.execute("SELECT chunkq.claim_chunks('stalled', 2, %s, '1 millisecond')", (jobs[2],))  # leases that lapse
    conn.execute("SELECT chunkq.pause_job(%s)", (jobs[3],))
    time.sleep(0.05)

    web = start_web("--top-jobs", "2")
    response = web.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    metrics = parse(response.text)

    assert metrics["chunkq_up"][0] == "gauge" and value(metrics, "chunkq_up") == 1
    overview = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT id, pending_chunks, processing_chunks, completed_chunks, failed_chunks, cancelled_chunks,"
            " total_chunks FROM chunkq.job_overview"
        )
    }
    states = ("pending", "processing", "completed", "failed", "cancelled")
    for i, state in enumerate(states):
        assert value(metrics, "chunkq_chunks", state=state) == sum(row[i] for row in overview.values())
    # The two newest unfinished jobs have series of their own; the others are summed as "other".
    job_labels = {dict(labels)["job"] for (_, labels) in metrics["chunkq_job_chunks"][1]}
    top = {str(jobs[3]), str(jobs[2])}
    assert job_labels == top | {"other"}
    for i, state in enumerate(states):
        for job_id in (jobs[3], jobs[2]):
            assert value(metrics, "chunkq_job_chunks", job=str(job_id), state=state) == overview[job_id][i]
        assert value(metrics, "chunkq_job_chunks", job="other", state=state) == sum(
            overview[j][i] for j in (jobs[0], jobs[1])
        )
    assert value(metrics, "chunkq_job_paused", job=str(jobs[3])) == 1
    assert value(metrics, "chunkq_job_info", job=str(jobs[2]), name="test job", status="running") == 1
    assert value(metrics, "chunkq_job_progress_ratio", job=str(jobs[2])) == 0

    for priority, pending, age in conn.execute(
        "SELECT priority, pending_chunks, extract(epoch FROM oldest_pending_age) FROM chunkq.queue_depth"
    ):
        assert value(metrics, "chunkq_queue_pending_chunks", priority=str(priority)) == pending
        if priority != 2:  # the paused job's priority: its chunks are not waiting to be claimed
            assert (
                abs(value(metrics, "chunkq_queue_oldest_pending_age_seconds", priority=str(priority)) - float(age)) < 2
            )
    assert ("chunkq_queue_oldest_pending_age_seconds", (("priority", "2"),)) not in metrics[
        "chunkq_queue_oldest_pending_age_seconds"
    ][1]

    stats = conn.execute(
        "SELECT expired_leases, failure_rate, jobs_running, errors_last_hour, autovacuum_on FROM chunkq.queue_stats()"
    ).fetchone()
    assert value(metrics, "chunkq_expired_leases") == stats[0] == 2
    assert (
        value(metrics, "chunkq_expired_leases")
        == conn.execute("SELECT count(*) FROM chunkq.expired_leases").fetchone()[0]
    )
    assert value(metrics, "chunkq_failure_ratio") == pytest.approx(stats[1])
    assert value(metrics, "chunkq_jobs", status="running") == stats[2]
    assert value(metrics, "chunkq_jobs_paused") == 1
    assert value(metrics, "chunkq_chunk_errors_last_hour") == stats[3] == 2
    assert value(metrics, "chunkq_autovacuum_enabled") == int(stats[4])
    assert value(metrics, "chunkq_workers_connected") == 0
    assert value(metrics, "chunkq_chunks_completed_per_second") > 0

    # The oldest open transaction, as queue_stats sees it (the xmin horizon).
    with conn.transaction():
        conn.execute("SELECT txid_current()")
        time.sleep(1.1)
        held = value(parse(web.get("/metrics").text), "chunkq_oldest_transaction_age_seconds")
    assert held >= 1


def test_pool_metrics_count_what_a_real_pool_processed(conn, start_pool):
    conn.execute("UPDATE chunkq.settings SET retry_base_delay = '0', retry_max_delay = '0'")
    retried = new_job(conn, 500 * 12, max_retries=3)  # flaky_twice: fails twice, completes the third time
    exhausted = new_job(conn, 500 * 5, max_retries=1)  # fails twice: retried once, then failed for good
    port = free_port()
    pool = start_pool(
        "--handler",
        "tests.helpers.handlers:flaky_twice",
        "--processes",
        "2",
        "--metrics-port",
        str(port),
        "--lease",
        "5",
    )
    wait_until(
        lambda: conn.execute("SELECT count(*) FROM chunkq.crawl_jobs WHERE finished_at IS NULL").fetchone()[0] == 0,
        60,
        "both jobs to finish",
    )
    assert conn.execute("SELECT id, status::text FROM chunkq.crawl_jobs ORDER BY id").fetchall() == [
        (retried, "completed"),
        (exhausted, "failed"),
    ]

    def scrape() -> dict[str, Any]:
        return parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)

    # The last reports of a drained job arrive with the worker's next claim, a moment after the job finished.
    metrics = wait_until(
        lambda: (
            (m := scrape())
            and value(m, "chunkq_worker_chunks", "chunkq_worker_chunks_total", outcome="completed") == 12
            and m
        ),
        10,
        "the counts",
    )
    assert metrics["chunkq_worker_chunks"][0] == "counter"
    assert value(metrics, "chunkq_worker_chunks", "chunkq_worker_chunks_total", outcome="retrying") == 12 * 2 + 5
    assert value(metrics, "chunkq_worker_chunks", "chunkq_worker_chunks_total", outcome="failed") == 5
    attempts = 12 * 3 + 5 * 2
    assert metrics["chunkq_worker_handler_duration_seconds"][0] == "histogram"
    assert (
        value(metrics, "chunkq_worker_handler_duration_seconds", "chunkq_worker_handler_duration_seconds_count")
        == attempts
    )
    assert value(metrics, "chunkq_worker_chunks_claimed", "chunkq_worker_chunks_claimed_total") == attempts
    assert value(metrics, "chunkq_worker_claims", "chunkq_worker_claims_total", result="chunks") == attempts
    assert value(metrics, "chunkq_worker_lease_losses", "chunkq_worker_lease_losses_total") == 0
    assert value(metrics, "chunkq_pool_processes") == 2

    # A worker killed -9: the supervisor restarts it; what the dead one counted is still counted.
    victim = pool.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    metrics = wait_until(
        lambda: (
            (m := scrape()) and value(m, "chunkq_pool_worker_restarts", "chunkq_pool_worker_restarts_total") == 1 and m
        ),
        20,
        "the restart",
    )
    assert value(metrics, "chunkq_worker_chunks", "chunkq_worker_chunks_total", outcome="completed") == 12
    assert (
        value(metrics, "chunkq_worker_handler_duration_seconds", "chunkq_worker_handler_duration_seconds_count")
        == attempts
    )

    # The endpoint is prometheus-client's own server: any bytes, then it still answers.
    web = type("Endpoint", (), {"port": port})()
    for garbage in (
        b"\x00\xff garbage\r\n\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 99999999\r\n\r\nabc",
        b"GET / HTTP/1.1\r\n",
    ):
        raw(web, garbage)  # type: ignore[arg-type]
    assert "chunkq_pool_processes" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert pool.stop() == 0


def test_without_metrics_port_the_pool_serves_nothing_and_imports_nothing(conn, start_pool):
    """--metrics-port off: no endpoint, and prometheus_client is never imported by a worker."""
    job_id = new_job(conn, 500 * 4)
    pool = start_pool("--handler", "tests.helpers.handlers:report_prometheus_imported", "--processes", "1")
    wait_until(
        lambda: (
            conn.execute("SELECT status::text FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)).fetchone()[0]
            == "failed"
        ),
        30,
        "the job to finish",
    )
    errors = {row[0] for row in conn.execute("SELECT split_part(error, E'\\n', 1) FROM chunkq.chunk_errors")}
    assert errors == {"DoNotRetry: prometheus_client imported: False"}
    assert pool.stop() == 0


def test_rate_keys_that_hold_chunks_back_are_counted_and_each_key_equals_its_view_row(conn, start_web):
    conn.execute("SELECT chunkq.set_rate_limit('site-a', 1, 1, NULL)")  # one chunk a second, no more in a burst
    conn.execute("SELECT chunkq.set_rate_limit('site-b', NULL, NULL, 5)")  # a cap the jobs do not reach
    conn.execute("SELECT chunkq.set_rate_limit('idle-key', 2, 2, NULL)")  # no job names it
    for chunks, key in ((4, "site-a"), (2, "site-b")):
        (job_id,) = conn.execute(
            "SELECT id FROM chunkq.create_job(1, 'keyed', '[]', %s, p_rate_key => %s)", (500 * chunks, key)
        ).fetchone()
        conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    claim(conn, limit=4)  # takes site-a's one token (and site-b's chunks): site-a now holds back three
    web = start_web()
    metrics = parse(web.get("/metrics").text)
    state = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT key, held_back IS NOT NULL, running_chunks, pending_chunks, tokens FROM chunkq.rate_limit_state"
        )
    }
    assert state["site-a"][0] and not state["site-b"][0], state
    assert value(metrics, "chunkq_rate_keys_throttled") == 1
    for key in ("site-a", "site-b"):
        held_back, running, pending, _ = state[key]
        assert value(metrics, "chunkq_rate_key_throttled", key=key) == int(held_back)
        assert value(metrics, "chunkq_rate_key_running_chunks", key=key) == running
        assert value(metrics, "chunkq_rate_key_pending_chunks", key=key) == pending
    assert value(metrics, "chunkq_rate_key_tokens", key="site-a") < 1
    assert ("chunkq_rate_key_tokens", (("key", "site-b"),)) not in metrics["chunkq_rate_key_tokens"][1]  # no rate
    assert all(dict(labels)["key"] != "idle-key" for (_, labels) in metrics["chunkq_rate_key_throttled"][1])
