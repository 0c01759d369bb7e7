"""The statement catalogue: every statement the client sends, each one call of a chunkq SQL function.

Parameters are cast to the functions' argument types so that a value Postgres
cannot hold (say, an integer beyond bigint) is reported as bad input instead of
"function does not exist". Select lists come from the record fields, so a column
added by a later migration does not break an older client.
"""

from __future__ import annotations

from .records import (
    ChunkError,
    ChunkOutcome,
    CrawlJob,
    ExpiredLease,
    FailureKind,
    JobBlocker,
    JobChunk,
    JobErrorSummary,
    JobOverview,
    JobProgress,
    LeaseState,
    LiveWorker,
    MetricSample,
    PruneResult,
    QueueDepth,
    QueueStats,
    RateLimitState,
    columns,
)

JOB = columns(CrawlJob)
CHUNK = columns(JobChunk)

CREATE_JOB = (
    f"SELECT {JOB} FROM chunkq.create_job(%(project_id)s::bigint, %(name)s::text, %(keywords)s::jsonb,"
    " %(max_images)s::bigint, %(priority)s::integer, %(max_retries)s::integer, %(chunk_size)s::integer,"
    " %(id)s::bigint, %(retry_base_delay)s::interval, %(max_running)s::integer, %(rate_key)s::text,"
    " %(weight)s::double precision, %(max_failed_ratio)s::double precision, %(max_failed_chunks)s::integer,"
    " %(max_consecutive_failures)s::integer)"
)
SET_JOB_LIMITS = f"SELECT {JOB} FROM chunkq.set_job_limits(%(job_id)s::bigint, %(limits)s::jsonb)"
SET_RATE_LIMIT = (
    "SELECT key FROM chunkq.set_rate_limit(%(key)s::text, %(rate)s::double precision, %(burst)s::integer,"
    " %(max_running)s::integer)"
)
DELETE_RATE_LIMIT = "SELECT key FROM chunkq.delete_rate_limit(%(key)s::text)"
RATE_LIMIT_STATE = f"SELECT {columns(RateLimitState)} FROM chunkq.rate_limit_state ORDER BY key"
RATE_LIMIT_OF = f"SELECT {columns(RateLimitState)} FROM chunkq.rate_limit_state WHERE key = %(key)s::text"
GET_JOB = f"SELECT {JOB} FROM chunkq.get_job(%(job_id)s::bigint)"
CANCEL_JOB = f"SELECT {JOB} FROM chunkq.cancel_job(%(job_id)s::bigint)"
JOB_PROGRESS = f"SELECT {columns(JobProgress)} FROM chunkq.job_progress(%(job_id)s::bigint)"
LIST_JOBS = f"SELECT {columns(JobOverview)} FROM chunkq.list_jobs(%(status)s::chunkq.job_status, %(limit)s::integer)"
DELETE_JOB = f"SELECT {JOB} FROM chunkq.delete_job(%(job_id)s::bigint)"
JOB_ERROR_SUMMARY = f"SELECT {columns(JobErrorSummary)} FROM chunkq.job_error_summary(%(job_id)s::bigint)"
QUEUE_STATS = f"SELECT {columns(QueueStats)} FROM chunkq.queue_stats()"
QUEUE_DEPTH = f"SELECT {columns(QueueDepth)} FROM chunkq.queue_depth ORDER BY priority DESC"
PAUSE_JOB = f"SELECT {JOB} FROM chunkq.pause_job(%(job_id)s::bigint)"
RESUME_JOB = f"SELECT {JOB} FROM chunkq.resume_job(%(job_id)s::bigint)"
SET_JOB_PRIORITY = f"SELECT {JOB} FROM chunkq.set_job_priority(%(job_id)s::bigint, %(priority)s::integer)"
PRUNE_FINISHED_JOBS = (
    f"SELECT {columns(PruneResult)} FROM chunkq.prune_finished_jobs(%(older_than)s::interval, %(max_chunks)s::integer)"
)
EXPIRED_LEASES = f"SELECT {columns(ExpiredLease)} FROM chunkq.expired_leases ORDER BY lease_expires_at"
LIVE_WORKERS = f"SELECT {columns(LiveWorker)} FROM chunkq.live_workers ORDER BY worker_id"
SEARCH_JOBS = (
    f"SELECT {columns(JobOverview)} FROM chunkq.search_jobs(%(status)s::chunkq.job_status, %(name)s::text,"
    " %(limit)s::integer, %(offset)s::integer)"
)
COUNT_JOBS = "SELECT chunkq.count_jobs(%(status)s::chunkq.job_status, %(name)s::text) AS jobs"
GET_JOB_OVERVIEW = f"SELECT {columns(JobOverview)} FROM chunkq.get_job_overview(%(job_id)s::bigint)"
JOB_FAILURE_SUMMARY = (
    f"SELECT {columns(FailureKind)} FROM chunkq.job_failure_summary(%(job_id)s::bigint, %(limit)s::integer)"
)
JOB_BLOCKERS = f"SELECT {columns(JobBlocker)} FROM chunkq.job_blockers(%(job_id)s::bigint)"
METRICS_SNAPSHOT = f"SELECT {columns(MetricSample)} FROM chunkq.metrics_snapshot(%(top_jobs)s::integer)"
FAILURE_SUMMARY = f"SELECT {columns(FailureKind)} FROM chunkq.failure_summary ORDER BY occurrences DESC, error_kind"

CREATE_CHUNKS = (
    f"SELECT {JOB} FROM chunkq.create_chunks(%(job_id)s::bigint, %(max_images)s::bigint,"
    " %(priority)s::integer, %(chunk_size)s::integer)"
)
GET_CHUNK = f"SELECT {CHUNK} FROM chunkq.get_chunk(%(chunk_id)s::bigint)"
LIST_CHUNKS = (
    f"SELECT {CHUNK} FROM chunkq.list_chunks(%(job_id)s::bigint, %(status)s::chunkq.chunk_status, %(limit)s::integer)"
)
FAILED_CHUNKS = f"SELECT {CHUNK} FROM chunkq.failed_chunks(%(job_id)s::bigint)"
CHUNK_ERROR_HISTORY = f"SELECT {columns(ChunkError)} FROM chunkq.chunk_error_history(%(chunk_id)s::bigint)"

CLAIM_CHUNKS = (
    f"SELECT {CHUNK} FROM chunkq.claim_chunks(%(worker_id)s::text, %(limit)s::integer,"
    " %(job_id)s::bigint, %(lease)s::interval)"
)
COMPLETE_AND_CLAIM = (
    f"SELECT {CHUNK} FROM chunkq.complete_and_claim(%(chunk_ids)s::bigint[], %(attempts)s::integer[],"
    " %(worker_id)s::text, %(limit)s::integer, %(job_id)s::bigint, %(lease)s::interval, %(lease_tokens)s::uuid[])"
)
CLAIM_CHUNK = (
    f"SELECT {CHUNK} FROM chunkq.claim_chunk(%(chunk_id)s::bigint, %(worker_id)s::text,"
    " %(lease)s::interval, %(task_id)s::text)"
)
HEARTBEAT_CHUNK = (
    f"SELECT {CHUNK} FROM chunkq.heartbeat_chunk(%(chunk_id)s::bigint, %(attempt)s::integer,"
    " %(lease)s::interval, %(task_id)s::text, %(lease_token)s::uuid)"
)
COMPLETE_CHUNK = (
    f"SELECT {columns(ChunkOutcome)} FROM chunkq.complete_chunk(%(chunk_id)s::bigint, %(attempt)s::integer,"
    " %(lease_token)s::uuid)"
)
HEARTBEAT_CHUNKS = (
    f"SELECT {columns(LeaseState)} FROM chunkq.heartbeat_chunks(%(chunk_ids)s::bigint[], %(attempts)s::integer[],"
    " %(lease)s::interval, %(lease_tokens)s::uuid[], %(positions)s::bigint[], %(states)s::jsonb[])"
)
CHECKPOINT_CHUNK = (
    f"SELECT {CHUNK} FROM chunkq.checkpoint_chunk(%(chunk_id)s::bigint, %(attempt)s::integer, %(position)s::bigint,"
    " %(state)s::jsonb, %(lease_token)s::uuid, %(lease)s::interval)"
)
FAIL_CHUNK = (
    f"SELECT {columns(ChunkOutcome)} FROM chunkq.fail_chunk(%(chunk_id)s::bigint, %(attempt)s::integer,"
    " %(error)s::text, %(retry)s::boolean, %(max_retries)s::integer, %(lease_token)s::uuid)"
)
DEFER_CHUNK = (
    f"SELECT {columns(ChunkOutcome)} FROM chunkq.defer_chunk(%(chunk_id)s::bigint, %(attempt)s::integer,"
    " %(delay)s::interval, %(reason)s::text, %(block_key)s::boolean, %(lease_token)s::uuid)"
)
CLAIMABLE_IN = "SELECT chunkq.claimable_in(%(job_id)s::bigint) AS wait"
RELEASE_CHUNK = (
    f"SELECT {CHUNK} FROM chunkq.release_chunk(%(chunk_id)s::bigint, %(attempt)s::integer, %(lease_token)s::uuid)"
)
RETRY_CHUNK = f"SELECT {CHUNK} FROM chunkq.retry_chunk(%(chunk_id)s::bigint)"
RETRY_FAILED_CHUNKS = "SELECT chunkq.retry_failed_chunks(%(job_id)s::bigint) AS retried"
RECLAIM_EXPIRED_CHUNKS = "SELECT chunkq.reclaim_expired_chunks(%(limit)s::integer) AS reclaimed"

SCHEMA_VERSION = "SELECT chunkq.schema_version() AS version"
