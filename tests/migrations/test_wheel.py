"""A wheel built from the repository, installed in a fresh venv outside the checkout, migrates a database."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers.db import MIGRATIONS

ROOT = Path(__file__).resolve().parents[2]


def run(*command: object, cwd: Path) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_wheel_carries_the_migrations(tmp_path, empty_dsn):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp_path / "dist", ROOT, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("chunkq-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path)
    script = "import chunkq, sys; print(chunkq.__file__); print(chunkq.migrate(sys.argv[1]))"
    out = run(python, "-c", script, empty_dsn, cwd=tmp_path).splitlines()
    assert out[0].startswith(str(tmp_path / "venv")), "imported chunkq from the checkout, not the wheel"
    assert out[1] == str(MIGRATIONS)
