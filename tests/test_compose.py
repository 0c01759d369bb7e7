"""docker-compose.yml is valid and is what we mean to deploy (no Docker engine needed to check it)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from chunkq.testing import PINNED_IMAGE
from tests.helpers.pool import ROOT


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


def test_web_and_monitoring_services():
    text = config("--profile", "monitoring")
    for service in ("web:", "prometheus:", "grafana:"):
        assert f"\n  {service}" in text
    assert "127.0.0.1:8080:8080" in text  # the dashboard is published on this machine only
    assert "--metrics-port" in text and "9464" in text
    assert "/etc/prometheus" in text and "/etc/grafana/provisioning" in text
    assert text.count("- monitoring") == 2  # Prometheus and Grafana only with the profile
