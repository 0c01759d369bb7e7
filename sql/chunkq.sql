-- chunkq: the schema as migrations/ leave it.
--
-- Generated from migrations/ by tools/dump_schema.py: do not edit. `./dev gen` regenerates it, and
-- tests/migrations/test_schema_dump.py fails when it is stale, so the diff of a migration shows here what it
-- changes in the API. It is for reading, not for running: the migrations create the schema.
--
-- In order: the schema, the roles it grants to, types, tables (each with its indexes and triggers), views,
-- functions; by name within each kind. Every object comes with its comments and its grants to roles and
-- PUBLIC (the owner's own privileges are left out: they depend on who ran the migrations).

-- ---------------------------------------------------------------------------
-- Schema
-- ---------------------------------------------------------------------------

CREATE SCHEMA chunkq;
COMMENT ON SCHEMA chunkq IS
    'chunkq: a job-chunk queue. Crawl jobs are split into chunks of images that worker processes claim, heartbeat '
    'and complete through the functions in this schema; \df chunkq.* lists the whole API.';
GRANT USAGE ON SCHEMA chunkq TO chunkq_reader;
GRANT USAGE ON SCHEMA chunkq TO chunkq_worker;

-- ---------------------------------------------------------------------------
-- Roles (cluster-wide: those the schema grants to, and their memberships among themselves)
-- ---------------------------------------------------------------------------

CREATE ROLE chunkq_app;
COMMENT ON ROLE chunkq_app IS 'chunkq: chunkq_reader and chunkq_worker, plus creating and managing jobs.';
GRANT chunkq_reader TO chunkq_app;
GRANT chunkq_worker TO chunkq_app;

CREATE ROLE chunkq_reader;
COMMENT ON ROLE chunkq_reader IS 'chunkq: may read the queue''s views and read-only functions, nothing else.';

CREATE ROLE chunkq_worker;
COMMENT ON ROLE chunkq_worker IS 'chunkq: may claim chunks and report on the chunks it holds, nothing else.';

-- ---------------------------------------------------------------------------
-- Types
-- ---------------------------------------------------------------------------

CREATE TYPE chunkq.chunk_status AS ENUM ('pending', 'processing', 'completed', 'failed', 'cancelled');
COMMENT ON TYPE chunkq.chunk_status IS
    'Life of a chunk: pending (claimable once available_at has passed) -> processing (leased to one worker) -> '
    'completed | failed | cancelled. A failed chunk returns to pending through retry_chunk.';
GRANT USAGE ON TYPE chunkq.chunk_status TO PUBLIC;

CREATE TYPE chunkq.job_status AS ENUM ('pending', 'running', 'completed', 'failed', 'cancelled');
COMMENT ON TYPE chunkq.job_status IS
    'Life of a crawl job, driven by its chunks: pending until a chunk is first claimed, running, then completed '
    '(every chunk completed) or failed (some chunk failed) once no chunk is pending or processing; cancelled by '
    'cancel_job. Retrying a failed chunk of a finished job makes it running again.';
GRANT USAGE ON TYPE chunkq.job_status TO PUBLIC;

CREATE TYPE chunkq._chunk_move AS (
    job_id bigint,
    chunk_index integer,
    from_status chunkq.chunk_status,
    to_status chunkq.chunk_status
);
COMMENT ON TYPE chunkq._chunk_move IS 'Internal: one chunk''s change of status, as booked by _apply_chunk_moves.';
GRANT USAGE ON TYPE chunkq._chunk_move TO PUBLIC;

CREATE TYPE chunkq.chunk_outcome AS (
    chunk_id bigint,
    job_id bigint,
    chunk_status chunkq.chunk_status,
    attempt integer,
    retry_count integer,
    available_at timestamp with time zone,
    job_status chunkq.job_status,
    job_finished boolean
);
COMMENT ON TYPE chunkq.chunk_outcome IS
    'What complete_chunk and fail_chunk did: the chunk''s new status, its job''s status, and job_finished = true for '
    'the one call that finished the job.';
GRANT USAGE ON TYPE chunkq.chunk_outcome TO PUBLIC;

CREATE TYPE chunkq.job_blocker AS (
    reason text,
    detail text
);
COMMENT ON TYPE chunkq.job_blocker IS
    'Why a job is not moving: a reason code (finished, not_chunked, paused, capped, rate_limited, '
    'waiting_for_retry, behind_higher_priority, no_workers) and a sentence about this job. See job_blockers().';
GRANT USAGE ON TYPE chunkq.job_blocker TO PUBLIC;

CREATE TYPE chunkq.job_error_summary AS (
    job_id bigint,
    errors bigint,
    retried bigint,
    lease_expired bigint,
    last_error text,
    last_failed_at timestamp with time zone
);
COMMENT ON TYPE chunkq.job_error_summary IS
    'The errors recorded for one job''s chunks: how many, how many were retried, how many were abandoned attempts '
    '(lease expired), and the latest.';
GRANT USAGE ON TYPE chunkq.job_error_summary TO PUBLIC;

CREATE TYPE chunkq.job_progress AS (
    job_id bigint,
    status chunkq.job_status,
    total_chunks integer,
    pending_chunks integer,
    processing_chunks integer,
    completed_chunks integer,
    failed_chunks integer,
    cancelled_chunks integer,
    completion_percentage double precision,
    is_complete boolean,
    max_images bigint,
    completed_images bigint,
    retrying_chunks integer,
    next_retry_at timestamp with time zone,
    images_completed bigint
);
COMMENT ON TYPE chunkq.job_progress IS
    'Progress of one job. completion_percentage = completed / total * 100; is_complete = the job has chunks and '
    'none is pending or processing; completed_images counts the images of completed chunks, images_completed also '
    'the images checkpointed in unfinished ones; retrying_chunks are pending chunks waiting out a retry back-off, '
    'the next of them due at next_retry_at.';
GRANT USAGE ON TYPE chunkq.job_progress TO PUBLIC;

CREATE TYPE chunkq.lease_state AS (
    chunk_id bigint,
    held boolean,
    status chunkq.chunk_status,
    lease_expires_at timestamp with time zone
);
COMMENT ON TYPE chunkq.lease_state IS
    'One chunk of a heartbeat_chunks call: held = the caller still holds it and its lease was extended; otherwise '
    'status says what became of it (cancelled, or processing/pending under a newer attempt).';
GRANT USAGE ON TYPE chunkq.lease_state TO PUBLIC;

CREATE TYPE chunkq.metric_sample AS (
    metric text,
    labels jsonb,
    value double precision
);
COMMENT ON TYPE chunkq.metric_sample IS
    'One sample of a gauge, as Prometheus exposes it: the metric name, its labels as a JSON object of strings, the '
    'value. See metrics_snapshot().';
GRANT USAGE ON TYPE chunkq.metric_sample TO PUBLIC;

CREATE TYPE chunkq.prune_result AS (
    jobs_deleted integer,
    chunks_deleted integer,
    done boolean
);
COMMENT ON TYPE chunkq.prune_result IS
    'What one prune_finished_jobs call deleted, and done = true when nothing old enough is left.';
GRANT USAGE ON TYPE chunkq.prune_result TO PUBLIC;

CREATE TYPE chunkq.queue_stats AS (
    jobs_pending bigint,
    jobs_running bigint,
    pending_chunks bigint,
    processing_chunks bigint,
    expired_leases bigint,
    completed_chunks bigint,
    failed_chunks bigint,
    failure_rate double precision,
    errors_last_hour bigint,
    oldest_pending_age interval,
    dead_chunk_rows bigint,
    last_autovacuum timestamp with time zone,
    autovacuum_on boolean,
    oldest_transaction_age interval,
    oldest_transaction_pid integer
);
COMMENT ON TYPE chunkq.queue_stats IS
    'Health of the whole queue, see queue_stats(). failure_rate = failed / (completed + failed) chunks; '
    'expired_leases counts processing chunks whose worker stopped heartbeating and that no claim has reclaimed yet '
    '(non-zero for long means no worker is claiming); dead_chunk_rows and last_autovacuum show whether vacuum '
    'keeps up; oldest_transaction_age is the oldest open transaction in this database, which holds every dead row '
    'newer than it (alert when it exceeds minutes).';
GRANT USAGE ON TYPE chunkq.queue_stats TO PUBLIC;

-- ---------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------

CREATE TABLE chunkq.chunk_errors (
    id bigint NOT NULL GENERATED ALWAYS AS IDENTITY,
    chunk_id bigint NOT NULL,
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    worker_id text,
    error text NOT NULL,
    lease_expired boolean NOT NULL DEFAULT false,
    retried boolean NOT NULL,
    failed_at timestamp with time zone NOT NULL DEFAULT now(),
    deferred boolean NOT NULL DEFAULT false,
    CONSTRAINT chunk_errors_chunk_id_fkey FOREIGN KEY (chunk_id) REFERENCES chunkq.job_chunks(id) ON DELETE CASCADE,
    CONSTRAINT chunk_errors_pkey PRIMARY KEY (id)
);
COMMENT ON TABLE chunkq.chunk_errors IS 'Every error recorded for a chunk, one row per failed or abandoned attempt.';
COMMENT ON COLUMN chunkq.chunk_errors.id IS 'Error id, in the order errors were recorded.';
COMMENT ON COLUMN chunkq.chunk_errors.chunk_id IS 'The chunk.';
COMMENT ON COLUMN chunkq.chunk_errors.job_id IS 'The chunk''s job, for grouping errors by job.';
COMMENT ON COLUMN chunkq.chunk_errors.attempt IS 'The attempt that failed (job_chunks.attempt at the time).';
COMMENT ON COLUMN chunkq.chunk_errors.worker_id IS 'Who held the attempt.';
COMMENT ON COLUMN chunkq.chunk_errors.error IS 'What went wrong, cut to settings.max_error_length.';
COMMENT ON COLUMN chunkq.chunk_errors.lease_expired IS
    'True when the attempt was abandoned (its lease expired and it was reclaimed) rather than reported as failed.';
COMMENT ON COLUMN chunkq.chunk_errors.retried IS 'Whether the chunk was put back to pending after this error.';
COMMENT ON COLUMN chunkq.chunk_errors.failed_at IS 'When the error was recorded.';
COMMENT ON COLUMN chunkq.chunk_errors.deferred IS
    'True when the attempt was put back on purpose (defer_chunk: "retry after", e.g. HTTP 429), which spends no '
    'retry and is no failure.';

CREATE INDEX chunk_errors_by_chunk ON chunkq.chunk_errors USING btree (chunk_id, attempt);
COMMENT ON INDEX chunkq.chunk_errors_by_chunk IS 'Error history of one chunk.';

CREATE INDEX chunk_errors_by_job ON chunkq.chunk_errors USING btree (job_id, failed_at);
COMMENT ON INDEX chunkq.chunk_errors_by_job IS 'A job''s errors, for job_error_summary.';

CREATE INDEX chunk_errors_by_time ON chunkq.chunk_errors USING btree (failed_at);
COMMENT ON INDEX chunkq.chunk_errors_by_time IS 'Recent errors, for queue_stats.';

CREATE TABLE chunkq.crawl_jobs (
    id bigint NOT NULL GENERATED ALWAYS AS IDENTITY,
    project_id bigint NOT NULL,
    name text NOT NULL,
    keywords jsonb NOT NULL DEFAULT '[]'::jsonb,
    max_images bigint NOT NULL,
    chunk_size integer NOT NULL,
    priority smallint NOT NULL,
    max_retries integer NOT NULL,
    status chunkq.job_status NOT NULL DEFAULT 'pending'::chunkq.job_status,
    total_chunks integer NOT NULL DEFAULT 0,
    open_slots smallint NOT NULL DEFAULT 0,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    chunked_at timestamp with time zone,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    paused_at timestamp with time zone,
    retry_base_delay interval,
    weight real NOT NULL DEFAULT 1,
    max_running integer,
    rate_key text,
    max_failed_ratio real,
    max_failed_chunks integer,
    max_consecutive_failures integer,
    limited boolean NOT NULL DEFAULT false,
    paused_reason text,
    budget_reset_at timestamp with time zone,
    CONSTRAINT crawl_jobs_chunk_count_matches CHECK (chunked_at IS NULL AND total_chunks = 0 OR chunked_at IS NOT NULL AND total_chunks = ((max_images + chunk_size - 1) / chunk_size)),
    CONSTRAINT crawl_jobs_chunk_size_positive CHECK (chunk_size > 0),
    CONSTRAINT crawl_jobs_finished_iff_final CHECK ((status = ANY (ARRAY['completed'::chunkq.job_status, 'failed'::chunkq.job_status, 'cancelled'::chunkq.job_status])) = (finished_at IS NOT NULL)),
    CONSTRAINT crawl_jobs_max_consecutive_failures_positive CHECK (max_consecutive_failures >= 1),
    CONSTRAINT crawl_jobs_max_failed_chunks_positive CHECK (max_failed_chunks >= 1),
    CONSTRAINT crawl_jobs_max_failed_ratio_in_range CHECK (max_failed_ratio > 0::double precision AND max_failed_ratio <= 1::double precision),
    CONSTRAINT crawl_jobs_max_images_positive CHECK (max_images > 0),
    CONSTRAINT crawl_jobs_max_retries_not_negative CHECK (max_retries >= 0),
    CONSTRAINT crawl_jobs_max_running_positive CHECK (max_running >= 1),
    CONSTRAINT crawl_jobs_name_not_blank CHECK (btrim(name) <> ''::text AND length(name) <= 500),
    CONSTRAINT crawl_jobs_open_slots_in_range CHECK (open_slots >= 0 AND open_slots <= LEAST(total_chunks, chunkq._counter_slots())),
    CONSTRAINT crawl_jobs_paused_only_while_open CHECK (paused_at IS NULL OR finished_at IS NULL),
    CONSTRAINT crawl_jobs_paused_reason_only_when_paused CHECK (paused_reason IS NULL OR paused_at IS NOT NULL),
    CONSTRAINT crawl_jobs_pkey PRIMARY KEY (id),
    CONSTRAINT crawl_jobs_priority_not_negative CHECK (priority >= 0),
    CONSTRAINT crawl_jobs_rate_key_valid CHECK (btrim(rate_key) <> ''::text AND length(rate_key) <= 200),
    CONSTRAINT crawl_jobs_retry_base_delay_not_negative CHECK (retry_base_delay >= '00:00:00'::interval),
    CONSTRAINT crawl_jobs_running_has_started CHECK (status <> 'running'::chunkq.job_status OR started_at IS NOT NULL),
    CONSTRAINT crawl_jobs_weight_in_range CHECK (weight > 0::double precision AND weight <= 1000::double precision)
);
COMMENT ON TABLE chunkq.crawl_jobs IS
    'A crawl job: up to max_images images to fetch, split by create_chunks into chunks of chunk_size images. Its '
    'status follows its chunks; see chunkq.job_status.';
COMMENT ON COLUMN chunkq.crawl_jobs.id IS 'Job id.';
COMMENT ON COLUMN chunkq.crawl_jobs.project_id IS
    'The application''s project this job belongs to (not checked by chunkq).';
COMMENT ON COLUMN chunkq.crawl_jobs.name IS 'Human-readable name.';
COMMENT ON COLUMN chunkq.crawl_jobs.keywords IS
    'Search keywords or any other JSON the workers need; handed to every chunk''s handler.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_images IS 'Number of images to crawl; chunks cover images 0 .. max_images-1.';
COMMENT ON COLUMN chunkq.crawl_jobs.chunk_size IS 'Images per chunk (the last chunk may be smaller).';
COMMENT ON COLUMN chunkq.crawl_jobs.priority IS
    'Priority given to the job''s chunks when they are created; higher is claimed first.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_retries IS
    'How many times a chunk that failed or was abandoned is put back automatically.';
COMMENT ON COLUMN chunkq.crawl_jobs.status IS 'See chunkq.job_status.';
COMMENT ON COLUMN chunkq.crawl_jobs.total_chunks IS 'Number of chunks, 0 until create_chunks.';
COMMENT ON COLUMN chunkq.crawl_jobs.open_slots IS
    'Internal: how many of the job''s job_chunk_counts rows still count a pending or processing chunk. The call '
    'that brings it to 0 finishes the job, exactly once.';
COMMENT ON COLUMN chunkq.crawl_jobs.created_at IS 'When the job was created.';
COMMENT ON COLUMN chunkq.crawl_jobs.chunked_at IS 'When create_chunks split the job; NULL before.';
COMMENT ON COLUMN chunkq.crawl_jobs.started_at IS 'When the first chunk was claimed.';
COMMENT ON COLUMN chunkq.crawl_jobs.finished_at IS
    'When the job completed, failed or was cancelled; NULL while it can still run.';
COMMENT ON COLUMN chunkq.crawl_jobs.paused_at IS
    'When pause_job paused the job; NULL when it runs. Its pending chunks are not claimed while it is set.';
COMMENT ON COLUMN chunkq.crawl_jobs.retry_base_delay IS
    'Wait before the first automatic retry of a failed chunk of this job, doubled per retry up to '
    'settings.retry_max_delay; NULL takes settings.retry_base_delay.';
COMMENT ON COLUMN chunkq.crawl_jobs.weight IS
    'Share of claims among the jobs of its priority that have work: a job of weight 2 gets twice the claims of a '
    'job of weight 1.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_running IS
    'At most this many of the job''s chunks are processing at once; NULL: no cap.';
COMMENT ON COLUMN chunkq.crawl_jobs.rate_key IS
    'The site, API or tenant the job''s chunks hit; the limits of chunkq.rate_limits for this key hold across every '
    'job that names it.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_failed_ratio IS
    'Failure budget: once more than this share of the job''s chunks failed for good, the job pauses itself.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_failed_chunks IS
    'Failure budget: once more than this many of the job''s chunks failed for good, the job pauses itself.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_consecutive_failures IS
    'Failure budget: once this many attempts failed in a row with no chunk completed in between, the job pauses '
    'itself (a dead site).';
COMMENT ON COLUMN chunkq.crawl_jobs.limited IS
    'Internal: the job has a cap or a rate_key with limits, so its chunks are claimed through the limited path.';
COMMENT ON COLUMN chunkq.crawl_jobs.paused_reason IS
    'Why the job is paused: by an operator, or its failure budget (what tripped it).';
COMMENT ON COLUMN chunkq.crawl_jobs.budget_reset_at IS
    'When the job was last resumed: consecutive failures count from here (or the last completion, if later).';

CREATE INDEX crawl_jobs_by_project ON chunkq.crawl_jobs USING btree (project_id);
COMMENT ON INDEX chunkq.crawl_jobs_by_project IS 'The application''s lookups of a project''s jobs.';

CREATE INDEX crawl_jobs_by_rate_key ON chunkq.crawl_jobs USING btree (rate_key) WHERE ((rate_key IS NOT NULL) AND (finished_at IS NULL));
COMMENT ON INDEX chunkq.crawl_jobs_by_rate_key IS 'The unfinished jobs of a rate key.';

CREATE INDEX crawl_jobs_finished ON chunkq.crawl_jobs USING btree (finished_at) WHERE (finished_at IS NOT NULL);
COMMENT ON INDEX chunkq.crawl_jobs_finished IS 'Finished jobs by age, for prune_finished_jobs.';

CREATE INDEX crawl_jobs_limited ON chunkq.crawl_jobs USING btree (priority DESC, id) WHERE (limited AND (finished_at IS NULL) AND (paused_at IS NULL));
COMMENT ON INDEX chunkq.crawl_jobs_limited IS 'The limited jobs a claim may take chunks of.';

CREATE TRIGGER crawl_jobs_delete_chunks AFTER DELETE ON chunkq.crawl_jobs REFERENCING OLD TABLE AS deleted_jobs FOR EACH STATEMENT EXECUTE FUNCTION chunkq._delete_chunks_of_jobs();
COMMENT ON TRIGGER crawl_jobs_delete_chunks ON chunkq.crawl_jobs IS
    'Deleting a job deletes its chunks (and with them their errors). TRUNCATE is not covered: truncate crawl_jobs '
    'together with job_chunks, job_chunk_counts and chunk_errors.';

CREATE TRIGGER crawl_jobs_id_fixed BEFORE UPDATE OF id ON chunkq.crawl_jobs FOR EACH ROW WHEN (new.id IS DISTINCT FROM old.id) EXECUTE FUNCTION chunkq._refuse_job_change();
COMMENT ON TRIGGER crawl_jobs_id_fixed ON chunkq.crawl_jobs IS 'Chunks refer to their job by id: it never changes.';

CREATE TABLE chunkq.error_codes (
    sqlstate character(5) NOT NULL,
    name text NOT NULL,
    meaning text NOT NULL,
    CONSTRAINT error_codes_name_key UNIQUE (name),
    CONSTRAINT error_codes_pkey PRIMARY KEY (sqlstate),
    CONSTRAINT error_codes_sqlstate_in_class_cq CHECK (sqlstate ~ '^CQ[0-9A-Z]{3}$'::text)
);
COMMENT ON TABLE chunkq.error_codes IS
    'The SQLSTATEs chunkq functions raise, with the Python exception each maps to. A failed call changes nothing.';
COMMENT ON COLUMN chunkq.error_codes.sqlstate IS 'SQLSTATE of the error (class CQ is chunkq''s own).';
COMMENT ON COLUMN chunkq.error_codes.name IS 'Name of the matching exception class in the chunkq Python package.';
COMMENT ON COLUMN chunkq.error_codes.meaning IS 'When it is raised.';
GRANT SELECT ON TABLE chunkq.error_codes TO chunkq_reader;

CREATE TABLE chunkq.job_chunk_counts (
    job_id bigint NOT NULL,
    slot smallint NOT NULL,
    total integer NOT NULL,
    pending integer NOT NULL,
    processing integer NOT NULL DEFAULT 0,
    completed integer NOT NULL DEFAULT 0,
    failed integer NOT NULL DEFAULT 0,
    cancelled integer NOT NULL DEFAULT 0,
    rate_minute timestamp with time zone,
    completed_this_minute integer NOT NULL DEFAULT 0,
    completed_last_minute integer NOT NULL DEFAULT 0,
    last_completed_at timestamp with time zone,
    CONSTRAINT job_chunk_counts_add_up CHECK ((pending + processing + completed + failed + cancelled) = total),
    CONSTRAINT job_chunk_counts_job_id_fkey FOREIGN KEY (job_id) REFERENCES chunkq.crawl_jobs(id) ON DELETE CASCADE,
    CONSTRAINT job_chunk_counts_not_negative CHECK (pending >= 0 AND processing >= 0 AND completed >= 0 AND failed >= 0 AND cancelled >= 0),
    CONSTRAINT job_chunk_counts_pkey PRIMARY KEY (job_id, slot),
    CONSTRAINT job_chunk_counts_rates_not_negative CHECK (completed_this_minute >= 0 AND completed_last_minute >= 0),
    CONSTRAINT job_chunk_counts_slot_in_range CHECK (slot >= 0 AND slot < chunkq._counter_slots())
) WITH (autovacuum_vacuum_cost_delay=0, autovacuum_vacuum_scale_factor=0, autovacuum_vacuum_threshold=1000, fillfactor=50);
COMMENT ON TABLE chunkq.job_chunk_counts IS
    'Chunk counts by status for each job, split over up to 16 rows (slot = chunk_index % 16) so that completions '
    'of one job rarely wait on each other. A job''s progress is the sum of its rows.';
COMMENT ON COLUMN chunkq.job_chunk_counts.job_id IS 'The crawl job.';
COMMENT ON COLUMN chunkq.job_chunk_counts.slot IS 'chunk_index % 16 of the chunks this row counts.';
COMMENT ON COLUMN chunkq.job_chunk_counts.total IS 'Chunks counted by this row; never changes.';
COMMENT ON COLUMN chunkq.job_chunk_counts.pending IS 'Of those, how many are pending.';
COMMENT ON COLUMN chunkq.job_chunk_counts.processing IS 'Of those, how many are processing.';
COMMENT ON COLUMN chunkq.job_chunk_counts.completed IS 'Of those, how many are completed.';
COMMENT ON COLUMN chunkq.job_chunk_counts.failed IS 'Of those, how many are failed.';
COMMENT ON COLUMN chunkq.job_chunk_counts.cancelled IS 'Of those, how many are cancelled.';
COMMENT ON COLUMN chunkq.job_chunk_counts.rate_minute IS 'The minute of this row''s latest completion.';
COMMENT ON COLUMN chunkq.job_chunk_counts.completed_this_minute IS 'Completions counted here during rate_minute.';
COMMENT ON COLUMN chunkq.job_chunk_counts.completed_last_minute IS
    'Completions counted here the minute before rate_minute.';
COMMENT ON COLUMN chunkq.job_chunk_counts.last_completed_at IS
    'When the last chunk this row counts was completed (for the failure budget''s failures in a row).';

CREATE TABLE chunkq.job_chunks (
    id bigint NOT NULL GENERATED ALWAYS AS IDENTITY,
    job_id bigint NOT NULL,
    chunk_index integer NOT NULL,
    image_start bigint NOT NULL,
    image_end bigint NOT NULL,
    status chunkq.chunk_status NOT NULL DEFAULT 'pending'::chunkq.chunk_status,
    priority smallint NOT NULL,
    attempt integer NOT NULL DEFAULT 0,
    retry_count integer NOT NULL DEFAULT 0,
    worker_id text,
    task_id text,
    lease_expires_at timestamp with time zone,
    available_at timestamp with time zone NOT NULL DEFAULT now(),
    error_message text,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    claimed_at timestamp with time zone,
    heartbeat_at timestamp with time zone,
    finished_at timestamp with time zone,
    lease_token uuid,
    vpos double precision NOT NULL DEFAULT 0,
    limited boolean NOT NULL DEFAULT false,
    checkpoint_position bigint,
    checkpoint_state jsonb,
    checkpoint_at timestamp with time zone,
    CONSTRAINT job_chunks_checkpoint_in_range CHECK (checkpoint_position >= image_start AND checkpoint_position <= image_end),
    CONSTRAINT job_chunks_checkpoint_state_needs_position CHECK (checkpoint_state IS NULL OR checkpoint_position IS NOT NULL),
    CONSTRAINT job_chunks_completed_was_claimed CHECK (status <> 'completed'::chunkq.chunk_status OR attempt > 0),
    CONSTRAINT job_chunks_counts_not_negative CHECK (attempt >= 0 AND retry_count >= 0),
    CONSTRAINT job_chunks_failed_has_error CHECK (status <> 'failed'::chunkq.chunk_status OR error_message IS NOT NULL),
    CONSTRAINT job_chunks_finished_iff_final CHECK ((status = ANY (ARRAY['completed'::chunkq.chunk_status, 'failed'::chunkq.chunk_status, 'cancelled'::chunkq.chunk_status])) = (finished_at IS NOT NULL)),
    CONSTRAINT job_chunks_image_range_valid CHECK (image_start >= 0 AND image_end >= image_start),
    CONSTRAINT job_chunks_index_not_negative CHECK (chunk_index >= 0),
    CONSTRAINT job_chunks_one_per_index UNIQUE (job_id, chunk_index),
    CONSTRAINT job_chunks_pkey PRIMARY KEY (id),
    CONSTRAINT job_chunks_priority_not_negative CHECK (priority >= 0),
    CONSTRAINT job_chunks_processing_has_holder CHECK (status <> 'processing'::chunkq.chunk_status OR worker_id IS NOT NULL AND attempt > 0),
    CONSTRAINT job_chunks_processing_has_lease_token CHECK (status <> 'processing'::chunkq.chunk_status OR lease_token IS NOT NULL),
    CONSTRAINT job_chunks_processing_is_leased CHECK ((status = 'processing'::chunkq.chunk_status) = (lease_expires_at IS NOT NULL)),
    CONSTRAINT job_chunks_retries_within_attempts CHECK (retry_count <= attempt)
) WITH (autovacuum_vacuum_cost_delay=0, autovacuum_vacuum_insert_scale_factor=0.02, autovacuum_vacuum_scale_factor=0.02);
COMMENT ON TABLE chunkq.job_chunks IS
    'One chunk of a crawl job: the inclusive image range image_start..image_end. Change it only through the chunkq '
    'functions, which keep job_chunk_counts and the job''s status in step.';
COMMENT ON COLUMN chunkq.job_chunks.id IS 'Chunk id.';
COMMENT ON COLUMN chunkq.job_chunks.job_id IS
    'The crawl job (crawl_jobs.id). Enforced by triggers rather than a foreign key, to keep bulk inserts cheap: '
    'inserts must name an existing job, a chunk never changes job, deleting a job deletes its chunks.';
COMMENT ON COLUMN chunkq.job_chunks.chunk_index IS 'Position in the job, from 0.';
COMMENT ON COLUMN chunkq.job_chunks.image_start IS 'First image of the chunk (inclusive).';
COMMENT ON COLUMN chunkq.job_chunks.image_end IS 'Last image of the chunk (inclusive).';
COMMENT ON COLUMN chunkq.job_chunks.status IS 'See chunkq.chunk_status.';
COMMENT ON COLUMN chunkq.job_chunks.priority IS 'Higher is claimed first; equal priorities are claimed oldest first.';
COMMENT ON COLUMN chunkq.job_chunks.attempt IS
    'How many times the chunk has been claimed. It is also the fencing token: heartbeat, complete and fail must '
    'present the attempt they claimed, so a worker that lost its lease cannot overwrite a newer attempt.';
COMMENT ON COLUMN chunkq.job_chunks.retry_count IS
    'How many times the chunk was put back after a failure or an expired lease.';
COMMENT ON COLUMN chunkq.job_chunks.worker_id IS 'Who holds the chunk (processing) or last held it (finished).';
COMMENT ON COLUMN chunkq.job_chunks.task_id IS 'Optional caller reference for the current attempt, e.g. a task id.';
COMMENT ON COLUMN chunkq.job_chunks.lease_expires_at IS
    'While processing: when the claim lapses unless heartbeat_chunk extends it. An expired chunk is reclaimed by '
    'the next claim (or reclaim_expired_chunks) and the lapse counts as a retry.';
COMMENT ON COLUMN chunkq.job_chunks.available_at IS 'A pending chunk is not claimed before this time (retry backoff).';
COMMENT ON COLUMN chunkq.job_chunks.error_message IS 'Last error recorded for the chunk; chunk_errors keeps every one.';
COMMENT ON COLUMN chunkq.job_chunks.created_at IS 'When the chunk was created.';
COMMENT ON COLUMN chunkq.job_chunks.claimed_at IS 'When the current or last attempt was claimed.';
COMMENT ON COLUMN chunkq.job_chunks.heartbeat_at IS 'Last claim or heartbeat of the current or last attempt.';
COMMENT ON COLUMN chunkq.job_chunks.finished_at IS 'When the chunk completed, failed or was cancelled.';
COMMENT ON COLUMN chunkq.job_chunks.lease_token IS
    'Random token drawn by each claim and returned only to the claimer: heartbeat, complete, fail and release must '
    'present it with the attempt, so a worker cannot report on a chunk another worker holds. The read functions '
    '(get_chunk, list_chunks, failed_chunks) return it as NULL.';
COMMENT ON COLUMN chunkq.job_chunks.vpos IS
    'Virtual position for fair share: the job''s start + chunk_index / weight. Claims take the lowest within a '
    'priority, so jobs with work take turns.';
COMMENT ON COLUMN chunkq.job_chunks.limited IS
    'Internal: the chunk''s job is limited (a cap or a limited rate_key): it is claimed apart, under the limits.';
COMMENT ON COLUMN chunkq.job_chunks.checkpoint_position IS
    'The last image a handler reported done (a checkpoint); the next attempt resumes after it. NULL: none yet.';
COMMENT ON COLUMN chunkq.job_chunks.checkpoint_state IS
    'Small JSON state the handler saved with its checkpoint, handed to the next attempt.';
COMMENT ON COLUMN chunkq.job_chunks.checkpoint_at IS 'When the checkpoint was recorded.';

CREATE INDEX job_chunks_checkpointed ON chunkq.job_chunks USING btree (job_id) WHERE ((checkpoint_position IS NOT NULL) AND (status = ANY (ARRAY['pending'::chunkq.chunk_status, 'processing'::chunkq.chunk_status, 'failed'::chunkq.chunk_status])));
COMMENT ON INDEX chunkq.job_chunks_checkpointed IS
    'Unfinished chunks with a checkpoint: the few whose partial work progress counts.';

CREATE INDEX job_chunks_claim_order ON chunkq.job_chunks USING btree (priority DESC, vpos, id) WHERE ((status = 'pending'::chunkq.chunk_status) AND (available_at < 'infinity'::timestamp with time zone) AND (NOT limited));
COMMENT ON INDEX chunkq.job_chunks_claim_order IS
    'Claim order over claimable chunks of unlimited jobs: priority, then fair-share position.';

CREATE INDEX job_chunks_claim_order_by_job ON chunkq.job_chunks USING btree (job_id, priority DESC, id) WHERE ((status = 'pending'::chunkq.chunk_status) AND (available_at < 'infinity'::timestamp with time zone));
COMMENT ON INDEX chunkq.job_chunks_claim_order_by_job IS 'Claim order within one job.';

CREATE INDEX job_chunks_claim_order_limited ON chunkq.job_chunks USING btree (priority DESC, vpos) WHERE ((status = 'pending'::chunkq.chunk_status) AND (available_at < 'infinity'::timestamp with time zone) AND limited);
COMMENT ON INDEX chunkq.job_chunks_claim_order_limited IS
    'The front of each priority among claimable chunks of limited jobs (they are claimed job by job).';

CREATE INDEX job_chunks_failed_by_job ON chunkq.job_chunks USING btree (job_id, chunk_index) WHERE (status = 'failed'::chunkq.chunk_status);
COMMENT ON INDEX chunkq.job_chunks_failed_by_job IS 'Lists a job''s failed chunks.';

CREATE INDEX job_chunks_lease_expiry ON chunkq.job_chunks USING btree (lease_expires_at) WHERE (lease_expires_at IS NOT NULL);
COMMENT ON INDEX chunkq.job_chunks_lease_expiry IS 'Finds processing chunks whose lease has expired.';

CREATE INDEX job_chunks_retry_wait ON chunkq.job_chunks USING btree (job_id, available_at) WHERE ((status = 'pending'::chunkq.chunk_status) AND (retry_count > 0));
COMMENT ON INDEX chunkq.job_chunks_retry_wait IS
    'Pending chunks of a job that were retried, by when they may be claimed: which wait out a back-off.';

CREATE TRIGGER job_chunks_job_exists AFTER INSERT ON chunkq.job_chunks REFERENCING NEW TABLE AS new_chunks FOR EACH STATEMENT EXECUTE FUNCTION chunkq._check_chunk_jobs();
COMMENT ON TRIGGER job_chunks_job_exists ON chunkq.job_chunks IS
    'job_chunks.job_id refers to crawl_jobs.id: checked once per INSERT statement (a foreign key checks each row).';

CREATE TRIGGER job_chunks_job_id_fixed BEFORE UPDATE OF job_id ON chunkq.job_chunks FOR EACH ROW WHEN (new.job_id IS DISTINCT FROM old.job_id) EXECUTE FUNCTION chunkq._refuse_job_change();
COMMENT ON TRIGGER job_chunks_job_id_fixed ON chunkq.job_chunks IS 'A chunk belongs to its job for good.';

CREATE TABLE chunkq.rate_limits (
    key text NOT NULL,
    rate double precision,
    burst integer,
    max_running integer,
    tokens double precision NOT NULL,
    refilled_at timestamp with time zone NOT NULL DEFAULT now(),
    blocked_until timestamp with time zone,
    blocked_reason text,
    updated_at timestamp with time zone NOT NULL DEFAULT now(),
    CONSTRAINT rate_limits_burst_needs_rate CHECK (burst IS NULL OR rate IS NOT NULL),
    CONSTRAINT rate_limits_burst_positive CHECK (burst >= 1 AND burst <= 1000000),
    CONSTRAINT rate_limits_key_valid CHECK (btrim(key) <> ''::text AND length(key) <= 200),
    CONSTRAINT rate_limits_max_running_positive CHECK (max_running >= 1),
    CONSTRAINT rate_limits_pkey PRIMARY KEY (key),
    CONSTRAINT rate_limits_rate_positive CHECK (rate > 0::double precision AND rate <= 1000000::double precision)
);
COMMENT ON TABLE chunkq.rate_limits IS
    'Limits of a rate key, across every job that names it: a token bucket (at most rate chunks per second, in '
    'bursts of at most burst) and a cap on running chunks. Change them with set_rate_limit / delete_rate_limit.';
COMMENT ON COLUMN chunkq.rate_limits.key IS 'The key jobs name in crawl_jobs.rate_key.';
COMMENT ON COLUMN chunkq.rate_limits.rate IS 'Chunks claimed per second at most, on average; NULL: no rate limit.';
COMMENT ON COLUMN chunkq.rate_limits.burst IS 'Chunks that may be claimed at once after a quiet spell (bucket size).';
COMMENT ON COLUMN chunkq.rate_limits.max_running IS 'Chunks of the key processing at once at most; NULL: no cap.';
COMMENT ON COLUMN chunkq.rate_limits.tokens IS 'Tokens in the bucket at refilled_at (claims take one per chunk).';
COMMENT ON COLUMN chunkq.rate_limits.refilled_at IS 'When tokens was last brought up to date.';
COMMENT ON COLUMN chunkq.rate_limits.blocked_until IS
    'No chunk of the key is claimed before this (a handler''s "retry after").';
COMMENT ON COLUMN chunkq.rate_limits.blocked_reason IS 'Why the key is blocked, as the handler said.';
COMMENT ON COLUMN chunkq.rate_limits.updated_at IS 'When the limits were last set.';

CREATE TABLE chunkq.settings (
    singleton boolean NOT NULL DEFAULT true,
    chunk_size integer NOT NULL DEFAULT 500,
    min_priority smallint NOT NULL DEFAULT 0,
    max_priority smallint NOT NULL DEFAULT 10,
    default_priority smallint NOT NULL DEFAULT 5,
    default_max_retries integer NOT NULL DEFAULT 3,
    default_lease interval NOT NULL DEFAULT '00:05:00'::interval,
    max_chunks_per_job integer NOT NULL DEFAULT 1000000,
    max_error_length integer NOT NULL DEFAULT 10000,
    retry_base_delay interval NOT NULL DEFAULT '00:00:10'::interval,
    retry_max_delay interval NOT NULL DEFAULT '01:00:00'::interval,
    max_checkpoint_state_bytes integer NOT NULL DEFAULT 65536,
    CONSTRAINT settings_chunk_size_in_range CHECK (chunk_size >= 1 AND chunk_size <= 1000000),
    CONSTRAINT settings_lease_positive CHECK (default_lease > '00:00:00'::interval),
    CONSTRAINT settings_max_checkpoint_state_in_range CHECK (max_checkpoint_state_bytes >= 0 AND max_checkpoint_state_bytes <= 10485760),
    CONSTRAINT settings_max_chunks_positive CHECK (max_chunks_per_job >= 1 AND max_chunks_per_job <= 100000000),
    CONSTRAINT settings_max_error_length_in_range CHECK (max_error_length >= 100 AND max_error_length <= 1000000),
    CONSTRAINT settings_max_retries_in_range CHECK (default_max_retries >= 0 AND default_max_retries <= 1000),
    CONSTRAINT settings_pkey PRIMARY KEY (singleton),
    CONSTRAINT settings_priority_range_valid CHECK (0 <= min_priority AND min_priority <= default_priority AND default_priority <= max_priority),
    CONSTRAINT settings_retry_delays_valid CHECK (retry_base_delay >= '00:00:00'::interval AND retry_max_delay >= retry_base_delay),
    CONSTRAINT settings_single_row CHECK (singleton)
);
COMMENT ON TABLE chunkq.settings IS
    'One row of per-deployment defaults, used wherever a call passes NULL. Example: UPDATE chunkq.settings SET '
    'chunk_size = 1000, max_priority = 20;';
COMMENT ON COLUMN chunkq.settings.singleton IS 'Always true: keeps this table to one row.';
COMMENT ON COLUMN chunkq.settings.chunk_size IS 'Images per chunk when create_job / create_chunks get no chunk size.';
COMMENT ON COLUMN chunkq.settings.min_priority IS 'Lowest priority a job or chunk may have.';
COMMENT ON COLUMN chunkq.settings.max_priority IS 'Highest priority a job or chunk may have; higher is claimed first.';
COMMENT ON COLUMN chunkq.settings.default_priority IS 'Priority of a job created without one.';
COMMENT ON COLUMN chunkq.settings.default_max_retries IS
    'Retries a failed or abandoned chunk gets when its job sets none.';
COMMENT ON COLUMN chunkq.settings.default_lease IS
    'How long a claim lasts without a heartbeat when the claim names no lease.';
COMMENT ON COLUMN chunkq.settings.max_chunks_per_job IS
    'Largest number of chunks one job may be split into; guards against absurd max_images.';
COMMENT ON COLUMN chunkq.settings.max_error_length IS
    'Error messages longer than this many characters are cut, with a note saying so.';
COMMENT ON COLUMN chunkq.settings.retry_base_delay IS
    'First automatic retry waits about this long; each further retry doubles it (plus jitter).';
COMMENT ON COLUMN chunkq.settings.retry_max_delay IS 'Upper bound on the wait before an automatic retry.';
COMMENT ON COLUMN chunkq.settings.max_checkpoint_state_bytes IS
    'Largest checkpoint state (as JSON text) a handler may save with a checkpoint.';
GRANT SELECT ON TABLE chunkq.settings TO chunkq_reader;

-- ---------------------------------------------------------------------------
-- Views
-- ---------------------------------------------------------------------------

CREATE VIEW chunkq.expired_leases AS
 SELECT id AS chunk_id,
    job_id,
    chunk_index,
    worker_id,
    attempt,
    claimed_at,
    heartbeat_at,
    lease_expires_at,
    now() - lease_expires_at AS expired_for
   FROM chunkq.job_chunks c
  WHERE lease_expires_at < now();
COMMENT ON VIEW chunkq.expired_leases IS
    'Processing chunks whose worker stopped heartbeating and that no claim has taken back yet. They go back to '
    'pending at the next claim (or reclaim_expired_chunks); many here for long means no worker is claiming.';
COMMENT ON COLUMN chunkq.expired_leases.chunk_id IS 'The chunk.';
COMMENT ON COLUMN chunkq.expired_leases.job_id IS 'Its job.';
COMMENT ON COLUMN chunkq.expired_leases.chunk_index IS 'Its position in the job.';
COMMENT ON COLUMN chunkq.expired_leases.worker_id IS 'The worker that held it.';
COMMENT ON COLUMN chunkq.expired_leases.attempt IS 'The attempt that was abandoned.';
COMMENT ON COLUMN chunkq.expired_leases.claimed_at IS 'When that attempt was claimed.';
COMMENT ON COLUMN chunkq.expired_leases.heartbeat_at IS 'Its last heartbeat.';
COMMENT ON COLUMN chunkq.expired_leases.lease_expires_at IS 'When the lease ran out.';
COMMENT ON COLUMN chunkq.expired_leases.expired_for IS 'How long ago.';
GRANT SELECT ON TABLE chunkq.expired_leases TO chunkq_reader;

CREATE VIEW chunkq.failure_summary AS
 SELECT regexp_replace(
        CASE
            WHEN lease_expired THEN 'lease expired: the worker stopped heartbeating'::text
            ELSE split_part(error, '
'::text, 1)
        END, '[0-9]+'::text, '#'::text, 'g'::text) AS error_kind,
    count(*) AS occurrences,
    count(DISTINCT chunk_id) AS chunks,
    count(DISTINCT job_id) AS jobs,
    count(*) FILTER (WHERE NOT retried) AS ended_failed,
    min(failed_at) AS first_seen,
    max(failed_at) AS last_seen,
    (array_agg(chunk_id ORDER BY failed_at DESC))[1] AS example_chunk_id,
    (array_agg(error ORDER BY failed_at DESC))[1] AS example_error
   FROM chunkq.chunk_errors e
  GROUP BY (regexp_replace(
        CASE
            WHEN lease_expired THEN 'lease expired: the worker stopped heartbeating'::text
            ELSE split_part(error, '
'::text, 1)
        END, '[0-9]+'::text, '#'::text, 'g'::text));
COMMENT ON VIEW chunkq.failure_summary IS
    'Errors grouped by kind (first line, numbers replaced by #), most frequent first when ordered by occurrences: '
    'how often, on how many chunks and jobs, how many ended a chunk for good, and the latest example.';
COMMENT ON COLUMN chunkq.failure_summary.error_kind IS 'The first line of the error with numbers as #.';
COMMENT ON COLUMN chunkq.failure_summary.occurrences IS 'Errors of this kind.';
COMMENT ON COLUMN chunkq.failure_summary.chunks IS 'Chunks that had one.';
COMMENT ON COLUMN chunkq.failure_summary.jobs IS 'Jobs those chunks belong to.';
COMMENT ON COLUMN chunkq.failure_summary.ended_failed IS 'Errors after which the chunk was failed for good.';
COMMENT ON COLUMN chunkq.failure_summary.first_seen IS 'The first one.';
COMMENT ON COLUMN chunkq.failure_summary.last_seen IS 'The latest one.';
COMMENT ON COLUMN chunkq.failure_summary.example_chunk_id IS 'The chunk of the latest one (see chunk_error_history).';
COMMENT ON COLUMN chunkq.failure_summary.example_error IS 'The latest error in full.';
GRANT SELECT ON TABLE chunkq.failure_summary TO chunkq_reader;

CREATE VIEW chunkq.job_overview AS
 SELECT j.id,
    j.project_id,
    j.name,
    j.status,
    j.priority,
    j.total_chunks,
    COALESCE(k.pending, 0) AS pending_chunks,
    COALESCE(k.processing, 0) AS processing_chunks,
    COALESCE(k.completed, 0) AS completed_chunks,
    COALESCE(k.failed, 0) AS failed_chunks,
    COALESCE(k.cancelled, 0) AS cancelled_chunks,
        CASE
            WHEN j.total_chunks = 0 THEN 0.0::double precision
            ELSE round(100.0 * COALESCE(k.completed, 0)::numeric / j.total_chunks::numeric, 2)::double precision
        END AS completion_percentage,
    j.max_images,
    j.created_at,
    j.started_at,
    j.finished_at,
    j.paused_at,
    chunkq._completed_images(j.*, COALESCE(k.completed, 0)::bigint) AS completed_images,
    r.chunks_per_second,
        CASE
            WHEN j.finished_at IS NULL AND r.chunks_per_second > 0::double precision THEN (COALESCE(k.pending, 0) + COALESCE(k.processing, 0))::double precision / r.chunks_per_second * '00:00:01'::interval
            ELSE NULL::interval
        END AS eta,
    j.weight,
    j.max_running,
    j.rate_key,
    j.paused_reason,
    w.retrying AS retrying_chunks,
        CASE
            WHEN j.finished_at IS NOT NULL OR COALESCE(k.pending, 0) = 0 THEN NULL::text
            WHEN j.paused_at IS NOT NULL THEN 'paused: '::text || COALESCE(j.paused_reason, 'by an operator'::text)
            WHEN j.max_running IS NOT NULL AND COALESCE(k.processing, 0) >= j.max_running THEN format('capped: %s of max_running %s'::text, k.processing, j.max_running)
            WHEN l.held_back IS NOT NULL THEN format('rate key %s %s'::text, j.rate_key, l.held_back)
            WHEN w.retrying >= COALESCE(k.pending, 0) THEN format('waiting to retry: %s chunks, next at %s'::text, w.retrying, w.next_at)
            ELSE NULL::text
        END AS held_back
   FROM chunkq.crawl_jobs j
     LEFT JOIN LATERAL ( SELECT sum(c.pending)::integer AS pending,
            sum(c.processing)::integer AS processing,
            sum(c.completed)::integer AS completed,
            sum(c.failed)::integer AS failed,
            sum(c.cancelled)::integer AS cancelled,
            sum(
                CASE
                    WHEN c.rate_minute = date_trunc('minute'::text, now()) THEN c.completed_this_minute + c.completed_last_minute
                    WHEN c.rate_minute = (date_trunc('minute'::text, now()) - '00:01:00'::interval) THEN c.completed_this_minute
                    ELSE 0
                END) AS recent
           FROM chunkq.job_chunk_counts c
          WHERE c.job_id = j.id) k ON true
     LEFT JOIN LATERAL ( SELECT round(COALESCE(k.recent, 0::bigint)::numeric / GREATEST(1.0, LEAST(60::numeric + EXTRACT(epoch FROM now() - date_trunc('minute'::text, now())), EXTRACT(epoch FROM now() - j.started_at))), 2)::double precision AS chunks_per_second
          WHERE j.started_at IS NOT NULL) r ON true
     LEFT JOIN LATERAL ( SELECT count(*)::integer AS retrying,
            min(c.available_at) AS next_at
           FROM chunkq.job_chunks c
          WHERE c.job_id = j.id AND c.status = 'pending'::chunkq.chunk_status AND c.retry_count > 0 AND c.available_at > now() AND c.available_at < 'infinity'::timestamp with time zone AND j.finished_at IS NULL) w ON true
     LEFT JOIN chunkq.rate_limit_state l ON l.key = j.rate_key AND j.finished_at IS NULL;
COMMENT ON VIEW chunkq.job_overview IS
    'Every job with its chunk counts by status, completion percentage, images done, completion rate over the last '
    'one to two minutes, ETA, its scheduling options, and what holds it back (held_back) when it has chunks '
    'waiting but none is claimable: paused (and why), capped, its rate key, or every pending chunk waiting out a '
    'retry. From job_chunk_counts: cheap per job. Example: SELECT id, held_back FROM chunkq.job_overview WHERE id '
    '= 42;';
COMMENT ON COLUMN chunkq.job_overview.id IS 'Job id.';
COMMENT ON COLUMN chunkq.job_overview.project_id IS 'The application''s project.';
COMMENT ON COLUMN chunkq.job_overview.name IS 'Job name.';
COMMENT ON COLUMN chunkq.job_overview.status IS 'Job status.';
COMMENT ON COLUMN chunkq.job_overview.priority IS 'Priority the job''s chunks were created with.';
COMMENT ON COLUMN chunkq.job_overview.total_chunks IS 'Chunks in the job.';
COMMENT ON COLUMN chunkq.job_overview.pending_chunks IS 'Chunks waiting to be claimed.';
COMMENT ON COLUMN chunkq.job_overview.processing_chunks IS 'Chunks held by workers.';
COMMENT ON COLUMN chunkq.job_overview.completed_chunks IS 'Chunks completed.';
COMMENT ON COLUMN chunkq.job_overview.failed_chunks IS 'Chunks failed for good.';
COMMENT ON COLUMN chunkq.job_overview.cancelled_chunks IS 'Chunks cancelled with the job.';
COMMENT ON COLUMN chunkq.job_overview.completion_percentage IS 'completed_chunks / total_chunks * 100.';
COMMENT ON COLUMN chunkq.job_overview.max_images IS 'Images in the job.';
COMMENT ON COLUMN chunkq.job_overview.created_at IS 'When the job was created.';
COMMENT ON COLUMN chunkq.job_overview.started_at IS 'When its first chunk was claimed.';
COMMENT ON COLUMN chunkq.job_overview.finished_at IS 'When it finished.';
COMMENT ON COLUMN chunkq.job_overview.paused_at IS 'When the job was paused, if it is.';
COMMENT ON COLUMN chunkq.job_overview.completed_images IS 'Images in completed chunks.';
COMMENT ON COLUMN chunkq.job_overview.chunks_per_second IS
    'Completions per second over the previous minute and this one so far (NULL before the job starts).';
COMMENT ON COLUMN chunkq.job_overview.eta IS 'Pending and processing chunks at that rate; NULL when nothing moves.';
COMMENT ON COLUMN chunkq.job_overview.weight IS 'The job''s share of claims among the jobs of its priority.';
COMMENT ON COLUMN chunkq.job_overview.max_running IS 'Cap on the job''s running chunks (NULL: none).';
COMMENT ON COLUMN chunkq.job_overview.rate_key IS 'The rate key whose limits apply (NULL: none).';
COMMENT ON COLUMN chunkq.job_overview.paused_reason IS 'Why the job is paused, if it is.';
COMMENT ON COLUMN chunkq.job_overview.retrying_chunks IS 'Pending chunks waiting out a retry back-off.';
COMMENT ON COLUMN chunkq.job_overview.held_back IS
    'Why the job''s waiting chunks are not being claimed, if something holds them all back: paused (why), capped, '
    'rate key blocked / capped / rate-limited, waiting to retry. NULL: nothing does.';
GRANT SELECT ON TABLE chunkq.job_overview TO chunkq_reader;

CREATE VIEW chunkq.live_workers AS
 WITH connected AS (
         SELECT _connected_workers.worker_id,
            _connected_workers.pid,
            _connected_workers.backend_start
           FROM chunkq._connected_workers() _connected_workers(worker_id, pid, backend_start)
        ), holding AS (
         SELECT c.worker_id,
            count(*) AS chunks_held,
            min(c.claimed_at) AS oldest_claim,
            max(c.heartbeat_at) AS last_heartbeat,
            min(c.lease_expires_at) AS next_lease_expiry
           FROM chunkq.job_chunks c
          WHERE c.lease_expires_at IS NOT NULL
          GROUP BY c.worker_id
        )
 SELECT COALESCE(w.worker_id, h.worker_id) AS worker_id,
    w.pid AS backend_pid,
    w.backend_start AS connected_since,
    COALESCE(h.chunks_held, 0::bigint) AS chunks_held,
    h.oldest_claim,
    now() - h.last_heartbeat AS heartbeat_age,
    h.next_lease_expiry
   FROM connected w
     FULL JOIN holding h ON h.worker_id = w.worker_id;
COMMENT ON VIEW chunkq.live_workers IS
    'Workers: those connected (the pool names its connections "chunkq worker HOST:PID"), and whoever holds chunks. '
    'A row with chunks but no backend_pid is a worker that went away; its chunks come back when their leases '
    'expire.';
COMMENT ON COLUMN chunkq.live_workers.worker_id IS 'HOST:PID of the worker process.';
COMMENT ON COLUMN chunkq.live_workers.backend_pid IS 'Its Postgres backend, if it is connected.';
COMMENT ON COLUMN chunkq.live_workers.connected_since IS 'When it connected.';
COMMENT ON COLUMN chunkq.live_workers.chunks_held IS 'Chunks it is processing.';
COMMENT ON COLUMN chunkq.live_workers.oldest_claim IS 'When it claimed the oldest of them.';
COMMENT ON COLUMN chunkq.live_workers.heartbeat_age IS 'Time since its last heartbeat or claim.';
COMMENT ON COLUMN chunkq.live_workers.next_lease_expiry IS 'The earliest lease it must renew.';
GRANT SELECT ON TABLE chunkq.live_workers TO chunkq_reader;

CREATE VIEW chunkq.queue_depth AS
 SELECT c.priority,
    count(*) AS pending_chunks,
    count(*) FILTER (WHERE c.available_at <= now() AND j.paused_at IS NULL) AS claimable_chunks,
    now() - min(c.created_at) AS oldest_pending_age,
    count(*) FILTER (WHERE j.paused_at IS NOT NULL) AS paused_chunks,
    count(*) FILTER (WHERE c.available_at > now() AND j.paused_at IS NULL) AS retrying_chunks,
    count(*) FILTER (WHERE c.limited AND c.available_at <= now() AND j.paused_at IS NULL) AS limited_chunks
   FROM chunkq.job_chunks c
     JOIN chunkq.crawl_jobs j ON j.id = c.job_id
  WHERE c.status = 'pending'::chunkq.chunk_status
  GROUP BY c.priority;
COMMENT ON VIEW chunkq.queue_depth IS
    'Pending chunks by priority: how many, how many may be claimed now, how long the oldest has waited, and what '
    'holds the others back (a paused job, a retry back-off or deferral); limited_chunks are claimable only as '
    'their job''s or key''s limits allow. Reads every pending chunk. Example: SELECT * FROM chunkq.queue_depth;';
COMMENT ON COLUMN chunkq.queue_depth.priority IS 'Chunk priority; higher is claimed first.';
COMMENT ON COLUMN chunkq.queue_depth.pending_chunks IS 'Pending chunks of this priority.';
COMMENT ON COLUMN chunkq.queue_depth.claimable_chunks IS
    'Of those, how many a claim may take now (limited_chunks among them, as their limits allow).';
COMMENT ON COLUMN chunkq.queue_depth.oldest_pending_age IS 'Age of the oldest pending chunk of this priority.';
COMMENT ON COLUMN chunkq.queue_depth.paused_chunks IS 'Pending chunks of paused jobs.';
COMMENT ON COLUMN chunkq.queue_depth.retrying_chunks IS
    'Pending chunks waiting out a retry back-off or a handler''s retry-after (not of paused jobs).';
COMMENT ON COLUMN chunkq.queue_depth.limited_chunks IS
    'Claimable chunks of jobs with a cap or a limited rate key: taken only as those limits allow '
    '(job_overview.held_back, rate_limit_state).';
GRANT SELECT ON TABLE chunkq.queue_depth TO chunkq_reader;

CREATE VIEW chunkq.rate_limit_state AS
 SELECT r.key,
    r.rate,
    r.burst,
        CASE
            WHEN r.rate IS NULL THEN NULL::double precision
            ELSE LEAST(r.burst::double precision, r.tokens + r.rate * EXTRACT(epoch FROM clock_timestamp() - r.refilled_at)::double precision)
        END AS tokens,
    r.max_running,
    COALESCE(k.running, 0::bigint)::integer AS running_chunks,
    COALESCE(k.pending, 0::bigint)::integer AS pending_chunks,
    COALESCE(k.jobs, 0::bigint)::integer AS jobs,
    r.blocked_until,
    r.blocked_reason,
        CASE
            WHEN r.blocked_until > clock_timestamp() THEN 'blocked: '::text || r.blocked_reason
            WHEN r.max_running IS NOT NULL AND COALESCE(k.running, 0::bigint) >= r.max_running THEN format('capped: %s of %s running'::text, k.running, r.max_running)
            WHEN r.rate IS NOT NULL AND COALESCE(k.pending, 0::bigint) > 0 AND (r.tokens + r.rate * EXTRACT(epoch FROM clock_timestamp() - r.refilled_at)::double precision) < 1::double precision THEN format('rate-limited: %s chunks/s'::text, r.rate)
            ELSE NULL::text
        END AS held_back
   FROM chunkq.rate_limits r
     LEFT JOIN LATERAL ( SELECT sum(c.processing) AS running,
            sum(c.pending) AS pending,
            count(DISTINCT j.id) AS jobs
           FROM chunkq.crawl_jobs j
             JOIN chunkq.job_chunk_counts c ON c.job_id = j.id
          WHERE j.rate_key = r.key AND j.finished_at IS NULL) k ON true;
COMMENT ON VIEW chunkq.rate_limit_state IS
    'Each rate key with limits: its bucket now, its running and pending chunks across its unfinished jobs, and '
    'what holds them back (held_back: blocked, capped or rate-limited; NULL: nothing). Example: SELECT * FROM '
    'chunkq.rate_limit_state WHERE held_back IS NOT NULL;';
COMMENT ON COLUMN chunkq.rate_limit_state.key IS 'The rate key.';
COMMENT ON COLUMN chunkq.rate_limit_state.rate IS 'Chunks per second at most (NULL: no rate limit).';
COMMENT ON COLUMN chunkq.rate_limit_state.burst IS 'Bucket size.';
COMMENT ON COLUMN chunkq.rate_limit_state.tokens IS 'Tokens in the bucket now: chunks that may be claimed at once.';
COMMENT ON COLUMN chunkq.rate_limit_state.max_running IS 'Cap on the key''s running chunks (NULL: none).';
COMMENT ON COLUMN chunkq.rate_limit_state.running_chunks IS 'Chunks of the key processing now.';
COMMENT ON COLUMN chunkq.rate_limit_state.pending_chunks IS 'Chunks of the key waiting.';
COMMENT ON COLUMN chunkq.rate_limit_state.jobs IS 'Unfinished jobs naming the key.';
COMMENT ON COLUMN chunkq.rate_limit_state.blocked_until IS 'No chunk of the key is claimed before this.';
COMMENT ON COLUMN chunkq.rate_limit_state.blocked_reason IS 'Why it is blocked.';
COMMENT ON COLUMN chunkq.rate_limit_state.held_back IS 'What holds the key''s chunks back now, if anything.';
GRANT SELECT ON TABLE chunkq.rate_limit_state TO chunkq_reader;

-- ---------------------------------------------------------------------------
-- Functions
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION chunkq._apply_chunk_moves(p_moves chunkq._chunk_move[])
 RETURNS TABLE(job bigint, job_status chunkq.job_status, finished boolean)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
DECLARE
    v_slots constant integer := chunkq._counter_slots();
    v_minute constant timestamptz := date_trunc('minute', now());
    v_job record;
BEGIN
    FOR v_job IN
        WITH moved AS (
            SELECT m.job_id, (m.chunk_index % v_slots)::smallint AS slot,
                   count(*) FILTER (WHERE m.to_status = 'pending') - count(*) FILTER (WHERE m.from_status = 'pending') AS d_pending,
                   count(*) FILTER (WHERE m.to_status = 'processing') - count(*) FILTER (WHERE m.from_status = 'processing') AS d_processing,
                   count(*) FILTER (WHERE m.to_status = 'completed') - count(*) FILTER (WHERE m.from_status = 'completed') AS d_completed,
                   count(*) FILTER (WHERE m.to_status = 'failed') - count(*) FILTER (WHERE m.from_status = 'failed') AS d_failed,
                   count(*) FILTER (WHERE m.to_status = 'cancelled') - count(*) FILTER (WHERE m.from_status = 'cancelled') AS d_cancelled,
                   bool_or(m.to_status = 'processing') AS claimed
              FROM unnest(p_moves) m
             GROUP BY 1, 2
        ), locked AS (
            SELECT k.job_id, k.slot
              FROM chunkq.job_chunk_counts k
             WHERE (k.job_id, k.slot) IN (SELECT d.job_id, d.slot FROM moved d)
             ORDER BY k.job_id, k.slot
               FOR UPDATE OF k
        ), counted AS (
            UPDATE chunkq.job_chunk_counts k
               SET pending = k.pending + d.d_pending,
                   processing = k.processing + d.d_processing,
                   completed = k.completed + d.d_completed,
                   failed = k.failed + d.d_failed,
                   cancelled = k.cancelled + d.d_cancelled,
                   -- Completions per minute, for job_overview's rate: this minute's and the last.
                   rate_minute = CASE WHEN d.d_completed > 0 THEN v_minute ELSE k.rate_minute END,
                   completed_this_minute = CASE
                       WHEN d.d_completed <= 0 THEN k.completed_this_minute
                       WHEN k.rate_minute = v_minute THEN k.completed_this_minute + d.d_completed
                       ELSE d.d_completed END,
                   completed_last_minute = CASE
                       WHEN d.d_completed <= 0 OR k.rate_minute = v_minute THEN k.completed_last_minute
                       WHEN k.rate_minute = v_minute - interval '1 minute' THEN k.completed_this_minute
                       ELSE 0 END,
                   last_completed_at = CASE WHEN d.d_completed > 0 THEN now() ELSE k.last_completed_at END
              FROM moved d JOIN locked l ON l.job_id = d.job_id AND l.slot = d.slot
             WHERE k.job_id = d.job_id AND k.slot = d.slot
            RETURNING k.job_id, k.pending + k.processing AS open_after, d.d_pending + d.d_processing AS d_open,
                      d.claimed
        ), by_job AS (
            SELECT c.job_id,
                   sum(CASE WHEN c.open_after = 0 AND c.d_open < 0 THEN -1  -- this row closed
                            WHEN c.open_after > 0 AND c.open_after = c.d_open THEN 1  -- it reopened
                            ELSE 0 END)::integer AS open_slots_delta,
                   bool_or(c.claimed) AS claimed
              FROM counted c
             GROUP BY c.job_id
        )
        SELECT b.job_id, b.open_slots_delta, b.claimed
          FROM by_job b
         WHERE b.open_slots_delta <> 0
            OR (b.claimed AND EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = b.job_id AND j.status = 'pending'))
         ORDER BY b.job_id
    LOOP
        RETURN QUERY SELECT * FROM chunkq._settle_job(v_job.job_id, v_job.open_slots_delta, v_job.claimed);
    END LOOP;
END $function$;
COMMENT ON FUNCTION chunkq._apply_chunk_moves(chunkq._chunk_move[]) IS
    'Internal: books status changes of chunks into job_chunk_counts in one statement, locking the counter rows in '
    '(job, slot) order, and settles the jobs whose counts opened or closed or that were just started (_settle_job).';

CREATE OR REPLACE FUNCTION chunkq._check_checkpoints(p_chunk_ids bigint[], p_positions bigint[], p_states jsonb[])
 RETURNS void
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
    v_max integer := (SELECT max_checkpoint_state_bytes FROM chunkq.settings);
    v_bad record;
BEGIN
    IF p_positions IS NULL THEN
        IF EXISTS (SELECT 1 FROM unnest(p_states) s WHERE s IS NOT NULL) THEN
            RAISE EXCEPTION 'a checkpoint state needs its position' USING ERRCODE = 'CQ001';
        END IF;
        RETURN;
    END IF;
    IF cardinality(p_positions) IS DISTINCT FROM cardinality(p_chunk_ids)
       OR (p_states IS NOT NULL AND cardinality(p_states) IS DISTINCT FROM cardinality(p_chunk_ids)) THEN
        RAISE EXCEPTION 'checkpoint positions and states must be one per chunk' USING ERRCODE = 'CQ001';
    END IF;
    SELECT w.chunk_id, w.position, c.image_start, c.image_end, octet_length(w.state::text) AS size
      INTO v_bad
      FROM unnest(p_chunk_ids, p_positions, p_states) AS w(chunk_id, position, state)
      LEFT JOIN chunkq.job_chunks c ON c.id = w.chunk_id
     WHERE (w.position IS NULL AND w.state IS NOT NULL)
        OR (w.position IS NOT NULL AND c.id IS NOT NULL AND w.position NOT BETWEEN c.image_start AND c.image_end)
        OR octet_length(w.state::text) > v_max
     LIMIT 1;
    IF FOUND THEN
        IF v_bad.position IS NULL THEN
            RAISE EXCEPTION 'chunk %: a checkpoint state needs its position', v_bad.chunk_id USING ERRCODE = 'CQ001';
        ELSIF v_bad.size > v_max THEN
            RAISE EXCEPTION 'chunk %: checkpoint state of % bytes, more than settings.max_checkpoint_state_bytes %',
                v_bad.chunk_id, v_bad.size, v_max USING ERRCODE = 'CQ001';
        END IF;
        RAISE EXCEPTION 'chunk %: checkpoint position % is outside its images % .. %',
            v_bad.chunk_id, v_bad.position, v_bad.image_start, v_bad.image_end USING ERRCODE = 'CQ001';
    END IF;
END $function$;
COMMENT ON FUNCTION chunkq._check_checkpoints(bigint[], bigint[], jsonb[]) IS
    'Internal: raises CQ001 for a checkpoint position outside its chunk''s images, a state without a position or a '
    'state larger than settings.max_checkpoint_state_bytes.';

CREATE OR REPLACE FUNCTION chunkq._check_chunk_jobs()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_jobs bigint[] := ARRAY(SELECT DISTINCT n.job_id FROM new_chunks n ORDER BY 1);
    v_locked integer;
    v_missing bigint;
BEGIN
    PERFORM 1 FROM chunkq.crawl_jobs j WHERE j.id = ANY (v_jobs) ORDER BY j.id FOR KEY SHARE OF j;
    GET DIAGNOSTICS v_locked = ROW_COUNT;
    IF v_locked < cardinality(v_jobs) THEN
        SELECT m INTO v_missing FROM unnest(v_jobs) m
         WHERE NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = m)
         ORDER BY m
         LIMIT 1;
        RAISE EXCEPTION 'insert into chunkq.job_chunks refers to crawl job %, which does not exist', v_missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $function$;
COMMENT ON FUNCTION chunkq._check_chunk_jobs() IS
    'Internal (trigger): every inserted chunk''s job exists; locks those jobs FOR KEY SHARE, as a foreign key would.';

CREATE OR REPLACE FUNCTION chunkq._check_failure_budget(p_job_id bigint)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_job chunkq.crawl_jobs;
    v_failed integer;
    v_in_a_row integer;
    v_reason text;
BEGIN
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF v_job.paused_at IS NOT NULL OR v_job.finished_at IS NOT NULL
       OR (v_job.max_failed_ratio IS NULL AND v_job.max_failed_chunks IS NULL
           AND v_job.max_consecutive_failures IS NULL) THEN
        RETURN;
    END IF;
    SELECT coalesce(sum(k.failed), 0) INTO v_failed FROM chunkq.job_chunk_counts k WHERE k.job_id = p_job_id;
    IF v_job.max_failed_chunks IS NOT NULL AND v_failed > v_job.max_failed_chunks THEN
        v_reason := format('failure budget: %s chunks failed, more than max_failed_chunks %s',
                           v_failed, v_job.max_failed_chunks);
    ELSIF v_job.max_failed_ratio IS NOT NULL AND v_failed > v_job.max_failed_ratio * v_job.total_chunks THEN
        v_reason := format('failure budget: %s of %s chunks failed, more than max_failed_ratio %s',
                           v_failed, v_job.total_chunks, v_job.max_failed_ratio);
    ELSIF v_job.max_consecutive_failures IS NOT NULL THEN
        SELECT count(*) INTO v_in_a_row
          FROM chunkq.chunk_errors e
         WHERE e.job_id = p_job_id AND NOT e.deferred AND NOT e.lease_expired
           AND e.failed_at > greatest((SELECT max(k.last_completed_at) FROM chunkq.job_chunk_counts k
                                        WHERE k.job_id = p_job_id),
                                      v_job.budget_reset_at, '-infinity');
        IF v_in_a_row >= v_job.max_consecutive_failures THEN
            v_reason := format('failure budget: %s attempts failed in a row with none completed', v_in_a_row);
        END IF;
    END IF;
    IF v_reason IS NULL THEN
        RETURN;
    END IF;
    UPDATE chunkq.job_chunks c SET available_at = 'infinity'
     WHERE c.id IN (SELECT p.id FROM chunkq.job_chunks p WHERE p.job_id = p_job_id AND p.status = 'pending'
                       FOR UPDATE SKIP LOCKED);
    UPDATE chunkq.crawl_jobs SET paused_at = now(), paused_reason = v_reason WHERE id = p_job_id;
    PERFORM pg_notify('chunkq_job_paused', json_build_object('job_id', p_job_id, 'reason', v_reason)::text);
END $function$;
COMMENT ON FUNCTION chunkq._check_failure_budget(bigint) IS
    'Internal: pauses a job whose failures passed its budget (max_failed_chunks, max_failed_ratio, '
    'max_consecutive_failures), records why in paused_reason and sends NOTIFY chunkq_job_paused with {"job_id": '
    '..., "reason": ...}.';

CREATE OR REPLACE FUNCTION chunkq._check_override(p_attempt integer)
 RETURNS void
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
    IF p_attempt IS NULL AND NOT chunkq._may_override() THEN
        RAISE EXCEPTION 'only chunkq_app may report on a chunk without its attempt'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Pass the attempt and the lease token the claim returned.';
    END IF;
END $function$;
COMMENT ON FUNCTION chunkq._check_override(integer) IS
    'Internal: raises insufficient_privilege when a NULL attempt (skip the fencing check) comes from a role that '
    'is not chunkq_app, a superuser or the schema owner.';

CREATE OR REPLACE FUNCTION chunkq._checkpointed_images(p_job_id bigint)
 RETURNS bigint
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT coalesce(sum(c.checkpoint_position - c.image_start + 1), 0)::bigint
      FROM chunkq.job_chunks c
     WHERE c.job_id = p_job_id AND c.checkpoint_position IS NOT NULL
       AND c.status IN ('pending', 'processing', 'failed');
$function$;
COMMENT ON FUNCTION chunkq._checkpointed_images(bigint) IS
    'Internal: images done by a job''s unfinished chunks, from their checkpoints (the job_chunks_checkpointed '
    'index: only those chunks).';
GRANT EXECUTE ON FUNCTION chunkq._checkpointed_images(bigint) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq._claim_allowances(p_limit integer, p_job_id bigint)
 RETURNS TABLE(job_id bigint, allowance integer)
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_job record;
    v_key chunkq.rate_limits;
    v_allow integer;
    v_running integer;
    v_key_left jsonb := '{}';  -- what the keys seen so far still allow: {"key": n}
BEGIN
    FOR v_job IN
        SELECT j.id, j.max_running, j.rate_key FROM chunkq.crawl_jobs j
         WHERE j.limited AND j.finished_at IS NULL AND j.paused_at IS NULL
           AND (p_job_id IS NULL OR j.id = p_job_id)
         ORDER BY j.priority DESC, j.id
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext('chunkq.claim'), (v_job.id & 2147483647)::integer);
        v_allow := p_limit;
        IF v_job.max_running IS NOT NULL THEN
            SELECT coalesce(sum(k.processing), 0) INTO v_running FROM chunkq.job_chunk_counts k WHERE k.job_id = v_job.id;
            v_allow := least(v_allow, v_job.max_running - v_running);
        END IF;
        IF v_job.rate_key IS NOT NULL AND v_allow > 0 THEN
            IF NOT v_key_left ? v_job.rate_key THEN
                IF NOT pg_try_advisory_xact_lock(hashtext('chunkq.rate_key'), hashtext(v_job.rate_key)) THEN
                    v_key_left := v_key_left || jsonb_build_object(v_job.rate_key, 0);
                ELSE
                    SELECT * INTO v_key FROM chunkq.rate_limits r WHERE r.key = v_job.rate_key;
                    IF NOT FOUND THEN
                        v_key_left := v_key_left || jsonb_build_object(v_job.rate_key, p_limit);
                    ELSIF v_key.blocked_until > clock_timestamp() THEN
                        v_key_left := v_key_left || jsonb_build_object(v_job.rate_key, 0);
                    ELSE
                        v_running := p_limit;
                        IF v_key.max_running IS NOT NULL THEN
                            SELECT v_key.max_running - coalesce(sum(k.processing), 0) INTO v_running
                              FROM chunkq.crawl_jobs j JOIN chunkq.job_chunk_counts k ON k.job_id = j.id
                             WHERE j.rate_key = v_job.rate_key AND j.finished_at IS NULL;
                        END IF;
                        IF v_key.rate IS NOT NULL THEN
                            v_running := least(v_running, floor(least(
                                v_key.burst,
                                v_key.tokens + v_key.rate * extract(epoch FROM clock_timestamp() - v_key.refilled_at)
                            ))::integer);
                        END IF;
                        v_key_left := v_key_left || jsonb_build_object(v_job.rate_key, greatest(v_running, 0));
                    END IF;
                END IF;
            END IF;
            v_allow := least(v_allow, (v_key_left ->> v_job.rate_key)::integer);
        END IF;
        CONTINUE WHEN v_allow <= 0;
        job_id := v_job.id;
        allowance := v_allow;
        RETURN NEXT;
        IF v_job.rate_key IS NOT NULL THEN  -- what this job may take, the next job of the key may not
            v_key_left := v_key_left
                || jsonb_build_object(v_job.rate_key, (v_key_left ->> v_job.rate_key)::integer - v_allow);
        END IF;
    END LOOP;
END $function$;
COMMENT ON FUNCTION chunkq._claim_allowances(integer, bigint) IS
    'Internal: for a claim of p_limit chunks, how many chunks of each limited job it may take under the job''s cap '
    'and its key''s bucket, cap and block, holding (try-locked) the job and key so no other claim counts them at '
    'the same time.';

CREATE OR REPLACE FUNCTION chunkq._clip_error(p_error text)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
    v_max integer := (SELECT max_error_length FROM chunkq.settings);
    v_error text := coalesce(nullif(p_error, ''), '(no error message)');
BEGIN
    IF length(v_error) <= v_max THEN
        RETURN v_error;
    END IF;
    RETURN left(v_error, v_max) || format(' [... %s more characters cut]', length(v_error) - v_max);
END $function$;
COMMENT ON FUNCTION chunkq._clip_error(text) IS
    'Internal: an error message fit to store: empty becomes "(no error message)", long ones are cut to '
    'settings.max_error_length with a note.';

CREATE OR REPLACE FUNCTION chunkq._complete_and_claim(p_chunk_ids bigint[], p_attempts integer[], p_worker_id text, p_limit integer, p_job_id bigint, p_lease interval, p_lease_tokens uuid[] DEFAULT NULL::uuid[])
 RETURNS SETOF chunkq.job_chunks
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_waived constant boolean := CASE WHEN cardinality(p_chunk_ids) > 0
                                           AND (p_lease_tokens IS NULL OR array_position(p_lease_tokens, NULL) IS NOT NULL)
                                      THEN chunkq._may_override() ELSE false END;
    v_reclaimed chunkq._chunk_move[] := '{}';
    v_limited_jobs bigint[] := '{}';
    v_job_limited boolean := false;
    v_allowances integer[] := '{}';
    v_done bigint[];
    v_taken chunkq.job_chunks[];
    v_moves chunkq._chunk_move[];
    v_refused record;
BEGIN
    -- Abandoned chunks first, so that they can be claimed again right away.
    IF (SELECT min(c.lease_expires_at) FROM chunkq.job_chunks c) < now() THEN
        v_reclaimed := ARRAY(SELECT m FROM chunkq._reclaim_expired(100) m);
    END IF;
    -- Limited jobs, if any is open (one probe of a small partial index otherwise).
    IF p_job_id IS NOT NULL THEN
        v_job_limited := coalesce((SELECT j.limited FROM chunkq.crawl_jobs j WHERE j.id = p_job_id), false);
    END IF;
    IF p_limit > 0 AND (v_job_limited  -- (a --job claim needs no other probe)
                        OR p_job_id IS NULL AND EXISTS (SELECT 1 FROM chunkq.crawl_jobs j
                                                         WHERE j.limited AND j.finished_at IS NULL
                                                           AND j.paused_at IS NULL)) THEN
        SELECT coalesce(array_agg(a.job_id), '{}'), coalesce(array_agg(a.allowance), '{}')
          INTO v_limited_jobs, v_allowances
          FROM chunkq._claim_allowances(p_limit, p_job_id) a;
    END IF;

    IF cardinality(v_limited_jobs) = 0 THEN
    -- The common claim (no limited job to take from): the statement below without
    -- picked_limited and chosen, which would be empty or change nothing here
    -- (picked and picked_of_job exclude each other, and each takes p_limit at most).
    -- Its generic plan has fewer nodes to start and stop on every call: measurably
    -- less time in this function at one chunk per claim.
    WITH done AS (
        UPDATE chunkq.job_chunks c
           SET status = 'completed', lease_expires_at = NULL, finished_at = now()
         WHERE c.id = ANY (p_chunk_ids) AND c.status = 'processing'
           AND c.attempt = p_attempts[array_position(p_chunk_ids, c.id)]
           AND (c.lease_token = p_lease_tokens[array_position(p_chunk_ids, c.id)] OR v_waived)
        RETURNING c.id, c.job_id, c.chunk_index
    ), picked AS (
        SELECT c.id, c.job_id FROM chunkq.job_chunks c
         WHERE p_job_id IS NULL AND NOT c.limited
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
         ORDER BY c.priority DESC, c.vpos, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), parked AS (
        UPDATE chunkq.job_chunks c SET available_at = 'infinity'
         WHERE c.id = ANY (ARRAY(SELECT p.id FROM picked p JOIN chunkq.crawl_jobs j ON j.id = p.job_id
                                  WHERE j.paused_at IS NOT NULL))
        RETURNING c.id
    ), picked_of_job AS (
        SELECT c.id FROM chunkq.job_chunks c
         WHERE p_job_id IS NOT NULL AND NOT v_job_limited AND c.job_id = p_job_id
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
           AND NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = p_job_id AND j.paused_at IS NOT NULL)
         ORDER BY c.priority DESC, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), taken AS (
        SELECT t AS chunk
          FROM chunkq._take_chunks(ARRAY(SELECT p.id FROM picked p WHERE p.id NOT IN (SELECT k.id FROM parked k)
                                         UNION ALL SELECT p.id FROM picked_of_job p),
                                   p_worker_id, v_lease, NULL) t
    )
    SELECT (SELECT coalesce(array_agg(d.id), '{}') FROM done d),
           (SELECT coalesce(array_agg(t.chunk ORDER BY (t.chunk).priority DESC, (t.chunk).vpos, (t.chunk).id), '{}')
              FROM taken t),
           v_reclaimed
           || ARRAY(SELECT (d.job_id, d.chunk_index, 'processing', 'completed')::chunkq._chunk_move FROM done d)
           || ARRAY(SELECT ((t.chunk).job_id, (t.chunk).chunk_index, 'pending', 'processing')::chunkq._chunk_move
                      FROM taken t)
      INTO v_done, v_taken, v_moves;
    ELSE
    WITH done AS (
        UPDATE chunkq.job_chunks c
           SET status = 'completed', lease_expires_at = NULL, finished_at = now()
         WHERE c.id = ANY (p_chunk_ids) AND c.status = 'processing'
           AND c.attempt = p_attempts[array_position(p_chunk_ids, c.id)]
           AND (c.lease_token = p_lease_tokens[array_position(p_chunk_ids, c.id)] OR v_waived)
        RETURNING c.id, c.job_id, c.chunk_index
    ), picked AS (
        -- By the claim index alone, whatever the statistics say (no join to plan around).
        SELECT c.id, c.job_id, c.priority, c.vpos FROM chunkq.job_chunks c
         WHERE p_job_id IS NULL AND NOT c.limited
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
         ORDER BY c.priority DESC, c.vpos, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), parked AS (
        -- A paused job's pending chunks wait outside the claim indexes (available_at =
        -- infinity); one that came back since (released, retried, reclaimed) is parked
        -- there now, and not taken. (By id from an array, so that no plan, even one made
        -- on an empty table, joins the whole table to find them.)
        UPDATE chunkq.job_chunks c SET available_at = 'infinity'
         WHERE c.id = ANY (ARRAY(SELECT p.id FROM picked p JOIN chunkq.crawl_jobs j ON j.id = p.job_id
                                  WHERE j.paused_at IS NOT NULL))
        RETURNING c.id
    ), picked_of_job AS (
        -- (A limited job's chunks come from picked_limited, under its limits.)
        SELECT c.id, c.priority, c.vpos FROM chunkq.job_chunks c
         WHERE p_job_id IS NOT NULL AND NOT v_job_limited AND c.job_id = p_job_id
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
           AND NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = p_job_id AND j.paused_at IS NOT NULL)
         ORDER BY c.priority DESC, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), picked_limited AS (
        SELECT l.id, l.priority, l.vpos
          FROM unnest(v_limited_jobs, v_allowances) AS a(job_id, allowance),
               LATERAL (SELECT c.id, c.priority, c.vpos FROM chunkq.job_chunks c
                         WHERE c.job_id = a.job_id
                           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
                         ORDER BY c.priority DESC, c.id
                         LIMIT a.allowance
                           FOR UPDATE OF c SKIP LOCKED) l
    ), chosen AS (
        SELECT p.id FROM (SELECT p.id, p.priority, p.vpos FROM picked p WHERE p.id NOT IN (SELECT k.id FROM parked k)
                          UNION ALL SELECT * FROM picked_of_job
                          UNION ALL SELECT * FROM picked_limited) p
         ORDER BY p.priority DESC, p.vpos, p.id
         LIMIT p_limit
    ), taken AS (
        SELECT t AS chunk FROM chunkq._take_chunks(ARRAY(SELECT h.id FROM chosen h), p_worker_id, v_lease, NULL) t
    )
    SELECT (SELECT coalesce(array_agg(d.id), '{}') FROM done d),
           (SELECT coalesce(array_agg(t.chunk ORDER BY (t.chunk).priority DESC, (t.chunk).vpos, (t.chunk).id), '{}')
              FROM taken t),
           v_reclaimed
           || ARRAY(SELECT (d.job_id, d.chunk_index, 'processing', 'completed')::chunkq._chunk_move FROM done d)
           || ARRAY(SELECT ((t.chunk).job_id, (t.chunk).chunk_index, 'pending', 'processing')::chunkq._chunk_move
                      FROM taken t)
      INTO v_done, v_taken, v_moves;
    END IF;

    -- All or nothing: raising undoes the statement above along with everything else.
    IF cardinality(v_done) < cardinality(p_chunk_ids) THEN
        IF (SELECT count(DISTINCT i) FROM unnest(p_chunk_ids) i) < cardinality(p_chunk_ids) THEN
            RAISE EXCEPTION 'a chunk is listed twice' USING ERRCODE = 'CQ001';
        END IF;
        SELECT r.id, r.attempt, r.lease_token INTO v_refused
          FROM unnest(p_chunk_ids, p_attempts, p_lease_tokens) WITH ORDINALITY AS r(id, attempt, lease_token, n)
         WHERE r.id <> ALL (v_done)
         ORDER BY r.n
         LIMIT 1;
        PERFORM chunkq._refuse_report(v_refused.id, v_refused.attempt, 'complete', v_refused.lease_token);
    END IF;
    IF cardinality(v_taken) = 0 AND p_job_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF cardinality(v_limited_jobs) > 0 THEN
        PERFORM chunkq._spend_tokens(v_taken);
    END IF;
    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_taken);
END $function$;
COMMENT ON FUNCTION chunkq._complete_and_claim(bigint[], integer[], text, integer, bigint, interval, uuid[]) IS
    'Internal: the work of complete_and_claim and claim_chunks (arguments checked by them): reclaims expired '
    'leases, completes the listed chunks held at their attempts and lease tokens, leases up to p_limit claimable '
    'chunks (0: none) in fair order under the jobs'' and keys'' limits, and books every move; raises the error of '
    'the first listed chunk that is no longer held.';

CREATE OR REPLACE FUNCTION chunkq._completed_images(p_job chunkq.crawl_jobs, p_completed bigint)
 RETURNS bigint
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT p_completed * p_job.chunk_size
           - CASE WHEN EXISTS (SELECT 1 FROM chunkq.job_chunks c
                                WHERE c.job_id = p_job.id AND c.chunk_index = p_job.total_chunks - 1
                                  AND c.status = 'completed')
                  THEN p_job.total_chunks::bigint * p_job.chunk_size - p_job.max_images
                  ELSE 0 END;
$function$;
COMMENT ON FUNCTION chunkq._completed_images(chunkq.crawl_jobs, bigint) IS
    'Internal: images in a job''s p_completed completed chunks (one key lookup for the shorter last chunk).';
GRANT EXECUTE ON FUNCTION chunkq._completed_images(chunkq.crawl_jobs, bigint) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq._connected_workers()
 RETURNS TABLE(worker_id text, pid integer, backend_start timestamp with time zone)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT substr(a.application_name, length('chunkq worker ') + 1), a.pid, a.backend_start
      FROM pg_catalog.pg_stat_activity a
     WHERE a.datname = current_database() AND a.application_name LIKE 'chunkq worker %';
$function$;
COMMENT ON FUNCTION chunkq._connected_workers() IS
    'Internal: worker connections to this database, from pg_stat_activity, for live_workers.';
GRANT EXECUTE ON FUNCTION chunkq._connected_workers() TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq._counter_slots()
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$SELECT 16$function$;
COMMENT ON FUNCTION chunkq._counter_slots() IS
    'Internal: how many job_chunk_counts rows a job''s chunks are spread over (slot = chunk_index % 16).';

CREATE OR REPLACE FUNCTION chunkq._delete_chunks_of_jobs()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    DELETE FROM chunkq.job_chunks c USING deleted_jobs d WHERE c.job_id = d.id;
    RETURN NULL;
END $function$;
COMMENT ON FUNCTION chunkq._delete_chunks_of_jobs() IS
    'Internal (trigger): deleting jobs deletes their chunks, as ON DELETE CASCADE did.';

CREATE OR REPLACE FUNCTION chunkq._lease(p_lease interval)
 RETURNS interval
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
    v_lease interval := coalesce(p_lease, (SELECT default_lease FROM chunkq.settings));
BEGIN
    IF v_lease <= '0'::interval THEN
        RAISE EXCEPTION 'lease must be positive, got %', v_lease USING ERRCODE = 'CQ001';
    END IF;
    RETURN v_lease;
END $function$;
COMMENT ON FUNCTION chunkq._lease(interval) IS
    'Internal: the lease to grant: p_lease, or settings.default_lease when NULL; raises CQ001 unless positive.';

CREATE OR REPLACE FUNCTION chunkq._lock_job(p_job_id bigint)
 RETURNS void
 LANGUAGE sql
AS $function$
    SELECT pg_advisory_xact_lock(hashtext('chunkq.job'), (p_job_id & 2147483647)::integer);
$function$;
COMMENT ON FUNCTION chunkq._lock_job(bigint) IS
    'Internal: serialises the job-level operations (create_chunks, retry_chunk, cancel_job) on one job until '
    'commit. Workers'' claims and completions never take it.';

CREATE OR REPLACE FUNCTION chunkq._may_override()
 RETURNS boolean
 LANGUAGE sql
 STABLE
AS $function$
    SELECT pg_has_role(session_user, 'chunkq_app', 'USAGE')
        OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = session_user)
        OR pg_has_role(session_user, (SELECT n.nspowner FROM pg_catalog.pg_namespace n
                                       WHERE n.nspname = 'chunkq'), 'USAGE');
$function$;
COMMENT ON FUNCTION chunkq._may_override() IS
    'Internal: true when the session''s user may report on a chunk without the attempt or lease token its claim '
    'returned: chunkq_app, a superuser, the schema''s owner.';

CREATE OR REPLACE FUNCTION chunkq._notify_claimable(p_job_id bigint, p_count integer)
 RETURNS void
 LANGUAGE sql
AS $function$
    SELECT pg_notify('chunkq_claimable', json_build_object('job_id', p_job_id, 'chunks', p_count)::text);
$function$;
COMMENT ON FUNCTION chunkq._notify_claimable(bigint, integer) IS
    'Internal: NOTIFY chunkq_claimable with {"job_id": ..., "chunks": n} when chunks become claimable, so idle '
    'workers that LISTEN wake at once instead of at their next poll. Sent on commit.';

CREATE OR REPLACE FUNCTION chunkq._outcome(p_chunk chunkq.job_chunks, p_from chunkq.chunk_status)
 RETURNS chunkq.chunk_outcome
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
DECLARE
    v_move record;
BEGIN
    SELECT * INTO v_move
      FROM chunkq._apply_chunk_moves(ARRAY[(p_chunk.job_id, p_chunk.chunk_index, p_from, p_chunk.status)::chunkq._chunk_move]);
    IF NOT FOUND THEN
        -- No slot opened or closed: the job's status is unchanged.
        SELECT p_chunk.job_id AS job, j.status AS job_status, false AS finished INTO v_move
          FROM chunkq.crawl_jobs j WHERE j.id = p_chunk.job_id;
    END IF;
    RETURN (p_chunk.id, p_chunk.job_id, p_chunk.status, p_chunk.attempt, p_chunk.retry_count,
            p_chunk.available_at, v_move.job_status, v_move.finished)::chunkq.chunk_outcome;
END $function$;
COMMENT ON FUNCTION chunkq._outcome(chunkq.job_chunks, chunkq.chunk_status) IS
    'Internal: books one chunk''s move from p_from to its current status and reports the outcome.';

CREATE OR REPLACE FUNCTION chunkq._queue_front(p_priority integer)
 RETURNS double precision
 LANGUAGE sql
 STABLE
AS $function$
    SELECT coalesce(least(
        (SELECT c.vpos FROM chunkq.job_chunks c
          WHERE c.status = 'pending' AND c.available_at < 'infinity' AND NOT c.limited AND c.priority = p_priority
          ORDER BY c.priority DESC, c.vpos LIMIT 1),
        (SELECT c.vpos FROM chunkq.job_chunks c
          WHERE c.status = 'pending' AND c.available_at < 'infinity' AND c.limited AND c.priority = p_priority
          ORDER BY c.priority DESC, c.vpos LIMIT 1)), 0);
$function$;
COMMENT ON FUNCTION chunkq._queue_front(integer) IS
    'Internal: the lowest virtual position among claimable chunks of a priority (0 when there are none).';

CREATE OR REPLACE FUNCTION chunkq._reclaim_expired(p_limit integer)
 RETURNS SETOF chunkq._chunk_move
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
-- Takes back abandoned chunks and records each lapse; the caller books the moves.
DECLARE
    v_moves chunkq._chunk_move[];
    v_pending integer;
BEGIN
    -- Nearly always nothing has expired: find that out from the first index entry.
    IF NOT coalesce((SELECT min(c.lease_expires_at) FROM chunkq.job_chunks c) < now(), false) THEN
        RETURN;
    END IF;
    WITH expired AS (
        SELECT c.id, c.attempt, c.worker_id, c.lease_expires_at
          FROM chunkq.job_chunks c
         WHERE c.lease_expires_at < now()  -- only processing chunks have a lease
         ORDER BY c.lease_expires_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), reclaimed AS (
        UPDATE chunkq.job_chunks c
           SET status = CASE WHEN c.retry_count < j.max_retries THEN 'pending' ELSE 'failed' END::chunkq.chunk_status,
               retry_count = CASE WHEN c.retry_count < j.max_retries THEN c.retry_count + 1 ELSE c.retry_count END,
               error_message = format('lease expired at %s: worker %s stopped heartbeating during attempt %s',
                                      e.lease_expires_at, e.worker_id, e.attempt),
               lease_expires_at = NULL,
               available_at = now(),
               finished_at = CASE WHEN c.retry_count < j.max_retries THEN NULL ELSE now() END
          FROM expired e, chunkq.crawl_jobs j
         WHERE c.id = e.id AND j.id = c.job_id
        RETURNING c.id, c.job_id, c.chunk_index, c.status, c.error_message, e.attempt, e.worker_id
    ), logged AS (
        INSERT INTO chunkq.chunk_errors (chunk_id, job_id, attempt, worker_id, error, lease_expired, retried)
        SELECT r.id, r.job_id, r.attempt, r.worker_id, r.error_message, true, r.status = 'pending'
          FROM reclaimed r
    )
    SELECT coalesce(array_agg((r.job_id, r.chunk_index, 'processing', r.status)::chunkq._chunk_move), '{}')
      INTO v_moves
      FROM reclaimed r;

    v_pending := (SELECT count(*) FROM unnest(v_moves) m WHERE m.to_status = 'pending');
    IF v_pending > 0 THEN
        PERFORM chunkq._notify_claimable(NULL, v_pending);
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_moves);
END $function$;
COMMENT ON FUNCTION chunkq._reclaim_expired(integer) IS
    'Internal: the work of reclaim_expired_chunks, leaving the booking of the moves to the caller.';

CREATE OR REPLACE FUNCTION chunkq._refresh_statistics(p_new_chunks integer)
 RETURNS boolean
 LANGUAGE plpgsql
 SET lock_timeout TO '100ms'
AS $function$
BEGIN
    -- Autovacuum's own rule: analyze once more rows changed than threshold + scale factor x rows.
    IF p_new_chunks <= current_setting('autovacuum_analyze_threshold')::integer
                       + current_setting('autovacuum_analyze_scale_factor')::double precision
                         * greatest((SELECT c.reltuples FROM pg_catalog.pg_class c
                                      WHERE c.oid = 'chunkq.job_chunks'::regclass), 0) THEN
        RETURN false;
    END IF;
    -- The columns the API's plans filter on (fewer columns, less work); it counts the
    -- rows this transaction inserted.
    ANALYZE chunkq.job_chunks (job_id, status, priority, available_at, lease_expires_at), chunkq.job_chunk_counts;
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;  -- a VACUUM or ANALYZE holds the table: it refreshes the statistics itself
END $function$;
COMMENT ON FUNCTION chunkq._refresh_statistics(integer) IS
    'Internal: analyzes job_chunks and job_chunk_counts when p_new_chunks is more than autovacuum would let pass '
    '(autovacuum_analyze_threshold + autovacuum_analyze_scale_factor x rows), so that the plans sessions cache fit '
    'the table; gives up after 100 ms waiting for a running VACUUM or ANALYZE. True if it analyzed.';

CREATE OR REPLACE FUNCTION chunkq._refuse_job_change()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    RAISE EXCEPTION 'a chunk cannot move to another job, nor a job change its id (table %)', TG_TABLE_NAME
        USING ERRCODE = 'foreign_key_violation';
END $function$;
COMMENT ON FUNCTION chunkq._refuse_job_change() IS 'Internal (trigger): job ids of jobs and chunks never change.';

CREATE OR REPLACE FUNCTION chunkq._refuse_report(p_chunk_id bigint, p_attempt integer, p_action text, p_lease_token uuid)
 RETURNS void
 LANGUAGE plpgsql
 STABLE
AS $function$
-- Called when heartbeat/complete/fail/release matched no row: say precisely why.
DECLARE
    v_chunk chunkq.job_chunks;
BEGIN
    SELECT * INTO v_chunk FROM chunkq.job_chunks WHERE id = p_chunk_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunk % does not exist', p_chunk_id USING ERRCODE = 'CQ003';
    END IF;
    IF v_chunk.status = 'cancelled' THEN
        RAISE EXCEPTION 'cannot % chunk %: it was cancelled with job %', p_action, p_chunk_id, v_chunk.job_id
            USING ERRCODE = 'CQ007';
    END IF;
    -- A stale attempt: a newer attempt exists, or this attempt's lease lapsed and
    -- reclaim_expired_chunks took the chunk back.
    IF p_attempt IS NOT NULL AND (
           v_chunk.attempt <> p_attempt
           OR EXISTS (SELECT 1 FROM chunkq.chunk_errors e
                       WHERE e.chunk_id = p_chunk_id AND e.attempt = p_attempt AND e.lease_expired)) THEN
        RAISE EXCEPTION 'cannot % chunk % as attempt %: its lease expired and the chunk was reclaimed',
            p_action, p_chunk_id, p_attempt
            USING ERRCODE = 'CQ006',
                  DETAIL = format('The chunk is now %s at attempt %s (worker %s).', v_chunk.status,
                                  v_chunk.attempt, coalesce(v_chunk.worker_id, '-'));
    END IF;
    -- The right attempt of a processing chunk, so the token was missing or wrong:
    -- the caller is not the worker that claimed it (a guessed attempt).
    IF v_chunk.status = 'processing' THEN
        RAISE EXCEPTION 'cannot % chunk % as attempt %: the report does not carry the lease token of that claim',
            p_action, p_chunk_id, coalesce(p_attempt::text, 'NULL')
            USING ERRCODE = 'CQ006',
                  DETAIL = format('The chunk is held by worker %s.', v_chunk.worker_id),
                  HINT = 'Only the worker that claimed a chunk may report on it, with the lease_token its claim '
                         'returned.';
    END IF;
    RAISE EXCEPTION 'cannot % chunk %: it is %, not processing', p_action, p_chunk_id, v_chunk.status
        USING ERRCODE = 'CQ004';
END $function$;
COMMENT ON FUNCTION chunkq._refuse_report(bigint, integer, text, uuid) IS
    'Internal: raises the precise error for a heartbeat, complete, fail or release that matched no chunk: CQ003 '
    'unknown chunk, CQ007 cancelled, CQ006 lease lost (stale attempt, or not the claim''s lease token), CQ004 not '
    'processing.';

CREATE OR REPLACE FUNCTION chunkq._requeue_job(p_job_id bigint, p_weight real)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_priority integer;
    v_front double precision;
    v_first integer;
BEGIN
    SELECT c.priority, min(c.chunk_index) INTO v_priority, v_first
      FROM chunkq.job_chunks c WHERE c.job_id = p_job_id AND c.status = 'pending'
     GROUP BY c.priority ORDER BY c.priority DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- The front without this job's own chunks, which are about to move.
    v_front := coalesce((SELECT min(c.vpos) FROM chunkq.job_chunks c
                          WHERE c.status = 'pending' AND c.available_at < 'infinity' AND c.priority = v_priority
                            AND c.job_id <> p_job_id), chunkq._queue_front(v_priority));
    UPDATE chunkq.job_chunks c SET vpos = v_front + (c.chunk_index - v_first) / p_weight
     WHERE c.job_id = p_job_id AND c.status = 'pending';
END $function$;
COMMENT ON FUNCTION chunkq._requeue_job(bigint, real) IS
    'Internal: gives a job''s pending chunks new virtual positions from the front of their priority''s queue, spaced '
    'by 1 / p_weight.';

CREATE OR REPLACE FUNCTION chunkq._retry_delay(p_retry_count integer, p_base_delay interval)
 RETURNS interval
 LANGUAGE sql
AS $function$
    SELECT LEAST(s.retry_max_delay, b.base * power(2, LEAST(p_retry_count, 30))) + b.base * random()
      FROM chunkq.settings s, LATERAL (SELECT coalesce(p_base_delay, s.retry_base_delay) AS base) b;
$function$;
COMMENT ON FUNCTION chunkq._retry_delay(integer, interval) IS
    'Internal: wait before automatic retry number p_retry_count + 1: the job''s base delay (NULL: '
    'settings.retry_base_delay) doubled per earlier retry, capped at settings.retry_max_delay, plus up to one base '
    'delay of random jitter.';

CREATE OR REPLACE FUNCTION chunkq._set_limited(p_job_id bigint, p_limited boolean)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
BEGIN
    UPDATE chunkq.job_chunks c SET limited = p_limited
     WHERE c.job_id = p_job_id AND c.status IN ('pending', 'processing', 'failed') AND c.limited <> p_limited;
    UPDATE chunkq.crawl_jobs j SET limited = p_limited WHERE j.id = p_job_id AND j.limited <> p_limited;
END $function$;
COMMENT ON FUNCTION chunkq._set_limited(bigint, boolean) IS
    'Internal: marks a job and its open chunks limited (claimed under limits, apart) or not.';

CREATE OR REPLACE FUNCTION chunkq._settle_job(p_job_id bigint, p_open_slots_delta integer, p_claimed boolean)
 RETURNS TABLE(job bigint, job_status chunkq.job_status, finished boolean)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
-- The job's side of _apply_chunk_moves: p_open_slots_delta counter rows of the
-- job opened (+) or closed (-), and p_claimed says whether a chunk was claimed.
DECLARE
    v_job chunkq.crawl_jobs;
BEGIN
    IF p_open_slots_delta = 0 THEN
        IF p_claimed THEN
            -- Only a job's first claims find it pending and write to it; later claims
            -- just read the row. SKIP LOCKED: if another first claim is starting the
            -- job right now, leave it to that one rather than queue behind it (claims
            -- never wait). Should that claim roll back, the next claim starts the job.
            UPDATE chunkq.crawl_jobs j
               SET status = 'running', started_at = now()
             WHERE j.id = (SELECT p.id FROM chunkq.crawl_jobs p
                            WHERE p.id = p_job_id AND p.status = 'pending'
                              FOR NO KEY UPDATE SKIP LOCKED);
        END IF;
        RETURN;
    END IF;

    UPDATE chunkq.crawl_jobs j SET open_slots = j.open_slots + p_open_slots_delta
     WHERE j.id = p_job_id
    RETURNING j.* INTO v_job;
    IF v_job.open_slots = 0 THEN
        -- This call closed the job's last open slot, so it alone finishes the job.
        -- Being a new statement, this UPDATE sees every counter change committed
        -- before the row lock above was granted.
        UPDATE chunkq.crawl_jobs j
           SET status = CASE
                   WHEN EXISTS (SELECT 1 FROM chunkq.job_chunk_counts k WHERE k.job_id = j.id AND k.cancelled > 0)
                       THEN 'cancelled'
                   WHEN EXISTS (SELECT 1 FROM chunkq.job_chunk_counts k WHERE k.job_id = j.id AND k.failed > 0)
                       THEN 'failed'
                   ELSE 'completed'
               END::chunkq.job_status,
               finished_at = now()
         WHERE j.id = p_job_id
        RETURNING j.* INTO v_job;
        PERFORM pg_notify('chunkq_job_finished', json_build_object('job_id', v_job.id, 'status', v_job.status)::text);
        RETURN QUERY SELECT v_job.id, v_job.status, true;
    ELSIF v_job.open_slots = p_open_slots_delta AND v_job.finished_at IS NOT NULL THEN
        -- A retried chunk reopened a finished job.
        IF v_job.status = 'cancelled' THEN
            RAISE EXCEPTION 'crawl job % is cancelled', v_job.id USING ERRCODE = 'CQ004';
        END IF;
        UPDATE chunkq.crawl_jobs j SET status = 'running', finished_at = NULL
         WHERE j.id = p_job_id
        RETURNING j.* INTO v_job;
        RETURN QUERY SELECT v_job.id, v_job.status, false;
    ELSE
        RETURN QUERY SELECT v_job.id, v_job.status, false;
    END IF;
END $function$;
COMMENT ON FUNCTION chunkq._settle_job(bigint, integer, boolean) IS
    'Internal: moves a job along after its counter rows changed: started on its first claim; finished exactly once '
    'when its last open counter row closes (cancelled if any chunk was cancelled, else failed if any failed, else '
    'completed; NOTIFY chunkq_job_finished with {"job_id": ..., "status": ...}); running again when a retried '
    'chunk reopens it.';

CREATE OR REPLACE FUNCTION chunkq._spend_tokens(p_taken chunkq.job_chunks[])
 RETURNS void
 LANGUAGE sql
AS $function$
    UPDATE chunkq.rate_limits r
       SET tokens = least(r.burst, r.tokens + r.rate * extract(epoch FROM clock_timestamp() - r.refilled_at)) - t.n,
           refilled_at = clock_timestamp()
      FROM (SELECT j.rate_key, count(*) AS n
              FROM unnest(p_taken) c JOIN chunkq.crawl_jobs j ON j.id = c.job_id
             WHERE c.limited AND j.rate_key IS NOT NULL
             GROUP BY j.rate_key) t
     WHERE r.key = t.rate_key AND r.rate IS NOT NULL;
$function$;
COMMENT ON FUNCTION chunkq._spend_tokens(chunkq.job_chunks[]) IS
    'Internal: takes one token per claimed chunk from the buckets of the rate keys of their jobs.';

CREATE OR REPLACE FUNCTION chunkq._take_chunks(p_ids bigint[], p_worker_id text, p_lease interval, p_task_id text)
 RETURNS SETOF chunkq.job_chunks
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
-- Turns locked pending chunks into processing ones leased to p_worker_id. The
-- caller books the moves (pending -> processing) with its other moves.
DECLARE
    v_worker text := coalesce(nullif(btrim(p_worker_id), ''), session_user || '@backend-' || pg_backend_pid());
BEGIN
    RETURN QUERY
    UPDATE chunkq.job_chunks c
       SET status = 'processing',
           attempt = c.attempt + 1,
           lease_token = gen_random_uuid(),
           worker_id = v_worker,
           task_id = p_task_id,
           lease_expires_at = now() + p_lease,
           claimed_at = now(),
           heartbeat_at = now()
     WHERE c.id = ANY (p_ids)
    RETURNING c.*;
END $function$;
COMMENT ON FUNCTION chunkq._take_chunks(bigint[], text, interval, text) IS
    'Internal: leases the given locked pending chunks to a worker for p_lease (attempt + 1, a new lease token); '
    'the caller books it.';

CREATE OR REPLACE FUNCTION chunkq._validate_limits(p_max_running integer, p_rate_key text, p_weight double precision, p_max_failed_ratio double precision, p_max_failed_chunks integer, p_max_consecutive_failures integer)
 RETURNS void
 LANGUAGE plpgsql
 IMMUTABLE
AS $function$
BEGIN
    IF p_max_running < 1 THEN
        RAISE EXCEPTION 'max_running must be at least 1, got %', p_max_running USING ERRCODE = 'CQ001';
    END IF;
    IF btrim(p_rate_key) = '' OR length(p_rate_key) > 200 THEN
        RAISE EXCEPTION 'a rate key must be 1 to 200 characters and not blank' USING ERRCODE = 'CQ001';
    END IF;
    IF NOT (p_weight > 0 AND p_weight <= 1000) THEN
        RAISE EXCEPTION 'weight must be more than 0 and at most 1000, got %', p_weight USING ERRCODE = 'CQ001';
    END IF;
    IF NOT (p_max_failed_ratio > 0 AND p_max_failed_ratio <= 1) THEN
        RAISE EXCEPTION 'max_failed_ratio must be more than 0 and at most 1, got %', p_max_failed_ratio
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_max_failed_chunks < 1 THEN
        RAISE EXCEPTION 'max_failed_chunks must be at least 1, got %', p_max_failed_chunks USING ERRCODE = 'CQ001';
    END IF;
    IF p_max_consecutive_failures < 1 THEN
        RAISE EXCEPTION 'max_consecutive_failures must be at least 1, got %', p_max_consecutive_failures
            USING ERRCODE = 'CQ001';
    END IF;
END $function$;
COMMENT ON FUNCTION chunkq._validate_limits(integer, text, double precision, double precision, integer, integer) IS
    'Internal: raises CQ001 for a job limit out of range (NULL is no limit, except for weight).';

CREATE OR REPLACE FUNCTION chunkq._validate_priority(p_priority integer)
 RETURNS void
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
    v_settings chunkq.settings;
BEGIN
    SELECT * INTO v_settings FROM chunkq.settings;
    IF p_priority NOT BETWEEN v_settings.min_priority AND v_settings.max_priority THEN
        RAISE EXCEPTION 'priority must be between % and %, got %',
            v_settings.min_priority, v_settings.max_priority, p_priority
            USING ERRCODE = 'CQ001', HINT = 'The range is set in chunkq.settings.';
    END IF;
END $function$;
COMMENT ON FUNCTION chunkq._validate_priority(integer) IS
    'Internal: raises CQ001 unless the priority lies in settings.min_priority .. max_priority.';

CREATE OR REPLACE FUNCTION chunkq._validate_shape(p_max_images bigint, p_chunk_size integer)
 RETURNS integer
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
    v_max_chunks integer := (SELECT max_chunks_per_job FROM chunkq.settings);
    v_chunks bigint;
BEGIN
    IF p_max_images IS NULL OR p_max_images <= 0 THEN
        RAISE EXCEPTION 'max_images must be a positive number of images, got %', coalesce(p_max_images::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_chunk_size IS NULL OR p_chunk_size NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'chunk_size must be between 1 and 1000000 images, got %', coalesce(p_chunk_size::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    v_chunks := (p_max_images + p_chunk_size - 1) / p_chunk_size;
    IF v_chunks > v_max_chunks THEN
        RAISE EXCEPTION 'max_images % in chunks of % makes % chunks; at most % are allowed per job',
            p_max_images, p_chunk_size, v_chunks, v_max_chunks
            USING ERRCODE = 'CQ001', HINT = 'Use a larger chunk size, or raise chunkq.settings.max_chunks_per_job.';
    END IF;
    RETURN v_chunks;
END $function$;
COMMENT ON FUNCTION chunkq._validate_shape(bigint, integer) IS
    'Internal: raises CQ001 unless max_images and chunk_size are sane and make at most settings.max_chunks_per_job '
    'chunks; returns the number of chunks.';

CREATE OR REPLACE FUNCTION chunkq.cancel_job(p_job_id bigint)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job chunkq.crawl_jobs;
    v_moves chunkq._chunk_move[];
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.status = 'cancelled' THEN
        RETURN v_job;  -- already cancelled: nothing to do
    END IF;

    -- Chunks first, the job row last (the lock order every function keeps). The
    -- counter bookkeeping then finishes the job as cancelled.
    WITH cancelled AS (
        UPDATE chunkq.job_chunks c
           SET status = 'cancelled', lease_expires_at = NULL, finished_at = now()
          FROM (SELECT id, status FROM chunkq.job_chunks
                 WHERE job_id = p_job_id AND status IN ('pending', 'processing')
                   FOR UPDATE) old
         WHERE c.id = old.id
        RETURNING (c.job_id, c.chunk_index, old.status, c.status)::chunkq._chunk_move AS move
    )
    SELECT coalesce(array_agg(move), '{}') INTO v_moves FROM cancelled;

    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
    ELSE
        -- Nothing was open: either the job has no chunks yet, or it finished.
        SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
        IF v_job.status IN ('completed', 'failed') THEN
            RAISE EXCEPTION 'crawl job % is already %', p_job_id, v_job.status USING ERRCODE = 'CQ004';
        END IF;
        UPDATE chunkq.crawl_jobs SET status = 'cancelled', finished_at = now() WHERE id = p_job_id;
    END IF;
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    RETURN v_job;
END $function$;
COMMENT ON FUNCTION chunkq.cancel_job(bigint) IS
    'Cancels a job: its pending and processing chunks become cancelled (a worker holding one gets CQ007 at its '
    'next heartbeat or report). Cancelling a cancelled job does nothing; a completed or failed one raises CQ004.';
GRANT EXECUTE ON FUNCTION chunkq.cancel_job(bigint) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.checkpoint_chunk(p_chunk_id bigint, p_attempt integer, p_position bigint, p_state jsonb DEFAULT NULL::jsonb, p_lease_token uuid DEFAULT NULL::uuid, p_lease interval DEFAULT NULL::interval)
 RETURNS chunkq.job_chunks
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    IF p_position IS NULL THEN
        RAISE EXCEPTION 'a checkpoint needs the position of the last image done' USING ERRCODE = 'CQ001';
    END IF;
    PERFORM chunkq._check_checkpoints(ARRAY[p_chunk_id], ARRAY[p_position], ARRAY[p_state]);
    UPDATE chunkq.job_chunks c
       SET checkpoint_position = p_position, checkpoint_state = p_state, checkpoint_at = now(),
           lease_expires_at = now() + v_lease, heartbeat_at = now()
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'checkpoint', p_lease_token);
    END IF;
    RETURN v_chunk;
END $function$;
COMMENT ON FUNCTION chunkq.checkpoint_chunk(bigint, integer, bigint, jsonb, uuid, interval) IS
    'Records how far a handler got in a chunk it holds: p_position, the last image done, and p_state, a little '
    'JSON of its own (at most settings.max_checkpoint_state_bytes); also extends the lease. Fenced like every '
    'report (CQ006 for a stale attempt or another token). A retried or reclaimed chunk hands the checkpoint to its '
    'next attempt.';
GRANT EXECUTE ON FUNCTION chunkq.checkpoint_chunk(bigint, integer, bigint, jsonb, uuid, interval) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.chunk_error_history(p_chunk_id bigint)
 RETURNS SETOF chunkq.chunk_errors
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.job_chunks WHERE id = p_chunk_id) THEN
        RAISE EXCEPTION 'chunk % does not exist', p_chunk_id USING ERRCODE = 'CQ003';
    END IF;
    RETURN QUERY SELECT * FROM chunkq.chunk_errors e WHERE e.chunk_id = p_chunk_id ORDER BY e.id;
END $function$;
COMMENT ON FUNCTION chunkq.chunk_error_history(bigint) IS 'Every error recorded for a chunk, oldest first.';
GRANT EXECUTE ON FUNCTION chunkq.chunk_error_history(bigint) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.claim_chunk(p_chunk_id bigint, p_worker_id text DEFAULT NULL::text, p_lease interval DEFAULT NULL::interval, p_task_id text DEFAULT NULL::text)
 RETURNS chunkq.job_chunks
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_chunk chunkq.job_chunks;
BEGIN
    -- Waits for a concurrent claim of the same chunk, then sees it processing.
    SELECT * INTO v_chunk FROM chunkq.job_chunks WHERE id = p_chunk_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunk % does not exist', p_chunk_id USING ERRCODE = 'CQ003';
    END IF;
    IF v_chunk.status <> 'pending' THEN
        RAISE EXCEPTION 'cannot claim chunk %: it is % (attempt %, worker %)', p_chunk_id, v_chunk.status,
            v_chunk.attempt, coalesce(v_chunk.worker_id, '-')
            USING ERRCODE = 'CQ004';
    END IF;
    IF v_chunk.limited AND NOT EXISTS (SELECT 1 FROM chunkq._claim_allowances(1, v_chunk.job_id)) THEN
        RAISE EXCEPTION 'cannot claim chunk % now: the limits of job % allow no claim (see chunkq.job_overview)',
            p_chunk_id, v_chunk.job_id
            USING ERRCODE = 'CQ009', HINT = 'Try again later: its cap, its rate key''s bucket or block hold it back.';
    END IF;
    SELECT * INTO v_chunk FROM chunkq._take_chunks(ARRAY[p_chunk_id], p_worker_id, v_lease, p_task_id);
    IF v_chunk.limited THEN
        PERFORM chunkq._spend_tokens(ARRAY[v_chunk]);
    END IF;
    PERFORM chunkq._apply_chunk_moves(
        ARRAY[(v_chunk.job_id, v_chunk.chunk_index, 'pending', 'processing')::chunkq._chunk_move]);
    RETURN v_chunk;
END $function$;
COMMENT ON FUNCTION chunkq.claim_chunk(bigint, text, interval, text) IS
    'Claims one given pending chunk (even one waiting out a retry backoff). Raises CQ004 if it is not pending, for '
    'instance because another worker holds it, and CQ009 if the limits of its job or rate key allow no claim now.';
GRANT EXECUTE ON FUNCTION chunkq.claim_chunk(bigint, text, interval, text) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.claim_chunks(p_worker_id text DEFAULT NULL::text, p_limit integer DEFAULT 1, p_job_id bigint DEFAULT NULL::bigint, p_lease interval DEFAULT NULL::interval)
 RETURNS SETOF chunkq.job_chunks
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'claim limit must be between 1 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT * FROM chunkq._complete_and_claim('{}', '{}', p_worker_id, p_limit, p_job_id, p_lease);
END $function$;
COMMENT ON FUNCTION chunkq.claim_chunks(text, integer, bigint, interval) IS
    'Claims up to p_limit (1..1000) claimable chunks, highest priority first and oldest first within a priority, '
    'optionally only from job p_job_id, leasing them to p_worker_id for p_lease (default settings.default_lease). '
    'Returns them with their new attempt, the token heartbeat/complete/fail need. No chunk is ever returned to two '
    'callers.';
GRANT EXECUTE ON FUNCTION chunkq.claim_chunks(text, integer, bigint, interval) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.claimable_in(p_job_id bigint DEFAULT NULL::bigint)
 RETURNS interval
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    RETURN (
    WITH jobs AS (
        SELECT j.id, j.rate_key, r.blocked_until, r.rate, r.max_running AS key_max_running,
               least(r.burst, r.tokens + r.rate * extract(epoch FROM clock_timestamp() - r.refilled_at)) AS tokens,
               r.refilled_at, r.tokens AS tokens_then,
               (j.max_running IS NULL OR (SELECT sum(k.processing) FROM chunkq.job_chunk_counts k
                                           WHERE k.job_id = j.id) < j.max_running) AS below_cap,
               EXISTS (SELECT 1 FROM chunkq.job_chunks c
                        WHERE c.job_id = j.id AND c.limited AND c.status = 'pending'
                          AND c.available_at < 'infinity' AND c.available_at <= now()) AS has_work
          FROM chunkq.crawl_jobs j LEFT JOIN chunkq.rate_limits r ON r.key = j.rate_key
         WHERE j.limited AND j.finished_at IS NULL AND j.paused_at IS NULL AND (p_job_id IS NULL OR j.id = p_job_id)
    )
    -- (greatest() skips a NULL: a NULL "when" must stay NULL, not become 0.)
    SELECT CASE WHEN m.at IS NOT NULL THEN greatest(interval '0', m.at - clock_timestamp()) END
      FROM (SELECT min(CASE
               WHEN NOT (has_work AND below_cap) THEN NULL
               WHEN blocked_until > clock_timestamp() THEN blocked_until
               WHEN key_max_running <= (SELECT sum(k.processing) FROM chunkq.crawl_jobs o
                                          JOIN chunkq.job_chunk_counts k ON k.job_id = o.id
                                         WHERE o.rate_key = jobs.rate_key AND o.finished_at IS NULL) THEN NULL
               WHEN tokens < 1 THEN refilled_at + make_interval(secs => (1 - tokens_then) / rate)
               ELSE clock_timestamp() END) AS at
              FROM jobs) m);
END
$function$;
COMMENT ON FUNCTION chunkq.claimable_in(bigint) IS
    'How long until a chunk held back by a limit may be claimed (a blocked key, an empty bucket, or 0 when one may '
    'be claimed now); NULL when nothing limited can be claimed before a running chunk finishes. An idle worker '
    'waits that long instead of its whole poll interval.';
GRANT EXECUTE ON FUNCTION chunkq.claimable_in(bigint) TO chunkq_reader;
GRANT EXECUTE ON FUNCTION chunkq.claimable_in(bigint) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.complete_and_claim(p_chunk_ids bigint[], p_attempts integer[], p_worker_id text DEFAULT NULL::text, p_limit integer DEFAULT 1, p_job_id bigint DEFAULT NULL::bigint, p_lease interval DEFAULT NULL::interval, p_lease_tokens uuid[] DEFAULT NULL::uuid[])
 RETURNS SETOF chunkq.job_chunks
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'claim limit must be between 0 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_chunk_ids IS NULL OR p_attempts IS NULL
       OR coalesce(cardinality(p_chunk_ids), 0) <> coalesce(cardinality(p_attempts), 0)
       OR coalesce(cardinality(p_lease_tokens), cardinality(p_chunk_ids), 0) <> coalesce(cardinality(p_chunk_ids), 0)
    THEN
        RAISE EXCEPTION 'chunk ids, attempts and lease tokens must be arrays of the same length'
            USING ERRCODE = 'CQ001';
    END IF;
    IF array_position(p_chunk_ids, NULL) IS NOT NULL OR array_position(p_attempts, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'every completed chunk needs its id and the attempt its claim returned'
            USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT * FROM chunkq._complete_and_claim(p_chunk_ids, p_attempts, p_worker_id, p_limit,
                                                          p_job_id, p_lease, p_lease_tokens);
END $function$;
COMMENT ON FUNCTION chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval, uuid[]) IS
    'The worker''s fast path: completes the chunks it holds (ids with the attempts and lease tokens their claims '
    'returned) and claims up to p_limit more (0: none), as claim_chunks does, in one transaction. All or nothing: '
    'a chunk no longer held raises its error (CQ006 lease lost, CQ007 cancelled, CQ004 not processing) and nothing '
    'changes. Example: SELECT * FROM chunkq.complete_and_claim(''{17,18}'', ''{1,1}'', ''crawler-1:4242'', 2, '
    'p_lease_tokens => ''{…,…}'');';
GRANT EXECUTE ON FUNCTION chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval, uuid[]) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.complete_chunk(p_chunk_id bigint, p_attempt integer DEFAULT NULL::integer, p_lease_token uuid DEFAULT NULL::uuid)
 RETURNS chunkq.chunk_outcome
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    UPDATE chunkq.job_chunks c
       SET status = 'completed', lease_expires_at = NULL, finished_at = now()
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'complete', p_lease_token);
    END IF;
    RETURN chunkq._outcome(v_chunk, 'processing');
END $function$;
COMMENT ON FUNCTION chunkq.complete_chunk(bigint, integer, uuid) IS
    'Marks a processing chunk completed. p_attempt and p_lease_token are what the claim returned: a stale attempt '
    'or another token raises CQ006 and leaves the holder''s attempt alone (chunkq_app may pass NULLs: operator '
    'use). job_finished is true for the one call that finished the job.';
GRANT EXECUTE ON FUNCTION chunkq.complete_chunk(bigint, integer, uuid) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.count_jobs(p_status chunkq.job_status DEFAULT NULL::chunkq.job_status, p_name text DEFAULT NULL::text)
 RETURNS bigint
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT count(*) FROM chunkq.crawl_jobs j
     WHERE (p_status IS NULL OR j.status = p_status)
       AND (p_name IS NULL OR strpos(lower(j.name), lower(p_name)) > 0);
$function$;
COMMENT ON FUNCTION chunkq.count_jobs(chunkq.job_status, text) IS
    'How many jobs search_jobs would page through with the same status and name filter.';
GRANT EXECUTE ON FUNCTION chunkq.count_jobs(chunkq.job_status, text) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.create_chunks(p_job_id bigint, p_max_images bigint DEFAULT NULL::bigint, p_priority integer DEFAULT NULL::integer, p_chunk_size integer DEFAULT NULL::integer)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job chunkq.crawl_jobs;
    v_chunk_size integer;
    v_priority integer;
    v_chunks integer;
    v_front double precision;
    v_slots constant integer := chunkq._counter_slots();
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.chunked_at IS NOT NULL THEN
        RAISE EXCEPTION 'crawl job % already has its % chunks', p_job_id, v_job.total_chunks
            USING ERRCODE = 'CQ005', HINT = 'Each job is chunked once; read its chunks with list_chunks.';
    END IF;
    IF v_job.status = 'cancelled' THEN
        RAISE EXCEPTION 'crawl job % is cancelled', p_job_id USING ERRCODE = 'CQ004';
    END IF;
    IF p_max_images IS NOT NULL AND p_max_images <> v_job.max_images THEN
        RAISE EXCEPTION 'max_images % does not match crawl job %''s max_images %', p_max_images, p_job_id, v_job.max_images
            USING ERRCODE = 'CQ001';
    END IF;
    v_chunk_size := coalesce(p_chunk_size, v_job.chunk_size);
    v_priority := coalesce(p_priority, v_job.priority);
    v_chunks := chunkq._validate_shape(v_job.max_images, v_chunk_size);
    PERFORM chunkq._validate_priority(v_priority);
    -- The job starts at the front of its priority's queue: it takes turns with the
    -- jobs already waiting there (fair share), one of its chunks per 1 / weight.
    v_front := chunkq._queue_front(v_priority);

    INSERT INTO chunkq.job_chunks (job_id, chunk_index, image_start, image_end, priority, vpos, limited)
    SELECT p_job_id, i, i::bigint * v_chunk_size, LEAST((i + 1)::bigint * v_chunk_size, v_job.max_images) - 1, v_priority,
           v_front + i / v_job.weight, v_job.limited
      FROM generate_series(0, v_chunks - 1) AS i;

    -- Slot s counts chunk indexes s, s+16, s+32, ...: ceil((n - s) / 16) of them.
    INSERT INTO chunkq.job_chunk_counts (job_id, slot, total, pending)
    SELECT p_job_id, s, (v_chunks - s + v_slots - 1) / v_slots, (v_chunks - s + v_slots - 1) / v_slots
      FROM generate_series(0, LEAST(v_chunks, v_slots) - 1) AS s;

    PERFORM chunkq._refresh_statistics(v_chunks);

    UPDATE chunkq.crawl_jobs
       SET chunk_size = v_chunk_size, priority = v_priority, total_chunks = v_chunks,
           open_slots = LEAST(v_chunks, v_slots), chunked_at = now()
     WHERE id = p_job_id
    RETURNING * INTO v_job;
    PERFORM chunkq._notify_claimable(p_job_id, v_chunks);
    RETURN v_job;
END $function$;
COMMENT ON FUNCTION chunkq.create_chunks(bigint, bigint, integer, integer) IS
    'Splits a job into chunks of chunk_size images: inclusive ranges 0..499, 500..999, ... (the last one shorter). '
    'NULL arguments take the job''s values; p_max_images, when given, must equal the job''s. Returns the job. Raises '
    'CQ005 if the job already has chunks (it never duplicates them).';
GRANT EXECUTE ON FUNCTION chunkq.create_chunks(bigint, bigint, integer, integer) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.create_job(p_project_id bigint, p_name text, p_keywords jsonb, p_max_images bigint, p_priority integer DEFAULT NULL::integer, p_max_retries integer DEFAULT NULL::integer, p_chunk_size integer DEFAULT NULL::integer, p_id bigint DEFAULT NULL::bigint, p_retry_base_delay interval DEFAULT NULL::interval, p_max_running integer DEFAULT NULL::integer, p_rate_key text DEFAULT NULL::text, p_weight double precision DEFAULT 1, p_max_failed_ratio double precision DEFAULT NULL::double precision, p_max_failed_chunks integer DEFAULT NULL::integer, p_max_consecutive_failures integer DEFAULT NULL::integer)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_settings chunkq.settings;
    v_job chunkq.crawl_jobs;
BEGIN
    SELECT * INTO v_settings FROM chunkq.settings;
    IF p_project_id IS NULL THEN
        RAISE EXCEPTION 'project_id is required' USING ERRCODE = 'CQ001';
    END IF;
    IF p_name IS NULL OR btrim(p_name) = '' OR length(p_name) > 500 THEN
        RAISE EXCEPTION 'name must be 1 to 500 characters and not blank' USING ERRCODE = 'CQ001';
    END IF;
    PERFORM chunkq._validate_shape(p_max_images, coalesce(p_chunk_size, v_settings.chunk_size));
    PERFORM chunkq._validate_priority(coalesce(p_priority, v_settings.default_priority));
    IF coalesce(p_max_retries, 0) NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'max_retries must be between 0 and 1000, got %', p_max_retries USING ERRCODE = 'CQ001';
    END IF;
    IF p_retry_base_delay < interval '0' THEN
        RAISE EXCEPTION 'retry_base_delay must not be negative, got %', p_retry_base_delay USING ERRCODE = 'CQ001';
    END IF;
    PERFORM chunkq._validate_limits(p_max_running, p_rate_key, coalesce(p_weight, 1), p_max_failed_ratio,
                                    p_max_failed_chunks, p_max_consecutive_failures);
    IF p_id IS NOT NULL THEN
        IF p_id < 1 THEN
            RAISE EXCEPTION 'a job id must be positive, got %', p_id USING ERRCODE = 'CQ001';
        END IF;
        IF EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_id) THEN
            RAISE EXCEPTION 'crawl job % exists already', p_id USING ERRCODE = 'CQ001';
        END IF;
    END IF;

    BEGIN
        INSERT INTO chunkq.crawl_jobs (id, project_id, name, keywords, max_images, chunk_size, priority, max_retries,
                                       retry_base_delay, max_running, rate_key, weight, max_failed_ratio,
                                       max_failed_chunks, max_consecutive_failures, limited)
        OVERRIDING SYSTEM VALUE
        VALUES (coalesce(p_id, nextval(pg_get_serial_sequence('chunkq.crawl_jobs', 'id'))), p_project_id, p_name,
                coalesce(p_keywords, '[]'::jsonb), p_max_images,
                coalesce(p_chunk_size, v_settings.chunk_size),
                coalesce(p_priority, v_settings.default_priority),
                coalesce(p_max_retries, v_settings.default_max_retries),
                p_retry_base_delay, p_max_running, p_rate_key, coalesce(p_weight, 1), p_max_failed_ratio,
                p_max_failed_chunks, p_max_consecutive_failures,
                p_max_running IS NOT NULL OR EXISTS (SELECT 1 FROM chunkq.rate_limits r WHERE r.key = p_rate_key))
        RETURNING * INTO v_job;
    EXCEPTION WHEN unique_violation THEN  -- the same id, created by a concurrent call since the check above
        RAISE EXCEPTION 'crawl job % exists already', p_id USING ERRCODE = 'CQ001';
    END;
    -- A given id is taken from the ids the table would hand out, so that a job created
    -- later without one can never collide with it.
    IF p_id IS NOT NULL THEN
        PERFORM setval(pg_get_serial_sequence('chunkq.crawl_jobs', 'id'), greatest(p_id, s.last_value))
           FROM chunkq.crawl_jobs_id_seq s;
    END IF;
    RETURN v_job;
END $function$;
COMMENT ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval, integer, text, double precision, double precision, integer, integer) IS
    'Creates a crawl job (no chunks yet; see create_chunks). NULL priority, max_retries, chunk_size and '
    'retry_base_delay take the defaults in chunkq.settings. p_id gives the job an id of your own (e.g. your '
    'application''s job id); ids chunkq hands out afterwards skip past it. The scheduling options: p_max_running '
    '(cap on running chunks), p_rate_key (whose chunkq.rate_limits apply), p_weight (share of claims), and the '
    'failure budget p_max_failed_ratio, p_max_failed_chunks, p_max_consecutive_failures. Raises CQ001 for a blank '
    'name, max_images <= 0, more chunks than settings.max_chunks_per_job, an id in use or a limit out of range.';
GRANT EXECUTE ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval, integer, text, double precision, double precision, integer, integer) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.defer_chunk(p_chunk_id bigint, p_attempt integer, p_delay interval, p_reason text DEFAULT NULL::text, p_block_key boolean DEFAULT false, p_lease_token uuid DEFAULT NULL::uuid)
 RETURNS chunkq.chunk_outcome
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_reason text;
    v_chunk chunkq.job_chunks;
    v_key text;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    IF p_delay IS NULL OR p_delay <= interval '0' OR p_delay > interval '7 days' THEN
        RAISE EXCEPTION 'a retry-after delay must be more than 0 and at most 7 days, got %',
            coalesce(p_delay::text, 'NULL') USING ERRCODE = 'CQ001';
    END IF;
    v_reason := chunkq._clip_error(format('retry after %s: %s', p_delay, coalesce(nullif(p_reason, ''), 'deferred')));
    UPDATE chunkq.job_chunks c
       SET status = 'pending', available_at = now() + p_delay, lease_expires_at = NULL, error_message = v_reason
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'defer', p_lease_token);
    END IF;
    INSERT INTO chunkq.chunk_errors (chunk_id, job_id, attempt, worker_id, error, retried, deferred)
    VALUES (v_chunk.id, v_chunk.job_id, v_chunk.attempt, v_chunk.worker_id, v_reason, true, true);
    IF p_block_key THEN
        SELECT j.rate_key INTO v_key FROM chunkq.crawl_jobs j WHERE j.id = v_chunk.job_id;
        -- Only a key with limits can be blocked (it is the key's row that says so);
        -- chunkq limit set KEY registers one.
        UPDATE chunkq.rate_limits r
           SET blocked_until = greatest(r.blocked_until, now() + p_delay), blocked_reason = v_reason
         WHERE r.key = v_key;
    END IF;
    RETURN chunkq._outcome(v_chunk, 'processing');
END $function$;
COMMENT ON FUNCTION chunkq.defer_chunk(bigint, integer, interval, text, boolean, uuid) IS
    'A handler''s "retry after" (HTTP 429 or 503): puts a processing chunk the caller holds back to pending, not '
    'claimable before p_delay has passed, without spending a retry; the reason is kept in chunk_errors (deferred). '
    'With p_block_key, no chunk of the job''s rate key (if it has limits) is claimed before then either.';
GRANT EXECUTE ON FUNCTION chunkq.defer_chunk(bigint, integer, interval, text, boolean, uuid) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.delete_job(p_job_id bigint)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job chunkq.crawl_jobs;
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.status = 'running'
       OR EXISTS (SELECT 1 FROM chunkq.job_chunk_counts k WHERE k.job_id = p_job_id AND k.processing > 0) THEN
        RAISE EXCEPTION 'crawl job % is running: cancel it first (chunkq.cancel_job)', p_job_id
            USING ERRCODE = 'CQ004';
    END IF;
    DELETE FROM chunkq.crawl_jobs WHERE id = p_job_id;
    RETURN v_job;
END $function$;
COMMENT ON FUNCTION chunkq.delete_job(bigint) IS
    'Deletes a job that is not running, with its chunks, counters and error history; returns the deleted row. A '
    'job with a chunk being processed must be cancelled first (CQ004), so no worker is left holding a chunk that '
    'vanished.';
GRANT EXECUTE ON FUNCTION chunkq.delete_job(bigint) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.delete_rate_limit(p_key text)
 RETURNS chunkq.rate_limits
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_limit chunkq.rate_limits;
    v_job bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.rate_limits WHERE key = p_key) THEN
        RAISE EXCEPTION 'rate key % has no limits', coalesce(p_key, 'NULL') USING ERRCODE = 'CQ008';
    END IF;
    -- Chunks first, then the key's row (see set_rate_limit).
    FOR v_job IN SELECT j.id FROM chunkq.crawl_jobs j WHERE j.rate_key = p_key AND j.finished_at IS NULL ORDER BY j.id
    LOOP
        PERFORM chunkq._set_limited(v_job, (SELECT j.max_running IS NOT NULL FROM chunkq.crawl_jobs j WHERE j.id = v_job));
    END LOOP;
    DELETE FROM chunkq.rate_limits WHERE key = p_key RETURNING * INTO v_limit;
    PERFORM chunkq._notify_claimable(NULL, 1);
    RETURN v_limit;
END $function$;
COMMENT ON FUNCTION chunkq.delete_rate_limit(text) IS
    'Removes the limits of a rate key; its jobs are claimed without them from then on. Raises CQ008 for a key '
    'without limits.';
GRANT EXECUTE ON FUNCTION chunkq.delete_rate_limit(text) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.fail_chunk(p_chunk_id bigint, p_attempt integer, p_error text, p_retry boolean DEFAULT false, p_max_retries integer DEFAULT NULL::integer, p_lease_token uuid DEFAULT NULL::uuid)
 RETURNS chunkq.chunk_outcome
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_error text := chunkq._clip_error(p_error);
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_retries_done integer;
    v_max_retries integer;
    v_base_delay interval;
    v_retry boolean;
    v_chunk chunkq.job_chunks;
    v_outcome chunkq.chunk_outcome;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    IF p_max_retries < 0 THEN
        RAISE EXCEPTION 'max_retries must not be negative, got %', p_max_retries USING ERRCODE = 'CQ001';
    END IF;
    SELECT c.retry_count, j.max_retries, j.retry_base_delay INTO v_retries_done, v_max_retries, v_base_delay
      FROM chunkq.job_chunks c JOIN chunkq.crawl_jobs j ON j.id = c.job_id
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
       FOR UPDATE OF c;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'fail', p_lease_token);
    END IF;
    v_retry := coalesce(p_retry, false) AND v_retries_done < coalesce(p_max_retries, v_max_retries);
    UPDATE chunkq.job_chunks c
       SET status = CASE WHEN v_retry THEN 'pending' ELSE 'failed' END::chunkq.chunk_status,
           retry_count = c.retry_count + v_retry::integer,
           available_at = CASE WHEN v_retry THEN now() + chunkq._retry_delay(c.retry_count, v_base_delay)
                               ELSE c.available_at END,
           finished_at = CASE WHEN v_retry THEN NULL ELSE now() END,
           error_message = v_error,
           lease_expires_at = NULL
     WHERE c.id = p_chunk_id
    RETURNING c.* INTO v_chunk;
    INSERT INTO chunkq.chunk_errors (chunk_id, job_id, attempt, worker_id, error, retried)
    VALUES (v_chunk.id, v_chunk.job_id, v_chunk.attempt, v_chunk.worker_id, v_error, v_chunk.status = 'pending');
    v_outcome := chunkq._outcome(v_chunk, 'processing');
    PERFORM chunkq._check_failure_budget(v_chunk.job_id);
    RETURN v_outcome;
END $function$;
COMMENT ON FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean, integer, uuid) IS
    'Records an error for a processing chunk (p_attempt and p_lease_token as for complete_chunk). With p_retry '
    'true and retries left (retry_count < p_max_retries, default the job''s max_retries) the chunk goes back to '
    'pending after a backoff (see _retry_delay) with retry_count + 1; otherwise it is failed. Every error is kept '
    'in chunk_errors. A job past its failure budget pauses itself (see _check_failure_budget).';
GRANT EXECUTE ON FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean, integer, uuid) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.failed_chunks(p_job_id bigint)
 RETURNS SETOF chunkq.job_chunks
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    RETURN QUERY SELECT r.* FROM chunkq.job_chunks c, jsonb_populate_record(c, '{"lease_token": null}') r
                  WHERE c.job_id = p_job_id AND c.status = 'failed'
                  ORDER BY c.chunk_index;
END $function$;
COMMENT ON FUNCTION chunkq.failed_chunks(bigint) IS
    'A job''s failed chunks in chunk_index order (uses the small job_chunks_failed_by_job index).';
GRANT EXECUTE ON FUNCTION chunkq.failed_chunks(bigint) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.get_chunk(p_chunk_id bigint)
 RETURNS SETOF chunkq.job_chunks
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT r.* FROM chunkq.job_chunks c, jsonb_populate_record(c, '{"lease_token": null}') r
     WHERE c.id = p_chunk_id;
$function$;
COMMENT ON FUNCTION chunkq.get_chunk(bigint) IS 'The chunk with this id, or no row.';
GRANT EXECUTE ON FUNCTION chunkq.get_chunk(bigint) TO chunkq_reader;
GRANT EXECUTE ON FUNCTION chunkq.get_chunk(bigint) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.get_job(p_job_id bigint)
 RETURNS SETOF chunkq.crawl_jobs
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT * FROM chunkq.crawl_jobs WHERE id = p_job_id;
$function$;
COMMENT ON FUNCTION chunkq.get_job(bigint) IS 'The job with this id, or no row.';
GRANT EXECUTE ON FUNCTION chunkq.get_job(bigint) TO chunkq_reader;
GRANT EXECUTE ON FUNCTION chunkq.get_job(bigint) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.get_job_overview(p_job_id bigint)
 RETURNS SETOF chunkq.job_overview
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT * FROM chunkq.job_overview o WHERE o.id = p_job_id;
$function$;
COMMENT ON FUNCTION chunkq.get_job_overview(bigint) IS
    'One job''s row of job_overview (counts, rate, ETA); no row when there is no such job.';
GRANT EXECUTE ON FUNCTION chunkq.get_job_overview(bigint) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.heartbeat_chunk(p_chunk_id bigint, p_attempt integer, p_lease interval DEFAULT NULL::interval, p_task_id text DEFAULT NULL::text, p_lease_token uuid DEFAULT NULL::uuid)
 RETURNS chunkq.job_chunks
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    UPDATE chunkq.job_chunks c
       SET lease_expires_at = now() + v_lease,
           heartbeat_at = now(),
           task_id = coalesce(p_task_id, c.task_id)
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'heartbeat', p_lease_token);
    END IF;
    RETURN v_chunk;
END $function$;
COMMENT ON FUNCTION chunkq.heartbeat_chunk(bigint, integer, interval, text, uuid) IS
    'Extends the lease of a chunk the caller holds (p_attempt and p_lease_token from its claim) to now + p_lease. '
    'Raises CQ006 if the lease was lost or the token is not the claim''s, CQ007 if the job was cancelled. '
    'chunkq_app may pass NULLs (operator use).';
GRANT EXECUTE ON FUNCTION chunkq.heartbeat_chunk(bigint, integer, interval, text, uuid) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.heartbeat_chunks(p_chunk_ids bigint[], p_attempts integer[], p_lease interval DEFAULT NULL::interval, p_lease_tokens uuid[] DEFAULT NULL::uuid[], p_positions bigint[] DEFAULT NULL::bigint[], p_states jsonb[] DEFAULT NULL::jsonb[])
 RETURNS SETOF chunkq.lease_state
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_waived constant boolean := CASE WHEN p_lease_tokens IS NULL OR array_position(p_lease_tokens, NULL) IS NOT NULL
                                      THEN chunkq._may_override() ELSE false END;
BEGIN
    IF cardinality(p_chunk_ids) IS DISTINCT FROM cardinality(p_attempts)
       OR (p_lease_tokens IS NOT NULL AND cardinality(p_lease_tokens) IS DISTINCT FROM cardinality(p_chunk_ids)) THEN
        RAISE EXCEPTION 'p_chunk_ids, p_attempts and p_lease_tokens must have the same length' USING ERRCODE = 'CQ001';
    END IF;
    PERFORM chunkq._check_checkpoints(p_chunk_ids, p_positions, p_states);
    RETURN QUERY
    WITH wanted AS (
        SELECT w.chunk_id, w.attempt, w.lease_token, w.position, w.state
          FROM unnest(p_chunk_ids, p_attempts, p_lease_tokens, p_positions, p_states)
               AS w(chunk_id, attempt, lease_token, position, state)
    ), extended AS (
        UPDATE chunkq.job_chunks c
           SET lease_expires_at = now() + v_lease, heartbeat_at = now(),
               checkpoint_position = coalesce(w.position, c.checkpoint_position),
               checkpoint_state = CASE WHEN w.position IS NULL THEN c.checkpoint_state ELSE w.state END,
               checkpoint_at = CASE WHEN w.position IS NULL THEN c.checkpoint_at ELSE now() END
          FROM wanted w
         WHERE c.id = w.chunk_id AND c.attempt = w.attempt AND c.status = 'processing'
           AND (c.lease_token = w.lease_token OR (w.lease_token IS NULL AND v_waived))
        RETURNING c.id, c.lease_expires_at
    )
    SELECT w.chunk_id, e.id IS NOT NULL, c.status, e.lease_expires_at
      FROM wanted w
      LEFT JOIN extended e ON e.id = w.chunk_id
      LEFT JOIN chunkq.job_chunks c ON c.id = w.chunk_id
     ORDER BY w.chunk_id;
END $function$;
COMMENT ON FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[], bigint[], jsonb[]) IS
    'Extends the leases of several chunks at once (parallel arrays of chunk ids and the attempts and lease tokens '
    'the caller''s claims returned), and records the checkpoints given in p_positions (the last image done; NULL: '
    'none this time) and p_states. Never raises for a lost chunk: it answers held = false for it, so one lost '
    'chunk does not stop the heartbeat of the others (its checkpoint is not recorded). Raises CQ001, changing '
    'nothing, for a position outside its chunk or an oversized state.';
GRANT EXECUTE ON FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[], bigint[], jsonb[]) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.job_blockers(p_job_id bigint)
 RETURNS SETOF chunkq.job_blocker
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
-- Each reason is one block below: a test of the facts, and a row saying what
-- holds the job back. A new reason (a cap, a rate limit...) is one more block.
DECLARE
    v_job chunkq.crawl_jobs;
    v_progress chunkq.job_progress;
    v_waiting boolean;
    v_ahead smallint;
    v_key_held text;
BEGIN
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    -- The counts from the counter rows, and the chunks waiting out a retry (a small index).
    v_progress := chunkq.job_progress(p_job_id);
    -- Unpaused, only a chunk that was retried can wait: all pending ones waiting means none may be claimed.
    v_waiting := v_job.paused_at IS NULL AND v_progress.pending_chunks > 0
                 AND v_progress.retrying_chunks = v_progress.pending_chunks;

    IF v_job.finished_at IS NOT NULL THEN
        RETURN NEXT ('finished', format('the job is %s (since %s); retry_failed_chunks reopens a failed one',
                                        v_job.status, date_trunc('second', v_job.finished_at)))::chunkq.job_blocker;
        RETURN;
    END IF;
    IF v_job.total_chunks = 0 THEN
        RETURN NEXT ('not_chunked', 'nothing to claim yet: create_chunks has not split the job')::chunkq.job_blocker;
        RETURN;
    END IF;
    IF v_job.paused_at IS NOT NULL THEN  -- by an operator, or by its failure budget (0010), which says why
        RETURN NEXT ('paused', format('paused %s since %s: its %s pending chunks wait for resume_job(%s)',
                                      coalesce(v_job.paused_reason, 'by an operator'),
                                      date_trunc('second', v_job.paused_at), v_progress.pending_chunks,
                                      p_job_id))::chunkq.job_blocker;
    END IF;
    IF v_job.max_running IS NOT NULL AND v_progress.processing_chunks >= v_job.max_running
       AND v_progress.pending_chunks > 0 THEN
        RETURN NEXT ('capped', format('%s chunks running, its max_running %s: the others wait for one to finish',
                                      v_progress.processing_chunks, v_job.max_running))::chunkq.job_blocker;
    END IF;
    SELECT l.held_back INTO v_key_held FROM chunkq.rate_limit_state l WHERE l.key = v_job.rate_key;
    IF v_key_held IS NOT NULL AND v_progress.pending_chunks > 0 THEN
        RETURN NEXT ('rate_limited', format('its rate key %s is %s', v_job.rate_key, v_key_held))::chunkq.job_blocker;
    END IF;
    IF v_waiting THEN
        RETURN NEXT ('waiting_for_retry',
                     format('all %s pending chunks wait out a retry backoff; the first may be claimed again at %s',
                            v_progress.pending_chunks, date_trunc('second', v_progress.next_retry_at))
                    )::chunkq.job_blocker;
    END IF;
    IF v_progress.pending_chunks > 0 AND v_progress.processing_chunks = 0 AND v_job.paused_at IS NULL
       AND NOT v_waiting THEN
        -- The head of the claim index (unlimited chunks; limited ones are claimed apart).
        SELECT c.priority INTO v_ahead FROM chunkq.job_chunks c
         WHERE c.status = 'pending' AND c.available_at < 'infinity' AND NOT c.limited AND c.available_at <= now()
         ORDER BY c.priority DESC LIMIT 1;
        IF v_ahead > v_job.priority THEN
            RETURN NEXT ('behind_higher_priority',
                         format('claimable chunks of priority %s are taken before this job''s (priority %s)',
                                v_ahead, v_job.priority))::chunkq.job_blocker;
        END IF;
    END IF;
    IF v_progress.pending_chunks > 0 AND NOT EXISTS (SELECT 1 FROM chunkq._connected_workers()) THEN
        RETURN NEXT ('no_workers', 'no worker pool is connected to this database')::chunkq.job_blocker;
    END IF;
END $function$;
COMMENT ON FUNCTION chunkq.job_blockers(bigint) IS
    'Why a job is not moving, one row per reason (none: it moves, or waits only for its running chunks): finished, '
    'not chunked, paused (by an operator or its failure budget), capped by max_running, its rate key blocked, '
    'capped or rate-limited, every pending chunk in retry backoff, queued behind claimable chunks of a higher '
    'priority, no worker connected. Example: SELECT * FROM chunkq.job_blockers(42);';
GRANT EXECUTE ON FUNCTION chunkq.job_blockers(bigint) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.job_error_summary(p_job_id bigint)
 RETURNS chunkq.job_error_summary
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_summary chunkq.job_error_summary;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    SELECT p_job_id, count(*), count(*) FILTER (WHERE e.retried), count(*) FILTER (WHERE e.lease_expired),
           (SELECT l.error FROM chunkq.chunk_errors l WHERE l.job_id = p_job_id ORDER BY l.failed_at DESC LIMIT 1),
           max(e.failed_at)
      INTO v_summary
      FROM chunkq.chunk_errors e
     WHERE e.job_id = p_job_id;
    RETURN v_summary;
END $function$;
COMMENT ON FUNCTION chunkq.job_error_summary(bigint) IS
    'Counts of the errors recorded for a job''s chunks, and the latest one.';
GRANT EXECUTE ON FUNCTION chunkq.job_error_summary(bigint) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.job_failure_summary(p_job_id bigint, p_limit integer DEFAULT 20)
 RETURNS SETOF chunkq.failure_summary
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'limit must be positive, got %', coalesce(p_limit::text, 'NULL') USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY
    SELECT regexp_replace(CASE WHEN e.lease_expired THEN 'lease expired: the worker stopped heartbeating'
                               ELSE split_part(e.error, E'\n', 1) END, '[0-9]+', '#', 'g') AS error_kind,
           count(*), count(DISTINCT e.chunk_id), count(DISTINCT e.job_id),
           count(*) FILTER (WHERE NOT e.retried), min(e.failed_at), max(e.failed_at),
           (array_agg(e.chunk_id ORDER BY e.failed_at DESC))[1],
           (array_agg(e.error ORDER BY e.failed_at DESC))[1]
      FROM chunkq.chunk_errors e
     WHERE e.job_id = p_job_id
     GROUP BY 1
     ORDER BY 2 DESC, 1
     LIMIT p_limit;
END $function$;
COMMENT ON FUNCTION chunkq.job_failure_summary(bigint, integer) IS
    'failure_summary for one job: its errors grouped by kind, most frequent first, at most p_limit kinds, each '
    'with the latest example.';
GRANT EXECUTE ON FUNCTION chunkq.job_failure_summary(bigint, integer) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.job_progress(p_job_id bigint)
 RETURNS chunkq.job_progress
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job chunkq.crawl_jobs;
    v_progress chunkq.job_progress;
BEGIN
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    SELECT v_job.id, v_job.status, v_job.total_chunks,
           coalesce(sum(k.pending), 0), coalesce(sum(k.processing), 0), coalesce(sum(k.completed), 0),
           coalesce(sum(k.failed), 0), coalesce(sum(k.cancelled), 0),
           CASE WHEN v_job.total_chunks = 0 THEN 0.0
                ELSE round(100.0 * coalesce(sum(k.completed), 0) / v_job.total_chunks, 2)::double precision END,
           v_job.total_chunks > 0 AND coalesce(sum(k.pending) + sum(k.processing), 0) = 0,
           v_job.max_images,
           chunkq._completed_images(v_job, coalesce(sum(k.completed), 0))
      INTO v_progress
      FROM chunkq.job_chunk_counts k
     WHERE k.job_id = p_job_id;
    -- From job_chunks_retry_wait: only chunks that were retried, never the job's whole backlog.
    SELECT count(*), min(c.available_at) INTO v_progress.retrying_chunks, v_progress.next_retry_at
      FROM chunkq.job_chunks c
     WHERE c.job_id = p_job_id AND c.status = 'pending' AND c.retry_count > 0
       AND c.available_at > now() AND c.available_at < 'infinity';
    v_progress.images_completed := v_progress.completed_images + chunkq._checkpointed_images(p_job_id);
    RETURN v_progress;
END $function$;
COMMENT ON FUNCTION chunkq.job_progress(bigint) IS
    'Chunk counts by status for one job, from job_chunk_counts (at most 16 rows read, however large the job); '
    'images done, completed chunks and checkpoints together (images_completed); how many pending chunks wait out a '
    'retry back-off (retrying_chunks) with the moment the next one is due.';
GRANT EXECUTE ON FUNCTION chunkq.job_progress(bigint) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.list_chunks(p_job_id bigint, p_status chunkq.chunk_status DEFAULT NULL::chunkq.chunk_status, p_limit integer DEFAULT NULL::integer)
 RETURNS SETOF chunkq.job_chunks
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF p_limit < 1 THEN
        RAISE EXCEPTION 'limit must be positive, got %', p_limit USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT r.* FROM chunkq.job_chunks c, jsonb_populate_record(c, '{"lease_token": null}') r
                  WHERE c.job_id = p_job_id AND (p_status IS NULL OR c.status = p_status)
                  ORDER BY c.chunk_index
                  LIMIT p_limit;
END $function$;
COMMENT ON FUNCTION chunkq.list_chunks(bigint, chunkq.chunk_status, integer) IS
    'A job''s chunks in chunk_index order, optionally only those in one status, at most p_limit (NULL: all).';
GRANT EXECUTE ON FUNCTION chunkq.list_chunks(bigint, chunkq.chunk_status, integer) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.list_jobs(p_status chunkq.job_status DEFAULT NULL::chunkq.job_status, p_limit integer DEFAULT 50)
 RETURNS SETOF chunkq.job_overview
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'limit must be positive, got %', coalesce(p_limit::text, 'NULL') USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT * FROM chunkq.job_overview o
                  WHERE p_status IS NULL OR o.status = p_status
                  ORDER BY o.id DESC
                  LIMIT p_limit;
END $function$;
COMMENT ON FUNCTION chunkq.list_jobs(chunkq.job_status, integer) IS
    'The newest p_limit jobs from job_overview, optionally only those in one status.';
GRANT EXECUTE ON FUNCTION chunkq.list_jobs(chunkq.job_status, integer) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.metrics_snapshot(p_top_jobs integer DEFAULT 20)
 RETURNS SETOF chunkq.metric_sample
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_minute constant timestamptz := date_trunc('minute', now());
    v_top bigint[];
BEGIN
    IF p_top_jobs IS NULL OR p_top_jobs NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'top_jobs must be between 0 and 1000, got %', coalesce(p_top_jobs::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    -- The jobs that get series of their own: unfinished ones, newest first, then
    -- the latest to finish. Everything else is summed under job="other", so the
    -- number of series stays bounded however many jobs the table keeps.
    v_top := ARRAY(SELECT j.id FROM chunkq.crawl_jobs j
                    ORDER BY j.finished_at IS NOT NULL, coalesce(j.finished_at, j.created_at) DESC, j.id DESC
                    LIMIT p_top_jobs);

    RETURN QUERY
    SELECT m.metric, m.labels, m.value
      FROM chunkq.job_overview o
     CROSS JOIN LATERAL (VALUES
        ('chunkq_job_info', jsonb_build_object('job', o.id::text, 'name', o.name, 'status', o.status::text), 1.0),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'pending'), o.pending_chunks::float8),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'processing'), o.processing_chunks::float8),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'completed'), o.completed_chunks::float8),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'failed'), o.failed_chunks::float8),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'cancelled'), o.cancelled_chunks::float8),
        ('chunkq_job_progress_ratio', jsonb_build_object('job', o.id::text),
         CASE WHEN o.total_chunks = 0 THEN 0.0 ELSE o.completed_chunks::float8 / o.total_chunks END),
        ('chunkq_job_chunks_completed_per_second', jsonb_build_object('job', o.id::text),
         coalesce(o.chunks_per_second, 0.0)),
        ('chunkq_job_eta_seconds', jsonb_build_object('job', o.id::text), extract(epoch FROM o.eta)::float8),
        ('chunkq_job_paused', jsonb_build_object('job', o.id::text), (o.paused_at IS NOT NULL)::integer::float8)
     ) m(metric, labels, value)
     WHERE o.id = ANY (v_top) AND m.value IS NOT NULL;

    -- One pass over the counter rows: totals, the jobs outside the top, the completion rate.
    RETURN QUERY
    WITH sums AS (
        SELECT coalesce(sum(k.pending), 0) AS pending, coalesce(sum(k.processing), 0) AS processing,
               coalesce(sum(k.completed), 0) AS completed, coalesce(sum(k.failed), 0) AS failed,
               coalesce(sum(k.cancelled), 0) AS cancelled,
               coalesce(sum(k.pending) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_pending,
               coalesce(sum(k.processing) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_processing,
               coalesce(sum(k.completed) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_completed,
               coalesce(sum(k.failed) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_failed,
               coalesce(sum(k.cancelled) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_cancelled,
               -- completions in the previous minute and this one so far, as job_overview counts them
               coalesce(sum(CASE WHEN k.rate_minute = v_minute THEN k.completed_this_minute + k.completed_last_minute
                                 WHEN k.rate_minute = v_minute - interval '1 minute' THEN k.completed_this_minute
                                 ELSE 0 END), 0) AS recent
          FROM chunkq.job_chunk_counts k
    )
    SELECT m.metric, m.labels, m.value
      FROM sums s
     CROSS JOIN LATERAL (VALUES
        ('chunkq_chunks', '{"state": "pending"}'::jsonb, s.pending::float8),
        ('chunkq_chunks', '{"state": "processing"}', s.processing::float8),
        ('chunkq_chunks', '{"state": "completed"}', s.completed::float8),
        ('chunkq_chunks', '{"state": "failed"}', s.failed::float8),
        ('chunkq_chunks', '{"state": "cancelled"}', s.cancelled::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "pending"}', s.other_pending::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "processing"}', s.other_processing::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "completed"}', s.other_completed::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "failed"}', s.other_failed::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "cancelled"}', s.other_cancelled::float8),
        ('chunkq_chunks_completed_per_second', '{}',
         round((s.recent / GREATEST(1.0, 60 + extract(epoch FROM now() - v_minute)))::numeric, 3)::float8),
        ('chunkq_failure_ratio', '{}',
         CASE WHEN s.completed + s.failed > 0 THEN s.failed::float8 / (s.completed + s.failed) END)
     ) m(metric, labels, value)
     WHERE m.value IS NOT NULL;

    -- Jobs by status, every status present (0 when none).
    RETURN QUERY
    SELECT 'chunkq_jobs', jsonb_build_object('status', st::text), count(j.id)::float8
      FROM unnest(enum_range(NULL::chunkq.job_status)) st
      LEFT JOIN chunkq.crawl_jobs j ON j.status = st
     GROUP BY st;

    -- The queue by priority, from the counters of unfinished jobs (a chunk that can
    -- still run has its job's priority): pending chunks, and the age of the oldest,
    -- which is its job's: create_chunks makes all of a job's chunks in one transaction.
    -- A paused job's chunks are left out of the age: a paused job is not a stuck queue.
    RETURN QUERY
    WITH waiting AS (
        SELECT j.priority, j.chunked_at, j.paused_at, sum(k.pending) AS pending
          FROM chunkq.crawl_jobs j JOIN chunkq.job_chunk_counts k ON k.job_id = j.id
         WHERE j.finished_at IS NULL
         GROUP BY j.id
        HAVING sum(k.pending) > 0
    ), by_priority AS (
        SELECT w.priority, sum(w.pending) AS pending,
               extract(epoch FROM now() - min(w.chunked_at) FILTER (WHERE w.paused_at IS NULL))::float8 AS oldest
          FROM waiting w
         GROUP BY w.priority
    )
    SELECT m.metric, m.labels, m.value
      FROM by_priority p
     CROSS JOIN LATERAL (VALUES
        ('chunkq_queue_pending_chunks', jsonb_build_object('priority', p.priority::text), p.pending::float8),
        ('chunkq_queue_oldest_pending_age_seconds', jsonb_build_object('priority', p.priority::text), p.oldest)
     ) m(metric, labels, value)
     WHERE m.value IS NOT NULL;

    -- Rate keys (0010): how many hold chunks back now, and for the keys in use (the
    -- ones holding back first, then by waiting chunks; at most 100, to bound the
    -- series) whether each does, its running and waiting chunks and its tokens.
    -- (The view is read once: a CTE named twice is computed once.)
    RETURN QUERY
    WITH keys AS (
        SELECT * FROM chunkq.rate_limit_state
    ), shown AS (
        SELECT k.* FROM keys k
         WHERE k.jobs > 0 OR k.held_back IS NOT NULL
         ORDER BY k.held_back IS NULL, k.pending_chunks DESC, k.key
         LIMIT 100
    )
    SELECT 'chunkq_rate_keys_throttled', '{}'::jsonb,
           (SELECT count(*) FROM keys k WHERE k.held_back IS NOT NULL)::float8
    UNION ALL
    SELECT m.metric, jsonb_build_object('key', k.key), m.value
      FROM shown k
     CROSS JOIN LATERAL (VALUES
        ('chunkq_rate_key_throttled', (k.held_back IS NOT NULL)::integer::float8),
        ('chunkq_rate_key_running_chunks', k.running_chunks::float8),
        ('chunkq_rate_key_pending_chunks', k.pending_chunks::float8),
        ('chunkq_rate_key_tokens', k.tokens)
     ) m(metric, value)
     WHERE m.value IS NOT NULL;

    RETURN QUERY
    SELECT v.metric, '{}'::jsonb, v.value
      FROM (VALUES
        ('chunkq_jobs_paused',
         (SELECT count(*) FROM chunkq.crawl_jobs j WHERE j.paused_at IS NOT NULL)::float8),
        ('chunkq_expired_leases',
         (SELECT count(*) FROM chunkq.job_chunks c WHERE c.lease_expires_at < now())::float8),
        ('chunkq_workers_connected', (SELECT count(*) FROM chunkq._connected_workers())::float8),
        -- A deferral (a handler's retry-after, 0010) is kept in chunk_errors too, but is no failure.
        ('chunkq_chunk_errors_per_second',
         (SELECT count(*) FROM chunkq.chunk_errors e
           WHERE e.failed_at > now() - interval '1 minute' AND NOT e.deferred)::float8 / 60),
        ('chunkq_chunk_deferrals_per_second',
         (SELECT count(*) FROM chunkq.chunk_errors e
           WHERE e.failed_at > now() - interval '1 minute' AND e.deferred)::float8 / 60),
        ('chunkq_chunk_errors_last_hour',
         (SELECT count(*) FROM chunkq.chunk_errors e
           WHERE e.failed_at > now() - interval '1 hour' AND NOT e.deferred)::float8),
        ('chunkq_dead_chunk_rows',
         (SELECT s.n_dead_tup FROM pg_stat_user_tables s WHERE s.relid = 'chunkq.job_chunks'::regclass)::float8),
        ('chunkq_last_vacuum_timestamp_seconds',
         (SELECT extract(epoch FROM greatest(s.last_autovacuum, s.last_vacuum)) FROM pg_stat_user_tables s
           WHERE s.relid = 'chunkq.job_chunks'::regclass)::float8),
        ('chunkq_autovacuum_enabled', current_setting('autovacuum')::boolean::integer::float8),
        ('chunkq_oldest_transaction_age_seconds',
         coalesce((SELECT extract(epoch FROM now() - a.xact_start) FROM pg_stat_activity a
                    WHERE a.datname = current_database() AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
                      AND a.pid <> pg_backend_pid()
                    ORDER BY a.xact_start LIMIT 1), 0)::float8)
      ) v(metric, value)
     WHERE v.value IS NOT NULL;
END $function$;
COMMENT ON FUNCTION chunkq.metrics_snapshot(integer) IS
    'Every gauge a Prometheus scrape of chunkq needs, in one call that reads the counter rows and a few index '
    'probes, never a count over job_chunks: chunks by state (in total and for the p_top_jobs unfinished or latest '
    'jobs, the rest under job "other"), jobs by status, pending chunks and the oldest pending age by priority, '
    'completion rate, failure ratio, errors, expired leases, connected workers, rate keys that hold chunks back '
    '(and, for up to 100 keys in use, each key''s state), dead rows, vacuum and the oldest open transaction. '
    'docs/monitoring.md explains each. Example: SELECT * FROM chunkq.metrics_snapshot(5) ORDER BY metric;';
GRANT EXECUTE ON FUNCTION chunkq.metrics_snapshot(integer) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.pause_job(p_job_id bigint)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job chunkq.crawl_jobs;
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'cannot pause crawl job %: it is %', p_job_id, v_job.status USING ERRCODE = 'CQ004';
    END IF;
    IF v_job.paused_at IS NOT NULL THEN
        RETURN v_job;  -- already paused
    END IF;
    -- Chunks first, the job row last (the lock order every function keeps).
    UPDATE chunkq.job_chunks SET available_at = 'infinity' WHERE job_id = p_job_id AND status = 'pending';
    UPDATE chunkq.crawl_jobs SET paused_at = now(), paused_reason = 'by an operator' WHERE id = p_job_id
    RETURNING * INTO v_job;
    RETURN v_job;
END $function$;
COMMENT ON FUNCTION chunkq.pause_job(bigint) IS
    'Stops handing out a job''s chunks; chunks already being processed carry on. Pausing a paused job does nothing; '
    'a finished or cancelled job raises CQ004.';
GRANT EXECUTE ON FUNCTION chunkq.pause_job(bigint) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.prune_finished_jobs(p_older_than interval, p_max_chunks integer DEFAULT 10000)
 RETURNS chunkq.prune_result
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_cutoff timestamptz;
    v_budget integer := p_max_chunks;
    v_job_id bigint;
    v_deleted integer;
    v_result chunkq.prune_result := (0, 0, false);
BEGIN
    IF p_older_than IS NULL OR p_older_than < '0'::interval THEN
        RAISE EXCEPTION 'older_than must not be negative, got %', coalesce(p_older_than::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_max_chunks IS NULL OR p_max_chunks NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'max_chunks must be between 1 and 1000000, got %', coalesce(p_max_chunks::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    v_cutoff := now() - p_older_than;
    FOR v_job_id IN
        SELECT j.id FROM chunkq.crawl_jobs j WHERE j.finished_at < v_cutoff ORDER BY j.finished_at, j.id
    LOOP
        EXIT WHEN v_budget = 0;
        -- The job lock keeps a concurrent retry_chunk from reopening the job under us.
        PERFORM chunkq._lock_job(v_job_id);
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j
                                   WHERE j.id = v_job_id AND j.finished_at < v_cutoff);
        DELETE FROM chunkq.job_chunks
         WHERE id IN (SELECT c.id FROM chunkq.job_chunks c WHERE c.job_id = v_job_id LIMIT v_budget);
        GET DIAGNOSTICS v_deleted = ROW_COUNT;
        v_budget := v_budget - v_deleted;
        v_result.chunks_deleted := v_result.chunks_deleted + v_deleted;
        IF NOT EXISTS (SELECT 1 FROM chunkq.job_chunks c WHERE c.job_id = v_job_id) THEN
            DELETE FROM chunkq.crawl_jobs WHERE id = v_job_id;
            v_result.jobs_deleted := v_result.jobs_deleted + 1;
        END IF;
    END LOOP;
    v_result.done := NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.finished_at < v_cutoff);
    RETURN v_result;
END $function$;
COMMENT ON FUNCTION chunkq.prune_finished_jobs(interval, integer) IS
    'Deletes jobs that finished more than p_older_than ago, oldest first, with their chunks and errors, but at '
    'most p_max_chunks chunks per call so that no call holds locks for long: call it again until done. In psql: '
    'SELECT * FROM chunkq.prune_finished_jobs(''30 days''); \watch 1 (until done is true). A job being pruned keeps '
    'its counts until its last chunk goes.';
GRANT EXECUTE ON FUNCTION chunkq.prune_finished_jobs(interval, integer) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.queue_stats()
 RETURNS chunkq.queue_stats
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT (SELECT count(*) FROM chunkq.crawl_jobs WHERE status = 'pending'),
           (SELECT count(*) FROM chunkq.crawl_jobs WHERE status = 'running'),
           coalesce(sum(k.pending), 0), coalesce(sum(k.processing), 0),
           (SELECT count(*) FROM chunkq.job_chunks c WHERE c.lease_expires_at < now()),
           coalesce(sum(k.completed), 0), coalesce(sum(k.failed), 0),
           CASE WHEN coalesce(sum(k.completed) + sum(k.failed), 0) = 0 THEN NULL
                ELSE sum(k.failed)::double precision / (sum(k.completed) + sum(k.failed)) END,
           (SELECT count(*) FROM chunkq.chunk_errors e WHERE e.failed_at > now() - interval '1 hour'),
           (SELECT max(d.oldest_pending_age) FROM chunkq.queue_depth d),
           (SELECT s.n_dead_tup FROM pg_stat_user_tables s WHERE s.relid = 'chunkq.job_chunks'::regclass),
           (SELECT greatest(s.last_autovacuum, s.last_vacuum) FROM pg_stat_user_tables s
             WHERE s.relid = 'chunkq.job_chunks'::regclass),
           current_setting('autovacuum')::boolean,
           (SELECT now() - a.xact_start FROM pg_stat_activity a
             WHERE a.datname = current_database() AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
               AND a.pid <> pg_backend_pid()
             ORDER BY a.xact_start LIMIT 1),
           (SELECT a.pid FROM pg_stat_activity a
             WHERE a.datname = current_database() AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
               AND a.pid <> pg_backend_pid()
             ORDER BY a.xact_start LIMIT 1)
      FROM chunkq.job_chunk_counts k;
$function$;
COMMENT ON FUNCTION chunkq.queue_stats() IS
    'One row about the whole queue: jobs pending and running, chunks by state (from the counters), expired leases, '
    'failure rate, errors in the last hour, age of the oldest pending chunk, dead chunk rows and the last vacuum, '
    'and the oldest open transaction (the xmin horizon).';
GRANT EXECUTE ON FUNCTION chunkq.queue_stats() TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.reclaim_expired_chunks(p_limit integer DEFAULT 100)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_moves chunkq._chunk_move[] := ARRAY(SELECT m FROM chunkq._reclaim_expired(p_limit) m);
BEGIN
    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
    END IF;
    RETURN cardinality(v_moves);
END $function$;
COMMENT ON FUNCTION chunkq.reclaim_expired_chunks(integer) IS
    'Puts back up to p_limit processing chunks whose lease expired (their worker died or stalled): to pending with '
    'retry_count + 1 while the job''s max_retries allow, else to failed. Each lapse is recorded in chunk_errors. '
    'claim_chunks calls this itself; returns how many chunks were reclaimed.';
GRANT EXECUTE ON FUNCTION chunkq.reclaim_expired_chunks(integer) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.release_chunk(p_chunk_id bigint, p_attempt integer, p_lease_token uuid DEFAULT NULL::uuid)
 RETURNS chunkq.job_chunks
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    UPDATE chunkq.job_chunks c
       SET status = 'pending', lease_expires_at = NULL, available_at = now()
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'release', p_lease_token);
    END IF;
    PERFORM chunkq._apply_chunk_moves(
        ARRAY[(v_chunk.job_id, v_chunk.chunk_index, 'processing', 'pending')::chunkq._chunk_move]);
    PERFORM chunkq._notify_claimable(v_chunk.job_id, 1);
    RETURN v_chunk;
END $function$;
COMMENT ON FUNCTION chunkq.release_chunk(bigint, integer, uuid) IS
    'Hands a processing chunk the caller holds (p_attempt and p_lease_token from its claim) back to pending at '
    'once, without counting a retry: for a worker shutting down before it could finish. The next claim gets '
    'attempt + 1 and a new token, so the releasing worker can never report on the chunk again. Raises like '
    'complete_chunk.';
GRANT EXECUTE ON FUNCTION chunkq.release_chunk(bigint, integer, uuid) TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.resume_job(p_job_id bigint)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job chunkq.crawl_jobs;
    v_released integer;
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'cannot resume crawl job %: it is %', p_job_id, v_job.status USING ERRCODE = 'CQ004';
    END IF;
    IF v_job.paused_at IS NULL THEN
        RETURN v_job;  -- not paused
    END IF;
    -- Pending chunks (also any a failure budget's pause could not reach) are claimable
    -- again, from the front of the queue: a resumed job takes turns, it does not go first.
    UPDATE chunkq.job_chunks SET available_at = now()
     WHERE job_id = p_job_id AND status = 'pending' AND available_at = 'infinity';
    GET DIAGNOSTICS v_released = ROW_COUNT;
    PERFORM chunkq._requeue_job(p_job_id, v_job.weight);
    UPDATE chunkq.crawl_jobs SET paused_at = NULL, paused_reason = NULL, budget_reset_at = now() WHERE id = p_job_id
    RETURNING * INTO v_job;
    PERFORM chunkq._notify_claimable(p_job_id, v_released);
    RETURN v_job;
END $function$;
COMMENT ON FUNCTION chunkq.resume_job(bigint) IS
    'Lets a paused job''s chunks be claimed again (taking turns with the jobs waiting, from the front of the '
    'queue), and clears a tripped failure budget. Resuming a job that is not paused does nothing; a finished or '
    'cancelled job raises CQ004.';
GRANT EXECUTE ON FUNCTION chunkq.resume_job(bigint) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.retry_chunk(p_chunk_id bigint)
 RETURNS chunkq.job_chunks
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job_id bigint;
    v_chunk chunkq.job_chunks;
BEGIN
    SELECT job_id INTO v_job_id FROM chunkq.job_chunks WHERE id = p_chunk_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunk % does not exist', p_chunk_id USING ERRCODE = 'CQ003';
    END IF;
    PERFORM chunkq._lock_job(v_job_id);
    IF (SELECT status FROM chunkq.crawl_jobs WHERE id = v_job_id) = 'cancelled' THEN
        RAISE EXCEPTION 'cannot retry chunk %: job % is cancelled', p_chunk_id, v_job_id USING ERRCODE = 'CQ004';
    END IF;

    -- By key, then the status: a "status = 'failed'" predicate could send the
    -- planner through job_chunks_failed_by_job, every failed chunk of every job.
    SELECT * INTO v_chunk FROM chunkq.job_chunks WHERE id = p_chunk_id FOR UPDATE;
    IF v_chunk.status <> 'failed' THEN
        RAISE EXCEPTION 'cannot retry chunk %: it is %, not failed', p_chunk_id, v_chunk.status
            USING ERRCODE = 'CQ004';
    END IF;
    UPDATE chunkq.job_chunks c
       SET status = 'pending', retry_count = c.retry_count + 1, available_at = now(),
           finished_at = NULL, task_id = NULL
     WHERE c.id = p_chunk_id
    RETURNING c.* INTO v_chunk;
    PERFORM chunkq._apply_chunk_moves(ARRAY[(v_chunk.job_id, v_chunk.chunk_index, 'failed', 'pending')::chunkq._chunk_move]);
    PERFORM chunkq._notify_claimable(v_chunk.job_id, 1);
    RETURN v_chunk;
END $function$;
COMMENT ON FUNCTION chunkq.retry_chunk(bigint) IS
    'Puts a failed chunk back to pending at once with retry_count + 1, whatever max_retries says (an explicit '
    'retry is the operator''s call). A finished job becomes running again. Raises CQ004 unless the chunk is failed.';
GRANT EXECUTE ON FUNCTION chunkq.retry_chunk(bigint) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.retry_failed_chunks(p_job_id bigint)
 RETURNS integer
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_status chunkq.job_status;
    v_moves chunkq._chunk_move[];
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT status INTO v_status FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_status = 'cancelled' THEN
        RAISE EXCEPTION 'cannot retry chunks of job %: it is cancelled', p_job_id USING ERRCODE = 'CQ004';
    END IF;
    WITH retried AS (
        UPDATE chunkq.job_chunks c
           SET status = 'pending', retry_count = c.retry_count + 1, available_at = now(),
               finished_at = NULL, task_id = NULL
         WHERE c.job_id = p_job_id AND c.status = 'failed'
        RETURNING (c.job_id, c.chunk_index, 'failed', 'pending')::chunkq._chunk_move AS move
    )
    SELECT coalesce(array_agg(move), '{}') INTO v_moves FROM retried;
    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
        PERFORM chunkq._notify_claimable(p_job_id, cardinality(v_moves));
    END IF;
    RETURN cardinality(v_moves);
END $function$;
COMMENT ON FUNCTION chunkq.retry_failed_chunks(bigint) IS
    'retry_chunk for every failed chunk of a job at once; returns how many (0 when none: safe to repeat). A '
    'finished job becomes running again. Raises CQ004 for a cancelled job.';
GRANT EXECUTE ON FUNCTION chunkq.retry_failed_chunks(bigint) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.schema_version()
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$SELECT 12$function$;
COMMENT ON FUNCTION chunkq.schema_version() IS
    'Version of the chunkq schema: the number of the last migration applied. Clients refuse to run against an '
    'older one.';
GRANT EXECUTE ON FUNCTION chunkq.schema_version() TO chunkq_reader;
GRANT EXECUTE ON FUNCTION chunkq.schema_version() TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.search_jobs(p_status chunkq.job_status DEFAULT NULL::chunkq.job_status, p_name text DEFAULT NULL::text, p_limit integer DEFAULT 50, p_offset integer DEFAULT 0)
 RETURNS SETOF chunkq.job_overview
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_offset IS NULL OR p_offset < 0 THEN
        RAISE EXCEPTION 'offset must not be negative, got %', coalesce(p_offset::text, 'NULL') USING ERRCODE = 'CQ001';
    END IF;
    -- strpos, not LIKE: a name typed with % or _ in it is looked for as written.
    RETURN QUERY SELECT * FROM chunkq.job_overview o
                  WHERE (p_status IS NULL OR o.status = p_status)
                    AND (p_name IS NULL OR strpos(lower(o.name), lower(p_name)) > 0)
                  ORDER BY o.id DESC
                  LIMIT p_limit OFFSET p_offset;
END $function$;
COMMENT ON FUNCTION chunkq.search_jobs(chunkq.job_status, text, integer, integer) IS
    'A page of job_overview, newest first: optionally only one status, and only names containing p_name '
    '(case-insensitive, taken literally). count_jobs gives the number of matches. Example: SELECT * FROM '
    'chunkq.search_jobs(''running'', ''cats'', 50, 100);';
GRANT EXECUTE ON FUNCTION chunkq.search_jobs(chunkq.job_status, text, integer, integer) TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.set_job_limits(p_job_id bigint, p_limits jsonb)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job chunkq.crawl_jobs;
    v_unknown text;
    v_old_weight real;
BEGIN
    IF p_limits IS NULL OR jsonb_typeof(p_limits) <> 'object' THEN
        RAISE EXCEPTION 'limits must be a JSON object' USING ERRCODE = 'CQ001';
    END IF;
    SELECT k INTO v_unknown FROM jsonb_object_keys(p_limits) k
     WHERE k NOT IN ('max_running', 'rate_key', 'weight', 'max_failed_ratio', 'max_failed_chunks',
                     'max_consecutive_failures')
     LIMIT 1;
    IF v_unknown IS NOT NULL THEN
        RAISE EXCEPTION 'unknown job limit %', v_unknown USING ERRCODE = 'CQ001',
            HINT = 'One of max_running, rate_key, weight, max_failed_ratio, max_failed_chunks, max_consecutive_failures.';
    END IF;
    IF p_limits ? 'weight' AND jsonb_typeof(p_limits -> 'weight') = 'null' THEN
        RAISE EXCEPTION 'a job''s weight cannot be removed, only changed' USING ERRCODE = 'CQ001';
    END IF;
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'cannot change the limits of crawl job %: it is %', p_job_id, v_job.status
            USING ERRCODE = 'CQ004';
    END IF;
    v_old_weight := v_job.weight;
    BEGIN
        v_job := jsonb_populate_record(v_job, p_limits);
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'bad job limits %: %', p_limits, SQLERRM USING ERRCODE = 'CQ001';
    END;
    PERFORM chunkq._validate_limits(v_job.max_running, v_job.rate_key, v_job.weight, v_job.max_failed_ratio,
                                    v_job.max_failed_chunks, v_job.max_consecutive_failures);
    -- Chunks first, the job row last (the lock order every function keeps).
    PERFORM chunkq._set_limited(p_job_id, v_job.max_running IS NOT NULL
                                          OR EXISTS (SELECT 1 FROM chunkq.rate_limits r WHERE r.key = v_job.rate_key));
    IF v_job.weight <> v_old_weight THEN
        PERFORM chunkq._requeue_job(p_job_id, v_job.weight);
    END IF;
    UPDATE chunkq.crawl_jobs j
       SET max_running = v_job.max_running, rate_key = v_job.rate_key, weight = v_job.weight,
           max_failed_ratio = v_job.max_failed_ratio, max_failed_chunks = v_job.max_failed_chunks,
           max_consecutive_failures = v_job.max_consecutive_failures
     WHERE j.id = p_job_id;
    PERFORM chunkq._notify_claimable(p_job_id, 1);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    RETURN v_job;
END $function$;
COMMENT ON FUNCTION chunkq.set_job_limits(bigint, jsonb) IS
    'Changes a job''s limits while it runs: a JSON object with any of max_running, rate_key, weight, '
    'max_failed_ratio, max_failed_chunks, max_consecutive_failures (null removes one; others stay). Example: '
    'SELECT * FROM chunkq.set_job_limits(42, ''{"max_running": 8, "rate_key": "images.example.com"}'');';
GRANT EXECUTE ON FUNCTION chunkq.set_job_limits(bigint, jsonb) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.set_job_priority(p_job_id bigint, p_priority integer)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_job chunkq.crawl_jobs;
BEGIN
    PERFORM chunkq._validate_priority(p_priority);
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'cannot change the priority of crawl job %: it is %', p_job_id, v_job.status
            USING ERRCODE = 'CQ004';
    END IF;
    UPDATE chunkq.job_chunks SET priority = p_priority
     WHERE job_id = p_job_id AND status IN ('pending', 'processing') AND priority <> p_priority;
    -- Its chunks join the new priority's queue at the front, taking turns there.
    PERFORM chunkq._requeue_job(p_job_id, v_job.weight);
    UPDATE chunkq.crawl_jobs SET priority = p_priority WHERE id = p_job_id RETURNING * INTO v_job;
    RETURN v_job;
END $function$;
COMMENT ON FUNCTION chunkq.set_job_priority(bigint, integer) IS
    'Gives a job and its unfinished chunks a new priority (in the settings range). A finished or cancelled job '
    'raises CQ004.';
GRANT EXECUTE ON FUNCTION chunkq.set_job_priority(bigint, integer) TO chunkq_app;

CREATE OR REPLACE FUNCTION chunkq.set_rate_limit(p_key text, p_rate double precision DEFAULT NULL::double precision, p_burst integer DEFAULT NULL::integer, p_max_running integer DEFAULT NULL::integer)
 RETURNS chunkq.rate_limits
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
DECLARE
    v_limit chunkq.rate_limits;
    v_burst integer;
    v_job bigint;
BEGIN
    IF p_key IS NULL OR btrim(p_key) = '' OR length(p_key) > 200 THEN
        RAISE EXCEPTION 'a rate key must be 1 to 200 characters and not blank' USING ERRCODE = 'CQ001';
    END IF;
    IF p_rate IS NOT NULL AND NOT (p_rate > 0 AND p_rate <= 1000000) THEN
        RAISE EXCEPTION 'rate must be more than 0 and at most 1000000 chunks per second, got %', p_rate
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_burst IS NOT NULL AND (p_burst NOT BETWEEN 1 AND 1000000 OR p_rate IS NULL) THEN
        RAISE EXCEPTION 'burst must be between 1 and 1000000 chunks, and needs a rate; got %', p_burst
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_max_running IS NOT NULL AND p_max_running < 1 THEN
        RAISE EXCEPTION 'max_running must be at least 1, got %', p_max_running USING ERRCODE = 'CQ001';
    END IF;
    v_burst := CASE WHEN p_rate IS NULL THEN NULL ELSE coalesce(p_burst, greatest(1, ceil(p_rate)::integer)) END;
    -- The key's jobs' chunks first, then the key's row: a claim locks them in that order.
    FOR v_job IN SELECT j.id FROM chunkq.crawl_jobs j WHERE j.rate_key = p_key AND j.finished_at IS NULL ORDER BY j.id
    LOOP
        PERFORM chunkq._set_limited(v_job, true);
    END LOOP;
    INSERT INTO chunkq.rate_limits AS r (key, rate, burst, max_running, tokens)
    VALUES (p_key, p_rate, v_burst, p_max_running, coalesce(v_burst, 0))
    ON CONFLICT (key) DO UPDATE
       SET rate = excluded.rate, burst = excluded.burst, max_running = excluded.max_running,
           tokens = least(coalesce(excluded.burst, 0), r.tokens), refilled_at = now(), updated_at = now()
    RETURNING * INTO v_limit;
    PERFORM chunkq._notify_claimable(NULL, 1);
    RETURN v_limit;
END $function$;
COMMENT ON FUNCTION chunkq.set_rate_limit(text, double precision, integer, integer) IS
    'Sets the limits of a rate key across all its jobs: p_rate chunks per second (token bucket, bursts of p_burst, '
    'default the rate rounded up), p_max_running chunks processing at once; NULL: no such limit. Example: SELECT * '
    'FROM chunkq.set_rate_limit(''images.example.com'', 5, 10, 8);';
GRANT EXECUTE ON FUNCTION chunkq.set_rate_limit(text, double precision, integer, integer) TO chunkq_app;
