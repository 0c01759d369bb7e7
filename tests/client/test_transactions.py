"""The client never commits a transaction the caller opened, and a refused call leaves it usable."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from chunkq import CrawlJobRepository, JobChunkingService, JobChunkRepository, ValidationError


def count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as other:
        return other.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def services(conn):
    return JobChunkingService(JobChunkRepository(conn), CrawlJobRepository(conn), conn)


async def test_job_and_chunks_in_the_callers_transaction_roll_back_with_it(dsn):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE app_jobs (crawl_job_id bigint)")
        service = services(conn)
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                job = await service.job_repo.create(project_id=1, name="x", keywords=[], max_images=1500)
                await service.create_chunks_for_job(job.id, 1500)
                await conn.execute("INSERT INTO app_jobs VALUES (%s)", (job.id,))
                assert count(dsn, "chunkq.job_chunks") == 0  # nothing visible before commit
                raise RuntimeError("the app changes its mind")
    for table in ("chunkq.crawl_jobs", "chunkq.job_chunks", "chunkq.job_chunk_counts", "app_jobs"):
        assert count(dsn, table) == 0, table


async def test_non_autocommit_connection_is_left_for_the_caller_to_commit(dsn, session):
    service = services(session)
    job = await service.job_repo.create(project_id=1, name="x", keywords=[], max_images=1000)
    await service.create_chunks_for_job(job.id)
    assert session.info.transaction_status == TransactionStatus.INTRANS
    assert count(dsn, "chunkq.job_chunks") == 0
    await session.commit()
    assert count(dsn, "chunkq.job_chunks") == 2


async def test_refused_call_inside_a_transaction_keeps_the_callers_work(dsn, session):
    service = services(session)
    job = await service.job_repo.create(project_id=1, name="kept", keywords=[], max_images=1000)
    with pytest.raises(ValidationError):
        await service.create_chunks_for_job(job.id, max_images=999)  # does not match the job
    assert session.info.transaction_status == TransactionStatus.INTRANS  # not aborted
    await service.create_chunks_for_job(job.id)
    await session.commit()
    assert count(dsn, "chunkq.crawl_jobs") == 1 and count(dsn, "chunkq.job_chunks") == 2


async def test_refused_first_call_leaves_the_connection_usable(session):
    service = services(session)
    with pytest.raises(ValidationError):
        await service.job_repo.create(project_id=1, name="x", keywords=[], max_images=0)
    assert session.info.transaction_status == TransactionStatus.IDLE
    job = await service.job_repo.create(project_id=1, name="x", keywords=[], max_images=10)
    assert job.id


def test_autocommit_calls_are_visible_at_once(dsn, conn):
    from chunkq.sync import CrawlJobRepository as Jobs

    Jobs(conn).create(project_id=1, name="x", keywords=[], max_images=10)
    assert count(dsn, "chunkq.crawl_jobs") == 1


def test_claim_inside_a_long_transaction_still_hands_out_each_chunk_once(dsn):
    from chunkq.sync import JobChunkRepository as Chunks

    with psycopg.connect(dsn, autocommit=True) as setup:
        job = setup.execute("SELECT id FROM chunkq.create_job(1, 'x', '[]', 1000)").fetchone()[0]
        setup.execute("SELECT chunkq.create_chunks(%s)", (job,))
    with psycopg.connect(dsn) as first, psycopg.connect(dsn) as second:
        a = Chunks(first).claim("first", job_id=job)  # uncommitted
        b = Chunks(second).claim("second", job_id=job)
        assert a[0].id != b[0].id
        assert Chunks(second).claim("second", job_id=job) == []
        first.rollback()  # the first claim never happened...
        second.commit()
    with psycopg.connect(dsn, autocommit=True) as third:
        again = Chunks(third).claim("third", job_id=job)  # ...so its chunk is claimable again
        assert [c.id for c in again] == [a[0].id] and again[0].attempt == 1
