"""The seed's workflows in examples/ keep running (Workflow 2 in several processes, failures retried)."""

import subprocess
import sys

from tests.cli.conftest import cli_env
from tests.helpers.pool import ROOT


def test_seed_workflows_example(dsn, conn):
    result = subprocess.run(
        [
            sys.executable,
            "examples/seed_workflows.py",
            "--images",
            "10000",
            "--processes",
            "2",
            "--failure-rate",
            "0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(CHUNKQ_DSN=dsn),
    )
    assert result.returncode == 0, result.stderr
    assert "done: job 1 completed, 20/20 chunks completed" in result.stdout
    assert conn.execute("SELECT count(*) FROM chunkq.job_chunks WHERE status = 'completed'").fetchone() == (20,)
