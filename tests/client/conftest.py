from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest

from chunkq import CrawlJobRepository, JobChunkingService, JobChunkRepository


@pytest.fixture
async def session(dsn: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """A non-autocommit connection, the closest thing to the seed's SQLAlchemy session."""
    connection = await psycopg.AsyncConnection.connect(dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def service(aconn: psycopg.AsyncConnection) -> JobChunkingService:
    return JobChunkingService(JobChunkRepository(aconn), CrawlJobRepository(aconn), aconn, worker_id="tester")
