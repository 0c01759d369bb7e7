"""Fixtures for the dashboard and metrics tests: `chunkq web` as a real subprocess on a free port, Chromium
driven by Playwright, a login role in chunkq_reader. Everything skips, saying why, without the web extra,
Playwright or Chromium."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli.conftest import cli_env
from tests.helpers.db import login_role
from tests.helpers.pool import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "operator-token-for-tests-0123456789"
SCREENSHOTS = ROOT / "build" / "screenshots"
WEB_EXTRA = ("starlette", "uvicorn", "jinja2", "prometheus_client")


@pytest.fixture(autouse=True)
def _web_extra_installed() -> None:
    missing = [name for name in WEB_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the web extra is not installed ({', '.join(missing)}): pip install -e '.[web]'")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Web:
    """A running `chunkq web`, and an HTTP client for it that follows no redirects."""

    def __init__(self, dsn: str, log: Path, *args: str, token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = cli_env(CHUNKQ_DSN=dsn)
        env.pop("CHUNKQ_WEB_TOKEN", None)
        if token is not None:
            env["CHUNKQ_WEB_TOKEN"] = token
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chunkq", "web", "--port", str(self.port), *args],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.url, timeout=10, follow_redirects=False)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chunkq web did not start: {log.read_text()}")
            time.sleep(0.05)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.post(path, **kwargs)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def start_web(dsn: str, tmp_path: Path) -> Iterator[Callable[..., Web]]:
    """start_web("--refresh", "0.5", token=TOKEN, on=other_dsn) -> a running dashboard, killed after the test."""
    servers: list[Web] = []

    def start(*args: str, token: str | None = None, on: str | None = None) -> Web:
        server = Web(on or dsn, tmp_path / f"web-{len(servers)}.log", *args, token=token)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def reader_dsn(dsn: str) -> Iterator[str]:
    """The DSN of a new login role that is only a member of chunkq_reader (dropped afterwards)."""
    with login_role(dsn, "chunkq_test_web_reader", "chunkq_reader") as reader:
        yield reader


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright, for one test module: while Playwright's sync API is open, its event
    loop counts as running in this thread, and pytest-asyncio's tests in later modules could not start theirs."""
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("Playwright is not installed: pip install -e '.[e2e]' (never `playwright install`)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A fresh browser page (its own cookies) that fails the test on a JavaScript error or a dialog."""
    context = chromium.new_context(viewport={"width": 1280, "height": 760})
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    page.on("dialog", lambda dialog: (page.problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    yield page
    context.close()


def screenshot(page: Any, name: str) -> Path:
    """Saves a screenshot under build/screenshots (and docs/images with CHUNKQ_UPDATE_SCREENSHOTS=1)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=False)
    if os.environ.get("CHUNKQ_UPDATE_SCREENSHOTS"):
        (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ROOT / "docs" / "images" / name), full_page=False)
    return path


def sign_in(web: Web) -> str:
    """Signs the test's HTTP client in with the token; returns the session's CSRF token (read off a page)."""
    response = web.post("/login", data={"token": TOKEN})
    assert response.status_code == 303, response.text
    page = web.get("/login").text
    marker = 'name="csrf" value="'
    return page[page.index(marker) + len(marker) :].split('"', 1)[0]
