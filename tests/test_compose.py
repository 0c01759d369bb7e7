"""docker-compose.yml is valid and is what we mean to deploy (no Docker engine needed to check it)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from chunkq.testing import PINNED_IMAGE
from tests.helpers.db import new_job
from tests.helpers.pool import ROOT, progress, wait_until


def compose_command() -> list[str]:
    """``docker compose`` (v2) if the plugin is there, else ``docker-compose`` (v1, Debian's package)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed (.ci/run installs docker-compose)")


def config(*args: str) -> str:
    result = subprocess.run([*compose_command(), *args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_compose_file_is_valid_and_complete():
    text = config("--profile", "demo")
    assert f"image: {PINNED_IMAGE}" in text
    for service in ("postgres:", "migrate:", "worker:", "demo-job:"):
        assert f"\n  {service}" in text
    assert "pg_isready" in text and "chunkq-pgdata" in text
    assert "condition: service_healthy" in text and "condition: service_completed_successfully" in text
    assert "CHUNKQ_DSN: postgresql://chunkq:chunkq@postgres:5432/chunkq" in text


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("POSTGRES_PASSWORD", "s3cret")
    monkeypatch.setenv("CHUNKQ_PROCESSES", "6")
    text = config()
    assert "postgresql://chunkq:s3cret@postgres:5432/chunkq" in text
    assert "- '6'" in text or '- "6"' in text


def test_postgres_is_published_on_localhost_only_by_default(monkeypatch):
    ports = config().split("\n  postgres:")[1].split("\n  worker:")[0]
    assert "127.0.0.1:5432:5432" in ports or "host_ip: 127.0.0.1" in ports, ports
    monkeypatch.setenv("POSTGRES_BIND", "0.0.0.0")
    assert "0.0.0.0:5432:5432" in config() or "host_ip: 0.0.0.0" in config()


def worker_service(text: str) -> str:
    return text.split("\n  worker:")[1].split("\nvolumes:")[0]


def test_your_own_handler_mounted_or_in_an_image_of_your_own(monkeypatch):
    worker = worker_service(config())
    assert "PYTHONPATH: /handlers" in worker and "examples/handlers:/handlers:ro" in worker
    assert "image: chunkq:local" in worker and "build:" not in worker and "pull_policy: never" in worker
    monkeypatch.setenv("CHUNKQ_HANDLERS", "/srv/mycrawler-src")
    monkeypatch.setenv("CHUNKQ_HANDLER", "mycrawler.crawl:crawl_chunk")
    monkeypatch.setenv("CHUNKQ_WORKER_IMAGE", "mycrawler-worker")
    worker = worker_service(config())
    assert "/srv/mycrawler-src:/handlers:ro" in worker and "mycrawler.crawl:crawl_chunk" in worker
    assert "image: mycrawler-worker" in worker
    image = (ROOT / "examples" / "handlers" / "Dockerfile").read_text()
    assert "FROM chunkq:local" in image and "COPY mycrawler /app/mycrawler" in image


def test_the_image_carries_no_embedded_server():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'pip install --no-cache-dir ".[binary]"' in dockerfile and "embedded" not in dockerfile.split("RUN")[1]


def test_the_mounted_example_handler_runs_under_the_pool(dsn, conn, start_pool):
    """What the compose worker runs by default with CHUNKQ_HANDLER=mycrawler.crawl:crawl_chunk."""
    job_id = new_job(conn, 1500)
    pool = start_pool(
        "--handler",
        "mycrawler.crawl:crawl_chunk",
        "--processes",
        "1",
        env={"PYTHONPATH": str(ROOT / "examples" / "handlers")},
    )
    wait_until(lambda: progress(dsn, job_id) == {"completed": 3}, 30, "the example handler to crawl the job")
    assert pool.stop() == 0
