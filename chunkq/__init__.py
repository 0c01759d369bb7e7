"""chunkq: a Postgres-native job-chunk queue.

The async, seed-compatible client is imported from here; the sync twin, for
worker processes, from ``chunkq.sync``. Both are thin: every method is one call
of a SQL function in the ``chunkq`` schema.
"""

from ._async.repositories import CrawlJobRepository, JobChunkRepository, RateLimitRepository
from ._async.service import JobChunkingService
from .errors import (
    ChunkCancelled,
    ChunkNotFound,
    ChunkqError,
    InvalidTransition,
    JobAlreadyChunked,
    JobNotFound,
    LeaseLost,
    MigrationError,
    NotFound,
    PermissionDenied,
    RateKeyNotFound,
    SchemaNotMigrated,
    Throttled,
    ValidationError,
)
from .records import (
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
    LeaseState,
    LiveWorker,
    PruneResult,
    QueueDepth,
    QueueStats,
    RateLimitState,
)
from .schema import SCHEMA_VERSION, check_schema, migrate, rollback

__all__ = [
    "SCHEMA_VERSION",
    "ChunkCancelled",
    "ChunkError",
    "ChunkNotFound",
    "ChunkOutcome",
    "ChunkStatus",
    "ChunkqError",
    "CrawlJob",
    "CrawlJobRepository",
    "ExpiredLease",
    "FailureKind",
    "InvalidTransition",
    "JobAlreadyChunked",
    "JobChunk",
    "JobChunkRepository",
    "JobChunkingService",
    "JobErrorSummary",
    "JobNotFound",
    "JobOverview",
    "JobProgress",
    "JobStatus",
    "LeaseLost",
    "LeaseState",
    "LiveWorker",
    "MigrationError",
    "NotFound",
    "PermissionDenied",
    "PruneResult",
    "RateKeyNotFound",
    "RateLimitRepository",
    "RateLimitState",
    "QueueDepth",
    "QueueStats",
    "SchemaNotMigrated",
    "Throttled",
    "ValidationError",
    "check_schema",
    "migrate",
    "rollback",
]
