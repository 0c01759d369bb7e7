"""JobChunkingService and the repositories on a SQLAlchemy session (psycopg driver), as the seed's users run them:
chunkq's calls join the session's transaction; commit keeps them, rollback removes them, a refusal leaves the
session's transaction usable. The async client on an AsyncSession, chunkq.sync on a Session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from sqlalchemy import BigInteger, String, create_engine, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import chunkq
import chunkq.sync
from chunkq import CrawlJobRepository, JobAlreadyChunked, JobChunkingService, JobChunkRepository


class Base(DeclarativeBase):
    pass


class AppJob(Base):
    """The application's own crawl_jobs table, in public (chunkq's is chunkq.crawl_jobs)."""

    __tablename__ = "crawl_jobs"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))


def count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as other:
        return other.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.fixture
async def engine(dsn: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine("postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(dsn))
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
def sync_engine(dsn: str) -> Iterator:
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


async def create_app_job(session: AsyncSession, name: str) -> tuple[AppJob, list]:
    """The seed's Workflow 1 in the app's transaction: its own row, chunkq's job with the same id, the chunks."""
    job = AppJob(name=name)
    session.add(job)
    await session.flush()  # the app's id
    job_repo, chunk_repo = CrawlJobRepository(session), JobChunkRepository(session)
    await job_repo.create(id=job.id, project_id=1, name=name, keywords=["cat"], max_images=1500)
    service = JobChunkingService(chunk_repo, job_repo, session)
    chunks = await service.create_chunks_for_job(job_id=job.id, max_images=1500, priority=5)
    return job, chunks


async def test_commit_keeps_the_chunks(engine, dsn):
    async with AsyncSession(engine) as session:
        job, chunks = await create_app_job(session, "cats")
        job_id = job.id
        assert [c.image_range for c in chunks][0] == {"start": 0, "end": 499}
        assert count(dsn, "chunkq.job_chunks") == 0  # not before the app commits
        await session.commit()
    assert count(dsn, "chunkq.job_chunks") == 3 and count(dsn, "public.crawl_jobs") == 1
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT id FROM chunkq.crawl_jobs").fetchall() == [(job_id,)]  # the app's id


async def test_rollback_removes_them(engine, dsn):
    async with AsyncSession(engine) as session:
        await create_app_job(session, "cats")
        await session.rollback()
    for table in ("chunkq.crawl_jobs", "chunkq.job_chunks", "chunkq.job_chunk_counts", "public.crawl_jobs"):
        assert count(dsn, table) == 0, table


async def test_a_refused_call_leaves_the_sessions_transaction_usable(engine, dsn):
    async with AsyncSession(engine) as session:
        job, _ = await create_app_job(session, "cats")
        service = JobChunkingService(JobChunkRepository(session), CrawlJobRepository(session), session)
        with pytest.raises(JobAlreadyChunked):
            await service.create_chunks_for_job(job_id=job.id)
        # the app carries on in the same transaction, and commits it all
        assert (await session.execute(select(AppJob.name))).scalar_one() == "cats"
        other, _ = await create_app_job(session, "dogs")
        progress = await service.get_job_chunk_progress(other.id)
        assert progress["total_chunks"] == 3
        await session.commit()
    assert count(dsn, "chunkq.job_chunks") == 6 and count(dsn, "public.crawl_jobs") == 2


async def test_a_refusal_first_thing_in_a_session(engine, dsn):
    """Nothing done yet in the session: the refusal leaves it as fresh."""
    async with AsyncSession(engine) as session:
        with pytest.raises(chunkq.JobNotFound):
            await CrawlJobRepository(session).progress(4242)
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        await create_app_job(session, "cats")
        await session.commit()
    assert count(dsn, "chunkq.job_chunks") == 3


def test_the_sync_client_on_a_sync_session(sync_engine, dsn):
    with Session(sync_engine) as session:
        job = AppJob(name="cats")
        session.add(job)
        session.flush()
        jobs, chunks = chunkq.sync.CrawlJobRepository(session), chunkq.sync.JobChunkRepository(session)
        jobs.create(id=job.id, project_id=1, name="cats", max_images=1000)
        service = chunkq.sync.JobChunkingService(chunks, jobs, session)
        assert len(service.create_chunks_for_job(job.id)) == 2
        with pytest.raises(JobAlreadyChunked):
            service.create_chunks_for_job(job.id)
        session.commit()
    assert count(dsn, "chunkq.job_chunks") == 2
    with Session(sync_engine) as session:
        chunkq.sync.CrawlJobRepository(session).create(project_id=1, name="gone", max_images=10)
        session.rollback()
    assert count(dsn, "chunkq.crawl_jobs") == 1


async def test_anything_else_is_a_type_error():
    with pytest.raises(TypeError, match="psycopg connection or a SQLAlchemy session"):
        await CrawlJobRepository(object()).progress(1)  # type: ignore[arg-type]
