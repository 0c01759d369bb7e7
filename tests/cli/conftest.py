from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers.pool import ROOT


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    def json(self) -> Any:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout: {self.out}\nstderr: {self.err}"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CHUNKQ_DSN", "DATABASE_URL")}
    return {**env, **extra}


@pytest.fixture
def chunkq(dsn: str) -> Callable[..., Result]:
    """Runs ``python -m chunkq ARGS`` against the test database (through $CHUNKQ_DSN)."""

    def run(*args: object, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "chunkq", *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or cli_env(CHUNKQ_DSN=dsn),
            stdin=subprocess.DEVNULL,  # no terminal: destructive commands need --yes
        )
        return Result(proc)

    return run
