"""JobChunkingService: the seed's methods and workflows, on the async client."""

from __future__ import annotations

import logging

import pytest

from chunkq import (
    ChunkStatus,
    InvalidTransition,
    JobChunkingService,
    JobStatus,
    LeaseLost,
)
from chunkq.sync import CrawlJobRepository as SyncJobs
from chunkq.sync import JobChunkingService as SyncService
from chunkq.sync import JobChunkRepository as SyncChunks


async def make_job(service: JobChunkingService, max_images: int = 1500, **kwargs) -> int:
    job = await service.job_repo.create(project_id=3, name="cats", keywords=["cat"], max_images=max_images, **kwargs)
    return job.id


async def test_workflow_1_create_job_with_chunks(service):
    job = await service.job_repo.create(project_id=1, name="dogs", keywords=["dog", "puppy"], max_images=1_500_000)
    chunks = await service.create_chunks_for_job(job_id=job.id, max_images=job.max_images, priority=5)
    assert len(chunks) == 3000
    assert [c.chunk_index for c in chunks] == list(range(3000))
    assert chunks[-1].image_range == {"start": 1_499_500, "end": 1_499_999}
    assert all(c.status == ChunkStatus.PENDING and c.priority == 5 for c in chunks)
    stored = await service.job_repo.get_by_id(job.id)
    assert stored.keywords == ["dog", "puppy"] and stored.total_chunks == 3000 and stored.chunk_size == 500


async def test_workflow_2_process_chunks(service):
    job_id = await make_job(service, 1500)
    await service.create_chunks_for_job(job_id, 1500)
    seen = []
    while True:
        chunk = await service.get_next_pending_chunk(job_id=job_id)
        if not chunk:
            break
        processing = await service.mark_chunk_processing(chunk_id=chunk.id)
        assert processing.status == ChunkStatus.PROCESSING and processing.attempt == chunk.attempt
        seen.append((chunk.image_range["start"], chunk.image_range["end"]))
        await service.mark_chunk_completed(chunk_id=chunk.id)
    assert seen == [(0, 499), (500, 999), (1000, 1499)]
    progress = await service.get_job_chunk_progress(job_id)
    assert progress["is_complete"] and progress["completed_chunks"] == 3
    assert (await service.job_repo.get_by_id(job_id)).status == JobStatus.COMPLETED


async def test_workflow_3_progress_shape(service):
    job_id = await make_job(service, 2000)
    await service.create_chunks_for_job(job_id)
    chunk = await service.get_next_pending_chunk(job_id)
    await service.mark_chunk_completed(chunk.id)
    progress = await service.get_job_chunk_progress(job_id=job_id)
    assert progress == {
        "job_id": job_id,
        "status": "running",
        "total_chunks": 4,
        "pending_chunks": 3,
        "processing_chunks": 0,
        "completed_chunks": 1,
        "failed_chunks": 0,
        "cancelled_chunks": 0,
        "completion_percentage": 25.0,
        "is_complete": False,
        "images_completed": 500,  # chunkq's own addition (checkpoints count too), after the seed's keys
    }
    assert list(progress)[-1] == "images_completed"
    assert f"{progress['completion_percentage']:.1f}%" == "25.0%"


async def test_workflow_4_handle_failures(service):
    job_id = await make_job(service, 1000)
    await service.create_chunks_for_job(job_id)
    for _ in range(2):
        chunk = await service.get_next_pending_chunk(job_id)
        await service.mark_chunk_processing(chunk.id)
        await service.mark_chunk_failed(chunk_id=chunk.id, error_message="HTTP 503")
    failed_chunks = await service.get_failed_chunks(job_id=job_id)
    assert [c.error_message for c in failed_chunks] == ["HTTP 503", "HTTP 503"]
    assert (await service.get_job_chunk_progress(job_id))["failed_chunks"] == 2
    for chunk in failed_chunks:
        if chunk.retry_count < 3:
            retried = await service.retry_chunk(chunk_id=chunk.id)
            assert retried.retry_count == chunk.retry_count + 1 and retried.status == ChunkStatus.PENDING
    assert await service.get_failed_chunks(job_id) == []
    assert (await service.job_repo.get_by_id(job_id)).status == JobStatus.RUNNING


async def test_celery_style_mark_processing_claims_a_given_chunk(service, aconn):
    job_id = await make_job(service, 1000)
    chunks = await service.create_chunks_for_job(job_id)
    chunk = await service.mark_chunk_processing(chunk_id=chunks[1].id, task_id="celery-42")
    assert (chunk.status, chunk.task_id, chunk.worker_id) == (ChunkStatus.PROCESSING, "celery-42", "tester")
    # A second task for the same chunk (a redelivery) is refused.
    other = JobChunkingService(service.chunk_repo, service.job_repo, aconn, worker_id="other")
    with pytest.raises(InvalidTransition, match="processing"):
        await other.mark_chunk_processing(chunks[1].id, task_id="celery-43")
    fetched = await service.get_chunk_by_id(chunks[1].id)
    assert fetched.task_id == "celery-42"
    await service.mark_chunk_completed(chunks[1].id)
    assert (await service.get_chunk_by_id(chunks[1].id)).status == ChunkStatus.COMPLETED


async def test_get_chunk_by_id_of_unknown_chunk_is_none(service):
    assert await service.get_chunk_by_id(987654) is None
    assert await service.job_repo.get_by_id(987654) is None


async def test_service_fences_its_reports_with_the_attempt_it_claimed(service, aconn):
    job_id = await make_job(service, 500)
    await service.create_chunks_for_job(job_id)
    stalled = JobChunkingService(service.chunk_repo, service.job_repo, aconn, worker_id="stalled", lease=0.05)
    chunk = await stalled.get_next_pending_chunk(job_id)
    await aconn.execute("SELECT pg_sleep(0.1)")
    rescued = await service.get_next_pending_chunk(job_id)  # reclaims the expired lease
    assert rescued.id == chunk.id and rescued.attempt == chunk.attempt + 1
    with pytest.raises(LeaseLost):
        await stalled.mark_chunk_completed(chunk.id)
    with pytest.raises(InvalidTransition):  # the stalled service forgot the chunk: now an unfenced report...
        await stalled.mark_chunk_processing(chunk.id)  # ...which cannot claim a processing chunk
    outcome = await service.mark_chunk_completed(chunk.id)
    assert outcome.job_finished and outcome.attempt == 2


async def test_heartbeat_extends_lease(service):
    job_id = await make_job(service, 500)
    await service.create_chunks_for_job(job_id)
    chunk = await service.get_next_pending_chunk(job_id)
    beat = await service.heartbeat(chunk.id)
    assert beat.lease_expires_at >= chunk.lease_expires_at and beat.heartbeat_at >= chunk.heartbeat_at


async def test_cancel_job(service):
    job_id = await make_job(service, 1500)
    await service.create_chunks_for_job(job_id)
    chunk = await service.get_next_pending_chunk(job_id)
    job = await service.cancel_job(job_id)
    assert job.status == JobStatus.CANCELLED
    with pytest.raises(LeaseLost):  # ChunkCancelled is a LeaseLost: stop working
        await service.mark_chunk_completed(chunk.id)


async def test_chunk_size_per_call_and_per_service(service, aconn):
    job_id = await make_job(service, 1000)
    chunks = await service.create_chunks_for_job(job_id, chunk_size=250)
    assert [c.image_range["end"] for c in chunks] == [249, 499, 749, 999]
    big = JobChunkingService(service.chunk_repo, service.job_repo, aconn, chunk_size=1000)
    other = await make_job(service, 1000)
    assert len(await big.create_chunks_for_job(other)) == 1


async def test_operations_are_logged_on_the_chunkq_logger(service, caplog):
    caplog.set_level(logging.DEBUG, logger="chunkq")
    job_id = await make_job(service, 500)
    await service.create_chunks_for_job(job_id)
    chunk = await service.get_next_pending_chunk(job_id)
    await service.mark_chunk_failed(chunk.id, "boom")
    messages = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert ("chunkq", "INFO", f"created 1 chunks of 500 images for job {job_id}") in messages
    assert ("chunkq", "WARNING", f"chunk {chunk.id} of job {job_id} failed (attempt 1): boom") in messages
    assert ("chunkq", "INFO", f"job {job_id} finished: failed") in messages


def test_sync_twin_runs_the_same_workflow(conn):
    service = SyncService(SyncChunks(conn), SyncJobs(conn), conn, worker_id="sync")
    job = service.job_repo.create(project_id=1, name="sync", keywords=None, max_images=1500)
    chunks = service.create_chunks_for_job(job.id, 1500)
    assert len(chunks) == 3
    chunk = service.get_next_pending_chunk(job.id)
    service.mark_chunk_processing(chunk.id, task_id="t")
    service.heartbeat(chunk.id)
    service.mark_chunk_failed(chunk.id, "oops")
    assert [c.id for c in service.get_failed_chunks(job.id)] == [chunk.id]
    assert service.retry_chunk(chunk.id).retry_count == 1
    while (chunk := service.get_next_pending_chunk(job.id)) is not None:
        service.mark_chunk_completed(chunk.id)
    assert service.get_job_chunk_progress(job.id)["is_complete"]
    assert service.get_chunk_by_id(chunks[0].id).status == ChunkStatus.COMPLETED
    assert service.chunk_repo.error_history(chunks[0].id)[0].error == "oops"
