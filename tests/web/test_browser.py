"""The dashboard in a real browser (Debian's Chromium, driven by Playwright), beside a real worker pool:
what an operator sees and clicks. Saves a screenshot of the jobs page and of a job page under build/screenshots
(and docs/images with CHUNKQ_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from tests.helpers.db import snapshot
from tests.helpers.pool import wait_until
from tests.web.conftest import TOKEN, screenshot

XSS = "<img src=x onerror=alert(1)>"
# The sample crawl handler, fast: about 0.05 s a chunk, and a few flaky image hosts.
CRAWL = {"CHUNKQ_SAMPLE_SECONDS_PER_IMAGE": "0.0001", "CHUNKQ_SAMPLE_FAILURE_RATE": "0.08"}


def named_job(conn: psycopg.Connection, name: str, chunks: int, priority: int = 5, keywords: str = '["cat"]') -> int:
    job_id = conn.execute(
        "SELECT id FROM chunkq.create_job(1, %s, %s, %s, %s)", (name, keywords, 500 * chunks, priority)
    ).fetchone()[0]
    conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    return int(job_id)


def scalar(conn: psycopg.Connection, query: str, *params: Any) -> Any:
    return conn.execute(query, params).fetchone()[0]


def no_reload_marker(page: Any) -> None:
    page.evaluate("window.__sameDocument = true")


def same_document(page: Any) -> bool:
    return bool(page.evaluate("window.__sameDocument === true"))


def test_the_jobs_page_shows_progress_moving_without_reload(conn, start_pool, start_web, page):
    named_job(conn, "kittens · quick sample", 20, priority=9, keywords='["kitten"]')
    crawl = named_job(conn, "cats · December crawl", 300, priority=7, keywords='["cat", "cats"]')
    paused = named_job(conn, "birds of prey", 80, keywords='["eagle", "hawk"]')
    conn.execute("SELECT chunkq.pause_job(%s)", (paused,))
    named_job(conn, "dogs · archive", 120, priority=3, keywords='["dog"]')
    web = start_web("--refresh", "0.5")
    start_pool("--handler", "chunkq.workers.sample:crawl", "--processes", "2", env=CRAWL)
    wait_until(
        lambda: scalar(conn, "SELECT completed_chunks FROM chunkq.job_overview WHERE id = %s", crawl) > 5,
        30,
        "the crawl to start",
    )

    page.goto(web.url + "/")
    no_reload_marker(page)
    bar = page.locator(f'tr[data-key="{crawl}"] progress')
    first = float(bar.get_attribute("value") or 0)
    # Polled from here: the page's CSP refuses the eval that page.wait_for_function would need.
    later = wait_until(
        lambda: (value := float(bar.get_attribute("value") or 0)) > first + 2 and value, 20, "the progress bar to move"
    )
    assert same_document(page), "the page reloaded instead of updating in place"
    in_sql = scalar(conn, "SELECT completion_percentage FROM chunkq.job_overview WHERE id = %s", crawl)
    assert first + 2 < later <= in_sql
    assert page.locator(f'tr[data-key="{paused}"] .status').inner_text() == "paused"
    assert page.locator("[data-live-status]").inner_text() == "live"
    screenshot(page, "dashboard-jobs.png")
    assert page.problems == []


def test_pause_and_resume_from_a_job_page(conn, start_pool, start_web, page):
    job_id = named_job(conn, "cats · December crawl", 400, keywords='["cat", "cats"]')
    web = start_web("--refresh", "0.5", token=TOKEN)
    start_pool("--handler", "chunkq.workers.sample:crawl", "--processes", "2", env=CRAWL)

    page.goto(web.url + f"/jobs/{job_id}")
    assert page.locator("button.pause").count() == 0  # not signed in: no actions
    page.click("text=Sign in")
    page.fill("input[name=token]", TOKEN)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(web.url + "/")
    page.goto(web.url + f"/jobs/{job_id}")
    wait_until(
        lambda: scalar(conn, "SELECT count(*) FROM chunkq.chunk_errors WHERE job_id = %s", job_id) >= 2,
        30,
        "a few failures to show",
    )

    page.click("button.pause")
    page.wait_for_url(f"**/jobs/{job_id}?done=pause")
    assert page.locator(".notice").inner_text() == "Job paused."
    assert scalar(conn, "SELECT paused_at IS NOT NULL FROM chunkq.crawl_jobs WHERE id = %s", job_id)
    # Claims stop: once the chunks already running are done, nothing more is claimed.
    wait_until(
        lambda: scalar(conn, "SELECT processing_chunks FROM chunkq.job_overview WHERE id = %s", job_id) == 0,
        10,
        "running chunks to finish",
    )
    quiet_since = scalar(conn, "SELECT now()")
    time.sleep(1.5)
    assert (
        scalar(
            conn, "SELECT count(*) FROM chunkq.job_chunks WHERE job_id = %s AND claimed_at > %s", job_id, quiet_since
        )
        == 0
    )
    assert page.locator(".blockers tr[data-key=paused]").count() == 1
    assert page.locator("[data-field=status]").first.inner_text() == "paused"
    screenshot(page, "dashboard-job.png")

    page.click("button.resume")
    page.wait_for_url(f"**/jobs/{job_id}?done=resume")
    resumed_at = scalar(conn, "SELECT now()")
    wait_until(
        lambda: (
            scalar(
                conn, "SELECT count(*) FROM chunkq.job_chunks WHERE job_id = %s AND claimed_at > %s", job_id, resumed_at
            )
            > 0
        ),
        15,
        "claims to start again",
    )
    page.wait_for_selector(".blockers tr[data-key=paused]", state="detached", timeout=10_000)
    assert page.problems == []


def test_an_action_without_the_token_is_refused_and_changes_nothing(conn, start_web, page):
    job_id = named_job(conn, "cats", 10)
    read_only = start_web()
    page.goto(read_only.url + f"/jobs/{job_id}")
    assert page.locator("button").count() == 0
    assert "Read-only" in page.locator("main").inner_text()
    before = snapshot(conn)
    response = page.request.post(read_only.url + f"/jobs/{job_id}/pause", form={"csrf": "guessed"})
    assert response.status == 403

    guarded = start_web(token=TOKEN)  # a token exists, but this browser never signed in
    page.goto(guarded.url + f"/jobs/{job_id}")
    assert page.locator("button.pause").count() == 0
    response = page.request.post(guarded.url + f"/jobs/{job_id}/pause", form={"csrf": "guessed"})
    assert response.status == 403
    assert snapshot(conn) == before


def test_a_hostile_job_name_renders_as_text(conn, start_web, page):
    first = named_job(conn, XSS, 4, keywords='["<script>alert(2)</script>"]')
    web = start_web("--refresh", "0.5")
    page.goto(web.url + "/")
    no_reload_marker(page)
    # A second one arrives after the page loaded: the live update adds its row from JSON.
    second = named_job(conn, XSS + " again", 4)
    page.wait_for_selector(f'tr[data-key="{second}"]', timeout=10_000)
    assert same_document(page)
    for job_id in (first, second):
        name = page.locator(f'tr[data-key="{job_id}"] td.name').inner_text()
        assert name.startswith(XSS)
    page.goto(web.url + f"/jobs/{first}")
    assert XSS in page.locator("h1").inner_text()
    assert "<script>alert(2)</script>" in page.locator("main").inner_text()
    page.wait_for_timeout(1200)  # a live update or two
    assert page.locator("main img").count() == 0
    assert page.problems == [], page.problems  # no alert() dialog, no script error
