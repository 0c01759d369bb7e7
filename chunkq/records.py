"""Immutable records of what the SQL functions return; field names are the column names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple, TypedDict, TypeVar
from uuid import UUID

from psycopg.rows import BaseRowFactory, args_row

R = TypeVar("R")


class ChunkStatus(StrEnum):
    """chunkq.chunk_status; members compare equal to their names as strings."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobStatus(StrEnum):
    """chunkq.job_status."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _coerce(record: Any, name: str, enum: type[StrEnum]) -> None:
    # Rows arrive with enums as plain strings; frozen dataclasses need object.__setattr__. The
    # lookup in the enum's own map is several times cheaper than calling the enum (once per chunk).
    value = getattr(record, name)
    if value is not None and type(value) is not enum:
        object.__setattr__(record, name, enum._value2member_map_.get(value) or enum(value))


@dataclass(frozen=True, slots=True)
class CrawlJob:
    """A row of chunkq.crawl_jobs."""

    id: int
    project_id: int
    name: str
    keywords: Any
    max_images: int
    chunk_size: int
    priority: int
    max_retries: int
    status: JobStatus
    total_chunks: int
    created_at: datetime
    chunked_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    paused_at: datetime | None
    retry_base_delay: timedelta | None  # the job's own retry back-off; None: settings.retry_base_delay
    weight: float  # share of claims among the jobs of its priority
    max_running: int | None  # cap on its running chunks
    rate_key: str | None  # whose chunkq.rate_limits apply
    max_failed_ratio: float | None  # failure budget: pauses past this share of failed chunks
    max_failed_chunks: int | None  # failure budget: pauses past this many failed chunks
    max_consecutive_failures: int | None  # failure budget: pauses after this many failures in a row
    paused_reason: str | None  # why it is paused: by an operator, or its failure budget

    def __post_init__(self) -> None:
        _coerce(self, "status", JobStatus)


class Lease(NamedTuple):
    """A claim, as its reports present it: the attempt fences off a stale worker (one whose lease lapsed
    and whose chunk was claimed again); the lease token, drawn at random by the claim and given only to
    the claimer, proves the report comes from the worker that holds the chunk."""

    chunk_id: int
    attempt: int | None  # None: no claim (an operator's report, chunkq_app only)
    lease_token: UUID | None = None


class ImageRange:
    """What a chunk covers, for anything with ``image_start`` and ``image_end`` (both inclusive): the
    client's JobChunk and the pool's ChunkTask alike."""

    __slots__ = ()
    image_start: int
    image_end: int

    @property
    def image_range(self) -> dict[str, int]:
        """The seed's shape: ``{'start': first image, 'end': last image}``, both inclusive."""
        return {"start": self.image_start, "end": self.image_end}

    @property
    def image_count(self) -> int:
        return self.image_end - self.image_start + 1


@dataclass(frozen=True, slots=True)
class JobChunk(ImageRange):
    """A row of chunkq.job_chunks: images image_start..image_end (inclusive) of a job."""

    id: int
    job_id: int
    chunk_index: int
    image_start: int
    image_end: int
    status: ChunkStatus
    priority: int
    attempt: int
    retry_count: int
    worker_id: str | None
    task_id: str | None
    lease_expires_at: datetime | None
    available_at: datetime
    error_message: str | None
    created_at: datetime
    claimed_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    lease_token: UUID | None  # only in what a claim returns: the claimer's proof of holding the chunk
    checkpoint_position: int | None  # the last image a handler reported done; the next attempt resumes after it
    checkpoint_state: Any  # the handler's own JSON saved with the checkpoint
    checkpoint_at: datetime | None

    def __post_init__(self) -> None:
        _coerce(self, "status", ChunkStatus)

    @property
    def resume_from(self) -> int:
        """The first image still to do: after the checkpoint, if an earlier attempt left one."""
        return self.image_start if self.checkpoint_position is None else self.checkpoint_position + 1

    @property
    def lease(self) -> Lease:
        """What a report on this claimed chunk presents: its id, attempt and lease token."""
        return Lease(self.id, self.attempt, self.lease_token)


@dataclass(frozen=True, slots=True)
class ChunkOutcome:
    """What complete_chunk / fail_chunk did (chunkq.chunk_outcome)."""

    chunk_id: int
    job_id: int
    chunk_status: ChunkStatus
    attempt: int
    retry_count: int
    available_at: datetime
    job_status: JobStatus
    job_finished: bool  # true for the one call that finished the job

    def __post_init__(self) -> None:
        _coerce(self, "chunk_status", ChunkStatus)
        _coerce(self, "job_status", JobStatus)


class ProgressDict(TypedDict):
    """get_job_chunk_progress's result, the seed's shape plus job_id, status and cancelled_chunks."""

    job_id: int
    status: str
    total_chunks: int
    pending_chunks: int
    processing_chunks: int
    completed_chunks: int
    failed_chunks: int
    cancelled_chunks: int
    completion_percentage: float
    is_complete: bool
    images_completed: int


@dataclass(frozen=True, slots=True)
class JobProgress:
    """chunkq.job_progress: chunk counts of one job."""

    job_id: int
    status: JobStatus
    total_chunks: int
    pending_chunks: int
    processing_chunks: int
    completed_chunks: int
    failed_chunks: int
    cancelled_chunks: int
    completion_percentage: float  # completed / total * 100
    is_complete: bool  # has chunks, none pending or processing
    max_images: int
    completed_images: int
    retrying_chunks: int  # pending chunks waiting out a retry back-off
    next_retry_at: datetime | None  # when the first of them may be claimed again
    images_completed: int  # images of completed chunks plus those checkpointed in unfinished ones

    def __post_init__(self) -> None:
        _coerce(self, "status", JobStatus)

    def as_dict(self) -> ProgressDict:
        return ProgressDict(
            job_id=self.job_id,
            status=str(self.status),
            total_chunks=self.total_chunks,
            pending_chunks=self.pending_chunks,
            processing_chunks=self.processing_chunks,
            completed_chunks=self.completed_chunks,
            failed_chunks=self.failed_chunks,
            cancelled_chunks=self.cancelled_chunks,
            completion_percentage=self.completion_percentage,
            is_complete=self.is_complete,
            images_completed=self.images_completed,
        )


@dataclass(frozen=True, slots=True)
class ChunkError:
    """A row of chunkq.chunk_errors: one failed or abandoned attempt."""

    id: int
    chunk_id: int
    job_id: int
    attempt: int
    worker_id: str | None
    error: str
    lease_expired: bool
    retried: bool
    failed_at: datetime
    deferred: bool  # put back on purpose ("retry after"): no failure, no retry spent


@dataclass(frozen=True, slots=True)
class LeaseState:
    """One chunk of a heartbeat_chunks call (chunkq.lease_state)."""

    chunk_id: int
    held: bool  # still ours, lease extended
    status: ChunkStatus | None  # what became of it otherwise (None: the chunk was deleted)
    lease_expires_at: datetime | None

    def __post_init__(self) -> None:
        _coerce(self, "status", ChunkStatus)


@dataclass(frozen=True, slots=True)
class JobOverview:
    """A row of chunkq.job_overview: a job with its chunk counts."""

    id: int
    project_id: int
    name: str
    status: JobStatus
    priority: int
    total_chunks: int
    pending_chunks: int
    processing_chunks: int
    completed_chunks: int
    failed_chunks: int
    cancelled_chunks: int
    completion_percentage: float
    max_images: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    paused_at: datetime | None
    completed_images: int
    chunks_per_second: float | None  # completions over the last one to two minutes
    eta: timedelta | None
    weight: float
    max_running: int | None
    rate_key: str | None
    paused_reason: str | None
    retrying_chunks: int  # pending chunks waiting out a retry back-off
    held_back: str | None  # why its waiting chunks are not claimed (paused, capped, rate key, retry); None: nothing

    def __post_init__(self) -> None:
        _coerce(self, "status", JobStatus)


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """A row of chunkq.rate_limit_state: a rate key's limits, bucket and running chunks."""

    key: str
    rate: float | None  # chunks per second at most
    burst: int | None
    tokens: float | None  # in the bucket now
    max_running: int | None
    running_chunks: int
    pending_chunks: int
    jobs: int
    blocked_until: datetime | None
    blocked_reason: str | None
    held_back: str | None  # blocked, capped or rate-limited; None: nothing holds it back


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """A row of chunkq.queue_depth: pending chunks of one priority."""

    priority: int
    pending_chunks: int
    claimable_chunks: int  # may be claimed now (limited_chunks among them, as their limits allow)
    oldest_pending_age: timedelta
    paused_chunks: int = 0  # of paused jobs
    retrying_chunks: int = 0  # waiting out a retry back-off or a retry-after
    limited_chunks: int = 0  # of jobs with a cap or a limited rate key


@dataclass(frozen=True, slots=True)
class QueueStats:
    """chunkq.queue_stats(): the health of the whole queue."""

    jobs_pending: int
    jobs_running: int
    pending_chunks: int
    processing_chunks: int
    expired_leases: int
    completed_chunks: int
    failed_chunks: int
    failure_rate: float | None
    errors_last_hour: int
    oldest_pending_age: timedelta | None
    dead_chunk_rows: int | None
    last_autovacuum: datetime | None
    autovacuum_on: bool
    oldest_transaction_age: timedelta | None  # the xmin horizon: dead rows newer than this stay
    oldest_transaction_pid: int | None


@dataclass(frozen=True, slots=True)
class JobErrorSummary:
    """chunkq.job_error_summary(): the errors recorded for one job's chunks."""

    job_id: int
    errors: int
    retried: int
    lease_expired: int
    last_error: str | None
    last_failed_at: datetime | None


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What one chunkq.prune_finished_jobs call deleted; ``done`` when nothing old enough is left."""

    jobs_deleted: int
    chunks_deleted: int
    done: bool


@dataclass(frozen=True, slots=True)
class ExpiredLease:
    """A row of chunkq.expired_leases."""

    chunk_id: int
    job_id: int
    chunk_index: int
    worker_id: str | None
    attempt: int
    claimed_at: datetime | None
    heartbeat_at: datetime | None
    lease_expires_at: datetime
    expired_for: timedelta


@dataclass(frozen=True, slots=True)
class LiveWorker:
    """A row of chunkq.live_workers."""

    worker_id: str
    backend_pid: int | None
    connected_since: datetime | None
    chunks_held: int
    oldest_claim: datetime | None
    heartbeat_age: timedelta | None
    next_lease_expiry: datetime | None


@dataclass(frozen=True, slots=True)
class FailureKind:
    """A row of chunkq.failure_summary."""

    error_kind: str
    occurrences: int
    chunks: int
    jobs: int
    ended_failed: int
    first_seen: datetime
    last_seen: datetime
    example_chunk_id: int
    example_error: str


@dataclass(frozen=True, slots=True)
class MetricSample:
    """A row of chunkq.metrics_snapshot(): one sample of a gauge."""

    metric: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class JobBlocker:
    """A row of chunkq.job_blockers(): one reason a job is not moving."""

    reason: str  # finished, not_chunked, paused, waiting_for_retry, behind_higher_priority, no_workers, ...
    detail: str


def columns(record: type[Any]) -> str:
    """The select list for a record: its field names, in order."""
    return ", ".join(field.name for field in dataclasses.fields(record))


def record_row(record: type[R]) -> BaseRowFactory[R]:
    """Rows of a ``SELECT columns(record)`` as records, field by position: a third cheaper than
    psycopg's class_row, which builds a dict of keyword arguments for every row."""
    return args_row(record)
