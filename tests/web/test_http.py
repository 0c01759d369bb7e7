"""chunkq web over HTTP as a stranger sends it: bad input, missing tokens, forged forms, a database outage."""

from __future__ import annotations

import socket
import time

import psycopg
import pytest

from tests.helpers.db import claim, new_job, snapshot
from tests.web.conftest import TOKEN, Web, sign_in

XSS = "<img src=x onerror=alert(1)>"


def raw(web: Web, data: bytes) -> bytes:
    """Sends bytes as they are and returns what comes back (whatever the server makes of them). A server may
    answer and hang up before it has read everything: that is a refusal too, not an error of the test."""
    chunks = []
    with socket.create_connection(("127.0.0.1", web.port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # reset, broken pipe, not connected any more
            pass
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


def test_pages_answer_and_bad_input_gets_the_right_status(conn, start_web):
    job_id = new_job(conn, 500 * 3)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'HTTP 503 from the search engine', true)", (chunk_id, attempt))
    web = start_web()
    for path in (
        "/",
        "/?status=running&name=TEST&page=1",
        f"/jobs/{job_id}",
        f"/chunks/{chunk_id}",
        "/workers",
        "/api/jobs",
        f"/api/jobs/{job_id}",
        "/api/workers",
        "/metrics",
        "/login",
        "/static/app.js",
    ):
        assert web.get(path).status_code == 200, path
    assert "HTTP # from the search engine" in web.get(f"/jobs/{job_id}").text  # the failure, by kind
    conn.execute(
        'SELECT chunkq.set_job_limits(%s, \'{"max_running": 2, "rate_key": "img.example", "max_failed_chunks": 9}\')',
        (job_id,),
    )
    settings = web.get(f"/jobs/{job_id}").text
    assert "at most 2 running" in settings and "<code>img.example</code>" in settings and "failed chunks 9" in settings

    expected = {
        "/jobs/999999": 404,
        "/api/jobs/999999": 404,
        "/chunks/999999": 404,
        "/no/such/page": 404,
        "/jobs/abc": 400,
        "/jobs/-1": 400,
        "/jobs/99999999999999999999999": 400,
        "/chunks/1e3": 400,
        "/?page=0": 400,
        "/?page=x": 400,
        "/?page=9999999999": 400,
        "/?status=bogus": 400,
        "/?name=" + "n" * 201: 400,
        "/?name=%00": 400,
        "/api/jobs?status=nope": 400,
    }
    for path, status in expected.items():
        response = web.get(path)
        assert response.status_code == status, (path, response.text[:300])
    assert web.get("/jobs/999999").headers["content-type"].startswith("text/html")
    assert web.get("/api/jobs/999999").json() == {"status": 404, "error": "there is no job 999999"}

    assert web.http.put("/").status_code == 405
    assert web.http.delete("/metrics").status_code == 405
    assert web.get(f"/jobs/{job_id}/pause").status_code == 405
    assert web.post("/workers").status_code == 405
    assert web.post(f"/jobs/{job_id}/explode", data={"csrf": "x"}).status_code == 404

    big = {"content-type": "application/x-www-form-urlencoded"}
    assert web.post(f"/jobs/{job_id}/pause", content=b"a=" + b"x" * 100_000, headers=big).status_code == 413

    def chunked():  # no Content-Length: the server counts as it reads
        for _ in range(40):
            yield b"x" * 1000

    assert web.post("/login", content=chunked(), headers=big).status_code == 413

    # Whatever arrives on the socket, the server answers the next request.
    for garbage in (
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /%%%%/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ):
        raw(web, garbage)
        assert web.alive()
    assert web.get("/").status_code == 200


def test_security_headers_and_a_hostile_name_as_text(conn, start_web):
    job_id = conn.execute(
        "SELECT id FROM chunkq.create_job(1, %s, '[\"<script>alert(2)</script>\"]', 1000)", (XSS,)
    ).fetchone()[0]
    conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    web = start_web()
    for path in ("/", f"/jobs/{job_id}", "/?name=" + XSS):
        response = web.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["server-timing"].startswith("app;dur=")
        assert "<img src=x" not in response.text and "<script>alert" not in response.text
        assert "<script>" not in response.text  # no inline script at all: the CSP would refuse it anyway
    assert "&lt;img src=x onerror=alert(1)&gt;" in web.get(f"/jobs/{job_id}").text
    assert web.get("/api/jobs").json()["rows"]["jobs"][0]["name"] == XSS  # JSON: JavaScript writes it as text


def test_a_read_only_dashboard_shows_no_actions_and_refuses_them(conn, start_web):
    job_id = new_job(conn, 500 * 4)
    web = start_web()  # no token
    page = web.get(f"/jobs/{job_id}").text
    assert "Read-only" in page and f'action="/jobs/{job_id}/pause"' not in page
    before = snapshot(conn)
    for action in ("pause", "resume", "cancel", "retry-failed", "priority"):
        response = web.post(f"/jobs/{job_id}/{action}", data={"csrf": "anything", "priority": "9"})
        assert response.status_code == 403, action
        assert "read-only" in response.text
    assert web.post("/login", data={"token": TOKEN}).status_code == 403
    assert "set-cookie" not in web.post("/login", data={"token": TOKEN}).headers
    assert snapshot(conn) == before


def test_actions_need_the_token_a_session_and_its_csrf_token(conn, start_web):
    job_id = new_job(conn, 500 * 4)
    web = start_web(token=TOKEN)
    before = snapshot(conn)
    assert web.post(f"/jobs/{job_id}/pause", data={"csrf": ""}).status_code == 403  # not signed in
    wrong = web.post("/login", data={"token": TOKEN[:-1] + "X"})
    assert wrong.status_code == 403 and "set-cookie" not in wrong.headers
    assert snapshot(conn) == before

    signed_in = web.post("/login", data={"token": TOKEN})
    assert signed_in.status_code == 303
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    csrf = web.get("/login").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert len(csrf) >= 32

    assert web.post(f"/jobs/{job_id}/pause", data={}).status_code == 403  # no CSRF token
    assert web.post(f"/jobs/{job_id}/pause", data={"csrf": csrf[:-2] + "zz"}).status_code == 403
    assert (
        web.post(f"/jobs/{job_id}/pause", data={"csrf": csrf}, headers={"origin": "http://evil.example"}).status_code
        == 403
    )
    assert (
        web.post(
            f"/jobs/{job_id}/pause", content=f"csrf={csrf}".encode(), headers={"content-type": "text/plain"}
        ).status_code
        == 400
    )
    assert snapshot(conn) == before

    paused = web.post(f"/jobs/{job_id}/pause", data={"csrf": csrf})
    assert paused.status_code == 303 and paused.headers["location"] == f"/jobs/{job_id}?done=pause"
    assert conn.execute("SELECT paused_at IS NOT NULL FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)).fetchone()[0]
    assert "Job paused." in web.get(paused.headers["location"]).text
    assert web.post(f"/jobs/{job_id}/resume", data={"csrf": csrf}).status_code == 303
    assert web.post(f"/jobs/{job_id}/priority", data={"csrf": csrf, "priority": "x"}).status_code == 400
    assert web.post(f"/jobs/{job_id}/priority", data={"csrf": csrf, "priority": "99"}).status_code == 400  # range
    assert web.post(f"/jobs/{job_id}/priority", data={"csrf": csrf, "priority": "8"}).status_code == 303
    ((chunk_id, attempt),) = claim(conn, job_id=job_id)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'gone')", (chunk_id, attempt))
    assert web.post(f"/jobs/{job_id}/retry-failed", data={"csrf": csrf}).status_code == 303
    assert web.post(f"/jobs/{job_id}/cancel", data={"csrf": csrf}).status_code == 303
    row = conn.execute(
        "SELECT status::text, priority, paused_at FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)
    ).fetchone()
    assert row == ("cancelled", 8, None)
    refused = web.post(f"/jobs/{job_id}/pause", data={"csrf": csrf})  # chunkq's own refusal
    assert refused.status_code == 409 and "cancelled" in refused.text
    assert web.post("/jobs/999999/pause", data={"csrf": csrf}).status_code == 404

    assert web.post("/logout", data={"csrf": csrf}).status_code == 303
    assert web.post(f"/jobs/{job_id}/resume", data={"csrf": csrf}).status_code == 403  # the session is gone


def test_a_database_outage_is_a_503_page_and_the_server_recovers(conn, dsn, start_web):
    new_job(conn, 500)
    web = start_web()
    assert web.get("/").status_code == 200
    name = conn.info.dbname
    with psycopg.connect(dsn, dbname="postgres", autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
            " AND pid <> pg_backend_pid() AND application_name = 'chunkq web'",
            (name,),
        )
        try:
            down = web.get("/")
            assert down.status_code == 503 and "Database unavailable" in down.text
            assert web.get("/api/jobs").json()["status"] == 503
            metrics = web.get("/metrics")
            assert metrics.status_code == 200 and "chunkq_up 0.0" in metrics.text
            assert web.alive()
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    deadline = time.monotonic() + 15
    while web.get("/").status_code != 200:
        assert time.monotonic() < deadline, "the dashboard did not recover"
        time.sleep(0.2)
    assert "chunkq_up 1.0" in web.get("/metrics").text


def test_the_dashboard_runs_as_chunkq_reader(conn, reader_dsn, start_web):
    job_id = new_job(conn, 500 * 2)
    ((chunk_id, attempt),) = claim(conn)
    conn.execute("SELECT chunkq.fail_chunk(%s, %s, 'boom', true)", (chunk_id, attempt))
    reader = start_web(on=reader_dsn)
    for path in ("/", f"/jobs/{job_id}", f"/chunks/{chunk_id}", "/workers", "/api/jobs", f"/api/jobs/{job_id}"):
        assert reader.get(path).status_code == 200, path
    assert "chunkq_up 1.0" in reader.get("/metrics").text

    # Given a token but only a reader's rights, an action is refused by the database: 403, nothing changes.
    acting = start_web(token=TOKEN, on=reader_dsn)
    csrf = sign_in(acting)
    before = snapshot(conn)
    refused = acting.post(f"/jobs/{job_id}/pause", data={"csrf": csrf})
    assert refused.status_code == 403 and "may not" in refused.text
    assert snapshot(conn) == before


@pytest.mark.parametrize("argument", ["--port=0", "--port=70000", "--top-jobs=5000", "--token-file=/nonexistent"])
def test_bad_options_are_refused_before_serving(argument, dsn, capsys, monkeypatch):
    from chunkq.cli import main

    monkeypatch.setenv("CHUNKQ_DSN", dsn)
    try:
        code = main(["web", argument])
    except SystemExit as exit:  # argparse's refusals
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("chunkq: ") and len(err.splitlines()) == 1, err
