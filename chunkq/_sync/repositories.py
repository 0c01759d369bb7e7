# Generated from chunkq/_async/repositories.py by tools/gen_sync.py: do not edit; edit the async source.
"""Repositories: one method per chunkq SQL function, on the caller's connection.

The seed's names. ``CrawlJobRepository`` covers chunkq.crawl_jobs,
``JobChunkRepository`` chunkq.job_chunks. Methods that act on a claimed chunk
take the ``attempt`` and the ``lease_token`` the claim returned (``chunk.lease``
carries all three): the attempt is the fencing token that keeps a worker whose
lease lapsed from overwriting a newer attempt, the lease token the proof that
the caller is the worker that claimed the chunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .. import _queries as q
from .._params import default_worker_id, error_text, interval, keywords_json, lease_arrays, limits_json
from ..records import (
    ChunkError,
    ChunkOutcome,
    ChunkStatus,
    CrawlJob,
    ExpiredLease,
    FailureKind,
    JobChunk,
    JobErrorSummary,
    JobOverview,
    JobProgress,
    JobStatus,
    Lease,
    LeaseState,
    LiveWorker,
    PruneResult,
    QueueDepth,
    QueueStats,
    RateLimitState,
    record_row,
)
from .execute import fetch

if TYPE_CHECKING:
    from .._connectable import Connectable


class CrawlJobRepository:
    """Crawl jobs (chunkq.crawl_jobs)."""

    def __init__(self, conn: Connectable) -> None:
        self.conn = conn

    def create(
        self,
        *,
        project_id: int,
        name: str,
        keywords: Any = None,
        max_images: int,
        priority: int | None = None,
        max_retries: int | None = None,
        chunk_size: int | None = None,
        id: int | None = None,
        retry_base_delay: timedelta | float | None = None,
        max_running: int | None = None,
        rate_key: str | None = None,
        weight: float = 1.0,
        max_failed_ratio: float | None = None,
        max_failed_chunks: int | None = None,
        max_consecutive_failures: int | None = None,
    ) -> CrawlJob:
        """Creates a job without chunks. None takes the deployment default (chunkq.settings).

        ``id`` gives the job an id of your own, e.g. your application's job id, so that the seed's
        ``create_chunks_for_job(job_id=your_job.id, ...)`` finds it; ``retry_base_delay`` (a timedelta or
        seconds) is the job's own back-off before the first automatic retry.

        Scheduling: ``max_running`` caps the job's running chunks, ``rate_key`` names whose rate limits
        apply (RateLimitRepository.set), ``weight`` is its share of claims among the jobs of its priority;
        the failure budget (``max_failed_ratio``, ``max_failed_chunks``, ``max_consecutive_failures``)
        pauses the job once passed."""
        params = {
            "project_id": project_id,
            "name": name,
            "keywords": keywords_json(keywords),
            "max_images": max_images,
            "priority": priority,
            "max_retries": max_retries,
            "chunk_size": chunk_size,
            "id": id,
            "retry_base_delay": interval(retry_base_delay),
            "max_running": max_running,
            "rate_key": rate_key,
            "weight": weight,
            "max_failed_ratio": max_failed_ratio,
            "max_failed_chunks": max_failed_chunks,
            "max_consecutive_failures": max_consecutive_failures,
        }
        rows = fetch(self.conn, q.CREATE_JOB, params, record_row(CrawlJob))
        return rows[0]

    def get_by_id(self, job_id: int) -> CrawlJob | None:
        rows = fetch(self.conn, q.GET_JOB, {"job_id": job_id}, record_row(CrawlJob))
        return rows[0] if rows else None

    def cancel(self, job_id: int) -> CrawlJob:
        """Cancels the job's pending and processing chunks; a no-op for a cancelled job."""
        rows = fetch(self.conn, q.CANCEL_JOB, {"job_id": job_id}, record_row(CrawlJob))
        return rows[0]

    def progress(self, job_id: int) -> JobProgress:
        rows = fetch(self.conn, q.JOB_PROGRESS, {"job_id": job_id}, record_row(JobProgress))
        return rows[0]

    def overview(self, status: JobStatus | str | None = None, limit: int = 50) -> list[JobOverview]:
        """The newest ``limit`` jobs with their chunk counts, optionally only those in one status."""
        return fetch(self.conn, q.LIST_JOBS, {"status": status, "limit": limit}, record_row(JobOverview))

    def pause(self, job_id: int) -> CrawlJob:
        """Stops handing out the job's chunks (running ones carry on); a no-op for a paused job."""
        return (fetch(self.conn, q.PAUSE_JOB, {"job_id": job_id}, record_row(CrawlJob)))[0]

    def resume(self, job_id: int) -> CrawlJob:
        """Lets a paused job's chunks be claimed again; a no-op for a job that is not paused."""
        return (fetch(self.conn, q.RESUME_JOB, {"job_id": job_id}, record_row(CrawlJob)))[0]

    def set_priority(self, job_id: int, priority: int) -> CrawlJob:
        """Gives the job and its unfinished chunks a new priority."""
        params = {"job_id": job_id, "priority": priority}
        return (fetch(self.conn, q.SET_JOB_PRIORITY, params, record_row(CrawlJob)))[0]

    def set_limits(self, job_id: int, **limits: Any) -> CrawlJob:
        """Changes a running job's scheduling limits: any of max_running, rate_key, weight, max_failed_ratio,
        max_failed_chunks, max_consecutive_failures; None removes a limit, the others stay."""
        params = {"job_id": job_id, "limits": limits_json(limits)}
        return (fetch(self.conn, q.SET_JOB_LIMITS, params, record_row(CrawlJob)))[0]

    def prune(self, older_than: timedelta | str, max_chunks: int = 10_000) -> PruneResult:
        """Deletes jobs finished more than ``older_than`` ago, at most ``max_chunks`` chunks per call."""
        params = {"older_than": older_than, "max_chunks": max_chunks}
        return (fetch(self.conn, q.PRUNE_FINISHED_JOBS, params, record_row(PruneResult)))[0]

    def error_summary(self, job_id: int) -> JobErrorSummary:
        """How many errors the job's chunks recorded (retried, abandoned) and the latest one."""
        rows = fetch(self.conn, q.JOB_ERROR_SUMMARY, {"job_id": job_id}, record_row(JobErrorSummary))
        return rows[0]

    def delete(self, job_id: int) -> CrawlJob:
        """Deletes a job that is not running, with its chunks; returns the deleted job."""
        rows = fetch(self.conn, q.DELETE_JOB, {"job_id": job_id}, record_row(CrawlJob))
        return rows[0]


class JobChunkRepository:
    """Chunks of crawl jobs (chunkq.job_chunks)."""

    def __init__(self, conn: Connectable) -> None:
        self.conn = conn

    def create_for_job(
        self,
        job_id: int,
        max_images: int | None = None,
        priority: int | None = None,
        chunk_size: int | None = None,
    ) -> CrawlJob:
        """Splits the job into chunks once; returns the job with ``total_chunks`` set."""
        params = {"job_id": job_id, "max_images": max_images, "priority": priority, "chunk_size": chunk_size}
        rows = fetch(self.conn, q.CREATE_CHUNKS, params, record_row(CrawlJob))
        return rows[0]

    def list_for_job(
        self, job_id: int, status: ChunkStatus | str | None = None, limit: int | None = None
    ) -> list[JobChunk]:
        """The job's chunks in chunk_index order, optionally only those in one status, at most ``limit``."""
        params = {"job_id": job_id, "status": status, "limit": limit}
        return fetch(self.conn, q.LIST_CHUNKS, params, record_row(JobChunk))

    def failed_for_job(self, job_id: int) -> list[JobChunk]:
        return fetch(self.conn, q.FAILED_CHUNKS, {"job_id": job_id}, record_row(JobChunk))

    def get_by_id(self, chunk_id: int) -> JobChunk | None:
        rows = fetch(self.conn, q.GET_CHUNK, {"chunk_id": chunk_id}, record_row(JobChunk))
        return rows[0] if rows else None

    def error_history(self, chunk_id: int) -> list[ChunkError]:
        return fetch(self.conn, q.CHUNK_ERROR_HISTORY, {"chunk_id": chunk_id}, record_row(ChunkError))

    def claim(
        self,
        worker_id: str | None = None,
        *,
        limit: int = 1,
        job_id: int | None = None,
        lease: timedelta | float | None = None,
    ) -> list[JobChunk]:
        """Claims up to ``limit`` chunks (highest priority, then oldest), each handed to this caller only."""
        params = {
            "worker_id": worker_id or default_worker_id(),
            "limit": limit,
            "job_id": job_id,
            "lease": interval(lease),
        }
        return fetch(self.conn, q.CLAIM_CHUNKS, params, record_row(JobChunk))

    def complete_and_claim(
        self,
        completed: Iterable[Lease | tuple[int, int]],
        worker_id: str | None = None,
        *,
        limit: int = 1,
        job_id: int | None = None,
        lease: timedelta | float | None = None,
    ) -> list[JobChunk]:
        """Completes the held chunks (``chunk.lease`` of each) and claims up to ``limit`` more (0: none), in
        one transaction. All or nothing: a chunk no longer held raises its error (LeaseLost, ChunkCancelled,
        InvalidTransition) and nothing is completed or claimed."""
        params = {
            **lease_arrays(completed),
            "worker_id": worker_id or default_worker_id(),
            "limit": limit,
            "job_id": job_id,
            "lease": interval(lease),
        }
        return fetch(self.conn, q.COMPLETE_AND_CLAIM, params, record_row(JobChunk))

    def claim_by_id(
        self,
        chunk_id: int,
        worker_id: str | None = None,
        *,
        lease: timedelta | float | None = None,
        task_id: str | None = None,
    ) -> JobChunk:
        """Claims one given pending chunk; InvalidTransition if it is not pending."""
        params = {
            "chunk_id": chunk_id,
            "worker_id": worker_id or default_worker_id(),
            "lease": interval(lease),
            "task_id": task_id,
        }
        rows = fetch(self.conn, q.CLAIM_CHUNK, params, record_row(JobChunk))
        return rows[0]

    def heartbeat(
        self,
        chunk_id: int,
        attempt: int | None,
        *,
        lease: timedelta | float | None = None,
        task_id: str | None = None,
        lease_token: UUID | None = None,
    ) -> JobChunk:
        """Extends the lease of a chunk this caller holds; LeaseLost if it does not any more."""
        params = {
            "chunk_id": chunk_id,
            "attempt": attempt,
            "lease": interval(lease),
            "task_id": task_id,
            "lease_token": lease_token,
        }
        rows = fetch(self.conn, q.HEARTBEAT_CHUNK, params, record_row(JobChunk))
        return rows[0]

    def heartbeat_many(
        self,
        held: Iterable[Lease | tuple[int, int]],
        *,
        lease: timedelta | float | None = None,
        checkpoints: Mapping[int, tuple[int, Any]] | None = None,
    ) -> list[LeaseState]:
        """Extends the leases of held chunks (``chunk.lease`` of each) in one call; lost ones come back
        ``held=False``. ``checkpoints`` maps a chunk id to (last image done, state) to record with it."""
        leases = list(held)
        params: dict[str, Any] = {**lease_arrays(leases), "lease": interval(lease), "positions": None, "states": None}
        if checkpoints:
            marks = [checkpoints.get(lease[0]) for lease in leases]
            params["positions"] = [None if mark is None else mark[0] for mark in marks]
            params["states"] = [None if mark is None or mark[1] is None else Jsonb(mark[1]) for mark in marks]
        return fetch(self.conn, q.HEARTBEAT_CHUNKS, params, record_row(LeaseState))

    def checkpoint(
        self,
        chunk_id: int,
        attempt: int | None,
        position: int,
        state: Any = None,
        *,
        lease_token: UUID | None = None,
        lease: timedelta | float | None = None,
    ) -> JobChunk:
        """Records how far the handler got in a chunk this caller holds (``position``: the last image done, and a
        little JSON ``state``); a retry of the chunk resumes after it. Also extends the lease."""
        params = {
            "chunk_id": chunk_id,
            "attempt": attempt,
            "position": position,
            "state": None if state is None else Jsonb(state),
            "lease_token": lease_token,
            "lease": interval(lease),
        }
        return (fetch(self.conn, q.CHECKPOINT_CHUNK, params, record_row(JobChunk)))[0]

    def complete(self, chunk_id: int, attempt: int | None, lease_token: UUID | None = None) -> ChunkOutcome:
        """Marks the chunk completed. Without the attempt and lease token the claim returned, only an operator
        (chunkq_app) may complete it: the checks are skipped."""
        params = {"chunk_id": chunk_id, "attempt": attempt, "lease_token": lease_token}
        rows = fetch(self.conn, q.COMPLETE_CHUNK, params, record_row(ChunkOutcome))
        return rows[0]

    def fail(
        self,
        chunk_id: int,
        attempt: int | None,
        error: object,
        *,
        retry: bool = False,
        max_retries: int | None = None,
        lease_token: UUID | None = None,
    ) -> ChunkOutcome:
        """Records ``error``; with ``retry`` the chunk goes back to pending after a backoff while retries last.

        ``max_retries`` overrides the job's.
        """
        params = {
            "chunk_id": chunk_id,
            "attempt": attempt,
            "error": error_text(error),
            "retry": retry,
            "max_retries": max_retries,
            "lease_token": lease_token,
        }
        rows = fetch(self.conn, q.FAIL_CHUNK, params, record_row(ChunkOutcome))
        return rows[0]

    def defer(
        self,
        chunk_id: int,
        attempt: int | None,
        delay: timedelta | float,
        reason: str | None = None,
        *,
        block_key: bool = False,
        lease_token: UUID | None = None,
    ) -> ChunkOutcome:
        """Puts a held chunk back, not claimable before ``delay`` has passed, without spending a retry (a
        handler's "retry after", e.g. HTTP 429); ``block_key`` holds back its job's rate key as long."""
        params = {
            "chunk_id": chunk_id,
            "attempt": attempt,
            "delay": interval(delay),
            "reason": None if reason is None else error_text(reason),
            "block_key": block_key,
            "lease_token": lease_token,
        }
        rows = fetch(self.conn, q.DEFER_CHUNK, params, record_row(ChunkOutcome))
        return rows[0]

    def claimable_in(self, job_id: int | None = None) -> timedelta | None:
        """How long until the next chunk held back by a rate key's bucket or block may be claimed (None: none is)."""
        rows = fetch(self.conn, q.CLAIMABLE_IN, {"job_id": job_id}, dict_row)
        wait: timedelta | None = rows[0]["wait"]
        return wait

    def release(self, chunk_id: int, attempt: int, lease_token: UUID | None = None) -> JobChunk:
        """Hands a chunk this caller holds back to pending without counting a retry (shutdown)."""
        params = {"chunk_id": chunk_id, "attempt": attempt, "lease_token": lease_token}
        rows = fetch(self.conn, q.RELEASE_CHUNK, params, record_row(JobChunk))
        return rows[0]

    def retry(self, chunk_id: int) -> JobChunk:
        """Puts a failed chunk back to pending with retry_count + 1."""
        rows = fetch(self.conn, q.RETRY_CHUNK, {"chunk_id": chunk_id}, record_row(JobChunk))
        return rows[0]

    def retry_failed(self, job_id: int) -> int:
        """Puts every failed chunk of the job back to pending; returns how many."""
        rows = fetch(self.conn, q.RETRY_FAILED_CHUNKS, {"job_id": job_id}, dict_row)
        return int(rows[0]["retried"])

    def stats(self) -> QueueStats:
        """The health of the whole queue (chunkq.queue_stats)."""
        rows = fetch(self.conn, q.QUEUE_STATS, {}, record_row(QueueStats))
        return rows[0]

    def depth(self) -> list[QueueDepth]:
        """Pending chunks by priority, highest first (chunkq.queue_depth)."""
        return fetch(self.conn, q.QUEUE_DEPTH, {}, record_row(QueueDepth))

    def expired_leases(self) -> list[ExpiredLease]:
        """Processing chunks whose worker stopped heartbeating (chunkq.expired_leases)."""
        return fetch(self.conn, q.EXPIRED_LEASES, {}, record_row(ExpiredLease))

    def live_workers(self) -> list[LiveWorker]:
        """Connected workers and the chunks they hold (chunkq.live_workers)."""
        return fetch(self.conn, q.LIVE_WORKERS, {}, record_row(LiveWorker))

    def failure_summary(self) -> list[FailureKind]:
        """Errors grouped by kind, most frequent first (chunkq.failure_summary)."""
        return fetch(self.conn, q.FAILURE_SUMMARY, {}, record_row(FailureKind))

    def reclaim_expired(self, limit: int = 100) -> int:
        """Puts back chunks whose lease expired; claims do this themselves. Returns how many."""
        rows = fetch(self.conn, q.RECLAIM_EXPIRED_CHUNKS, {"limit": limit}, dict_row)
        return int(rows[0]["reclaimed"])


class RateLimitRepository:
    """Limits of rate keys (chunkq.rate_limits): a token bucket and a cap on running chunks, across every job
    that names the key in its ``rate_key``."""

    def __init__(self, conn: Connectable) -> None:
        self.conn = conn

    def set(
        self, key: str, *, rate: float | None = None, burst: int | None = None, max_running: int | None = None
    ) -> RateLimitState:
        """Sets the key's limits: ``rate`` chunks per second in bursts of ``burst`` (default: the rate rounded
        up), ``max_running`` at once; None: no such limit."""
        params = {"key": key, "rate": rate, "burst": burst, "max_running": max_running}
        fetch(self.conn, q.SET_RATE_LIMIT, params, dict_row)
        return (fetch(self.conn, q.RATE_LIMIT_OF, {"key": key}, record_row(RateLimitState)))[0]

    def delete(self, key: str) -> None:
        """Removes the key's limits; RateKeyNotFound if it has none."""
        fetch(self.conn, q.DELETE_RATE_LIMIT, {"key": key}, dict_row)

    def overview(self) -> list[RateLimitState]:
        """Every key with limits, its bucket, running chunks and what holds it back (chunkq.rate_limit_state)."""
        return fetch(self.conn, q.RATE_LIMIT_STATE, {}, record_row(RateLimitState))
