"""Fixtures: a real Postgres server per session, a freshly migrated database per test.

The server is CHUNKQ_TEST_DSN, else a testcontainers container when Docker
answers, else an embedded Postgres (see chunkq.testing).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from chunkq.testing import TemplateDatabases, TestServer, postgres_server
from tests.helpers.pool import Pool

SERVER_KEY = pytest.StashKey[str]()

# A shell starts a background job (`./dev test &`) with SIGINT ignored, and every process the tests start would
# inherit that: Ctrl-C tests would then wait on commands that cannot be interrupted. Children get the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[TestServer]:
    with postgres_server() as server:
        request.config.stash[SERVER_KEY] = f"PostgreSQL {server.version()} ({server.source})"
        yield server


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if SERVER_KEY in config.stash:
        terminalreporter.write_line(f"chunkq tests ran on {config.stash[SERVER_KEY]}")


@pytest.fixture(scope="session")
def databases(pg_server: TestServer) -> Iterator[TemplateDatabases]:
    dbs = TemplateDatabases(pg_server.dsn)
    dbs.create_template()
    yield dbs
    dbs.drop(dbs.template)


@pytest.fixture
def dsn(databases: TemplateDatabases) -> Iterator[str]:
    """A fresh database with the chunkq schema, dropped after the test."""
    name = databases.create()
    yield databases.dsn(name)
    databases.drop(name)


@pytest.fixture
def empty_dsn(databases: TemplateDatabases) -> Iterator[str]:
    """A fresh database without the chunkq schema."""
    name = databases.create(template=False)
    yield databases.dsn(name)
    databases.drop(name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection: each chunkq call is its own transaction."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
async def aconn(dsn: str) -> AsyncIterator[psycopg.AsyncConnection]:
    connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def start_pool(dsn: str, tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    """Starts ``python -m chunkq.workers`` on the test database; every pool is killed at the end of the test."""
    pools: list[Pool] = []

    def start(*args: str, env: dict[str, str] | None = None, on: str | None = None) -> Pool:
        pool = Pool(on or dsn, tmp_path / f"pool-{len(pools)}.log", *args, env=env)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.kill()
