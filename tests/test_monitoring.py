"""deploy/: the alert rules and the Grafana dashboard name only metrics chunkq exports, and promtool (when
installed: Debian's prometheus package) accepts the rules and the scrape configuration."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.pool import ROOT

DEPLOY = ROOT / "deploy"
POOL_METRICS = {
    "chunkq_worker_chunks_total",
    "chunkq_worker_handler_duration_seconds_bucket",
    "chunkq_worker_claims_total",
    "chunkq_worker_chunks_claimed_total",
    "chunkq_worker_heartbeats_total",
    "chunkq_worker_lease_losses_total",
    "chunkq_worker_reconnects_total",
    "chunkq_pool_worker_restarts_total",
    "chunkq_pool_processes",
}


def exported() -> set[str]:
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed: pip install -e '.[metrics]'")
    from chunkq.metrics import GAUGES

    return set(GAUGES) | {"chunkq_up", "chunkq_metrics_query_seconds"} | POOL_METRICS


def names_in(text: str) -> set[str]:
    return set(re.findall(r"\bchunkq_[a-z_]+\b", text))


def test_alerts_and_dashboard_use_only_exported_metrics():
    known = exported()
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    assert names_in(alerts) - known == set()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "chunkq.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    assert names_in(exprs) - known == set()
    for metric in (
        "chunkq_oldest_transaction_age_seconds",
        "chunkq_expired_leases",
        "chunkq_workers_connected",
        "chunkq_queue_oldest_pending_age_seconds",
        "chunkq_chunk_errors_per_second",
    ):
        assert metric in alerts


@pytest.mark.parametrize("what", ["rules", "config"])
def test_promtool_accepts_the_rules_and_the_config(what, tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    target = DEPLOY / "prometheus" / ("alerts.yml" if what == "rules" else "prometheus.yml")
    result = subprocess.run([promtool, "check", what, str(target)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
