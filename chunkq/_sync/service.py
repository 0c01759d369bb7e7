# Generated from chunkq/_async/service.py by tools/gen_sync.py: do not edit; edit the async source.
"""JobChunkingService: the seed's API, with the seed's names, arguments and shapes.

What changed from the seed, and why:

- ``get_next_pending_chunk`` claims the chunk in the same statement that finds it
  (``FOR UPDATE SKIP LOCKED``), so two workers running Workflow 2 can never get the
  same chunk; ``mark_chunk_processing`` on a chunk this service claimed just
  records the task id and extends the lease.
- The service remembers the attempt and lease token of every chunk it claimed
  and presents them when it heartbeats, completes or fails the chunk: if the
  lease lapsed and another worker took the chunk over, the stale call raises
  ``LeaseLost`` instead of overwriting the newer attempt.
- Calls never commit a transaction the caller opened; see ``execute.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

from .._params import default_worker_id
from ..errors import ChunkqError
from ..records import ChunkOutcome, CrawlJob, JobChunk, Lease, ProgressDict
from .repositories import CrawlJobRepository, JobChunkRepository

if TYPE_CHECKING:
    from .._connectable import Connectable

logger = logging.getLogger("chunkq")


class JobChunkingService:
    """Creates a job's chunks, hands them out one at a time, records outcomes, reports progress."""

    def __init__(
        self,
        chunk_repo: JobChunkRepository,
        job_repo: CrawlJobRepository,
        conn: Connectable,
        *,
        worker_id: str | None = None,
        lease: timedelta | float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        """``lease`` and ``chunk_size`` default to the deployment's (chunkq.settings)."""
        self.chunk_repo = chunk_repo
        self.job_repo = job_repo
        self.conn = conn
        self.worker_id = worker_id or default_worker_id()
        self.lease = lease
        self.chunk_size = chunk_size
        self._leases: dict[int, Lease] = {}  # chunk id -> the claim this service made

    def create_chunks_for_job(
        self,
        job_id: int,
        max_images: int | None = None,
        priority: int | None = None,
        chunk_size: int | None = None,
    ) -> list[JobChunk]:
        """Splits the job into chunks (1500 images -> 0-499, 500-999, 1000-1499) and returns them.

        ``max_images`` must match the job's (None: the job's); ``priority`` defaults
        to the job's, ``chunk_size`` to the service's, then the deployment's.
        """
        job = self.chunk_repo.create_for_job(
            job_id, max_images=max_images, priority=priority, chunk_size=chunk_size or self.chunk_size
        )
        logger.info("created %d chunks of %d images for job %d", job.total_chunks, job.chunk_size, job_id)
        return self.chunk_repo.list_for_job(job_id)

    def get_chunk_by_id(self, chunk_id: int) -> JobChunk | None:
        return self.chunk_repo.get_by_id(chunk_id)

    def get_next_pending_chunk(self, job_id: int | None = None) -> JobChunk | None:
        """Claims the job's next chunk for this service, or returns None when none is claimable."""
        chunks = self.chunk_repo.claim(self.worker_id, limit=1, job_id=job_id, lease=self.lease)
        if not chunks:
            return None
        chunk = chunks[0]
        self._leases[chunk.id] = chunk.lease
        logger.debug("claimed chunk %d of job %d (attempt %d)", chunk.id, chunk.job_id, chunk.attempt)
        return chunk

    def mark_chunk_processing(self, chunk_id: int, task_id: str | None = None) -> JobChunk:
        """Claims a pending chunk, or confirms one this service already claimed (recording ``task_id``).

        Raises InvalidTransition when another worker is processing the chunk.
        """
        held = self._leases.get(chunk_id)
        if held is not None:
            with self._holding(chunk_id):
                chunk = self.chunk_repo.heartbeat(
                    chunk_id, held.attempt, lease=self.lease, task_id=task_id, lease_token=held.lease_token
                )
        else:
            chunk = self.chunk_repo.claim_by_id(chunk_id, self.worker_id, lease=self.lease, task_id=task_id)
            self._leases[chunk.id] = chunk.lease
        logger.debug("chunk %d processing (attempt %d, task %s)", chunk_id, chunk.attempt, task_id)
        return chunk

    def heartbeat(self, chunk_id: int) -> JobChunk:
        """Extends the lease of a chunk this service holds; LeaseLost if it lapsed and was taken over."""
        held = self._held(chunk_id)
        with self._holding(chunk_id):
            return self.chunk_repo.heartbeat(chunk_id, held.attempt, lease=self.lease, lease_token=held.lease_token)

    def mark_chunk_completed(self, chunk_id: int) -> ChunkOutcome:
        held = self._held(chunk_id)
        with self._holding(chunk_id):
            outcome = self.chunk_repo.complete(chunk_id, held.attempt, held.lease_token)
        self._leases.pop(chunk_id, None)
        logger.debug("chunk %d completed (attempt %d)", chunk_id, outcome.attempt)
        if outcome.job_finished:
            logger.info("job %d finished: %s", outcome.job_id, outcome.job_status)
        return outcome

    def mark_chunk_failed(self, chunk_id: int, error_message: object) -> ChunkOutcome:
        """Marks the chunk failed with its error; ``retry_chunk`` puts it back."""
        held = self._held(chunk_id)
        with self._holding(chunk_id):
            outcome = self.chunk_repo.fail(chunk_id, held.attempt, error_message, lease_token=held.lease_token)
        self._leases.pop(chunk_id, None)
        logger.warning(
            "chunk %d of job %d failed (attempt %d): %s", chunk_id, outcome.job_id, outcome.attempt, error_message
        )
        if outcome.job_finished:
            logger.info("job %d finished: %s", outcome.job_id, outcome.job_status)
        return outcome

    def get_failed_chunks(self, job_id: int) -> list[JobChunk]:
        return self.chunk_repo.failed_for_job(job_id)

    def retry_chunk(self, chunk_id: int) -> JobChunk:
        """Puts a failed chunk back to pending; its ``retry_count`` goes up by one."""
        chunk = self.chunk_repo.retry(chunk_id)
        logger.info("chunk %d of job %d retried (retry %d)", chunk_id, chunk.job_id, chunk.retry_count)
        return chunk

    def get_job_chunk_progress(self, job_id: int) -> ProgressDict:
        """Counts by status, ``completion_percentage`` (completed / total) and ``is_complete``."""
        progress = self.job_repo.progress(job_id)
        return progress.as_dict()

    def cancel_job(self, job_id: int) -> CrawlJob:
        job = self.job_repo.cancel(job_id)
        logger.info("job %d cancelled", job_id)
        return job

    def _held(self, chunk_id: int) -> Lease:
        # A chunk this service did not claim is reported without attempt or token:
        # chunkq allows that to chunkq_app (an operator), and refuses anyone else.
        return self._leases.get(chunk_id) or Lease(chunk_id, None)

    @contextmanager
    def _holding(self, chunk_id: int) -> Iterator[None]:
        # Once chunkq refuses a report, this service no longer holds the chunk. A
        # connection error keeps the lease, so the report can be made again.
        try:
            yield
        except ChunkqError:
            self._leases.pop(chunk_id, None)
            raise
