"""The seed guide's "Testing Integration" example, nearly verbatim.

Differences: the job is created through CrawlJobRepository (the seed added an ORM
object to the session), and ``session`` is a psycopg AsyncConnection.
"""

import pytest

from chunkq import CrawlJobRepository, JobChunkingService, JobChunkRepository


@pytest.mark.asyncio
async def test_integration_with_crawl_job(session):
    # Create job
    job_repo = CrawlJobRepository(session)
    job = await job_repo.create(project_id=1, name="Test", keywords={"keywords": ["test"]}, max_images=1500)
    await session.commit()

    # Create service
    chunk_repo = JobChunkRepository(session)
    service = JobChunkingService(chunk_repo, job_repo, session)

    # Create chunks
    chunks = await service.create_chunks_for_job(job_id=job.id, max_images=1500)

    assert len(chunks) == 3
    assert chunks[0].image_range["start"] == 0
    assert chunks[0].image_range["end"] == 499
