from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.pool import Pool


@pytest.fixture
def start_pool(dsn: str, tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    """Starts ``python -m workers`` on the test database; every pool is killed at the end of the test."""
    pools: list[Pool] = []

    def start(*args: str, env: dict[str, str] | None = None, on: str | None = None) -> Pool:
        pool = Pool(on or dsn, tmp_path / f"pool-{len(pools)}.log", *args, env=env)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.kill()
