"""chunkq/_sync is generated from chunkq/_async; this fails when someone edits one without the other."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sync_client_is_generated_from_the_async_source():
    result = subprocess.run(
        [sys.executable, "tools/gen_sync.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
