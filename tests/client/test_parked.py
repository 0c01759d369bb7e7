"""A paused job's pending chunks are parked at available_at = infinity: every read returns them."""

from __future__ import annotations

from chunkq import ChunkStatus
from chunkq._times import FAR_FUTURE
from chunkq.sync import CrawlJobRepository, JobChunkRepository
from tests.helpers.db import new_job


def test_a_paused_jobs_parked_chunks_read_as_far_future(conn):
    job_id = new_job(conn, 1500)
    CrawlJobRepository(conn).pause(job_id)
    chunks = JobChunkRepository(conn)
    listed = chunks.list_for_job(job_id)
    assert [c.status for c in listed] == [ChunkStatus.PENDING] * 3
    assert {c.available_at for c in listed} == {FAR_FUTURE}
    assert chunks.get_by_id(listed[0].id).available_at == FAR_FUTURE
    assert chunks.list_for_job(job_id, status="pending", limit=1)[0].available_at == FAR_FUTURE
