-- chunkq 0001: the chunk queue. Its tables and the SQL API that changes them:
-- create a job and its chunks, claim, heartbeat, complete, fail, retry, reclaim,
-- progress, cancel. The Python client only calls these functions, so a DBA can do
-- from psql whatever it does.
-- Conventions: functions verb_noun, parameters p_, locals v_, "_" for internal
-- names; errors carry chunkq's own SQLSTATEs (chunkq.error_codes).
-- Lock order, kept everywhere so that concurrent calls queue instead of
-- deadlocking: chunk rows -> counter rows by (job, slot) -> job rows; job-level
-- operations first take a per-job advisory lock (docs/architecture.md).
-- The per-chunk functions use generic plans: re-planning cost more than running.
-- depends:

CREATE SCHEMA chunkq;
COMMENT ON SCHEMA chunkq IS
    'chunkq: a job-chunk queue. Crawl jobs are split into chunks of images that worker processes claim, '
    'heartbeat and complete through the functions in this schema; \df chunkq.* lists the whole API.';

-- ---------------------------------------------------------------------------
-- Types
-- ---------------------------------------------------------------------------

CREATE TYPE chunkq.chunk_status AS ENUM ('pending', 'processing', 'completed', 'failed', 'cancelled');
COMMENT ON TYPE chunkq.chunk_status IS
    'Life of a chunk: pending (claimable once available_at has passed) -> processing (leased to one worker) '
    '-> completed | failed | cancelled. A failed chunk returns to pending through retry_chunk.';

CREATE TYPE chunkq.job_status AS ENUM ('pending', 'running', 'completed', 'failed', 'cancelled');
COMMENT ON TYPE chunkq.job_status IS
    'Life of a crawl job, driven by its chunks: pending until a chunk is first claimed, running, then '
    'completed (every chunk completed) or failed (some chunk failed) once no chunk is pending or processing; '
    'cancelled by cancel_job. Retrying a failed chunk of a finished job makes it running again.';

-- ---------------------------------------------------------------------------
-- Settings: the per-deployment defaults. Change them with UPDATE; the CHECKs
-- reject a bad value at once.
-- ---------------------------------------------------------------------------

CREATE TABLE chunkq.settings (
    singleton boolean PRIMARY KEY DEFAULT true,
    chunk_size integer NOT NULL DEFAULT 500,
    min_priority smallint NOT NULL DEFAULT 0,
    max_priority smallint NOT NULL DEFAULT 10,
    default_priority smallint NOT NULL DEFAULT 5,
    default_max_retries integer NOT NULL DEFAULT 3,
    default_lease interval NOT NULL DEFAULT '5 minutes',
    max_chunks_per_job integer NOT NULL DEFAULT 1000000,
    max_error_length integer NOT NULL DEFAULT 10000,
    retry_base_delay interval NOT NULL DEFAULT '10 seconds',
    retry_max_delay interval NOT NULL DEFAULT '1 hour',
    CONSTRAINT settings_single_row CHECK (singleton),
    CONSTRAINT settings_chunk_size_in_range CHECK (chunk_size BETWEEN 1 AND 1000000),
    CONSTRAINT settings_priority_range_valid
        CHECK (0 <= min_priority AND min_priority <= default_priority AND default_priority <= max_priority),
    CONSTRAINT settings_max_retries_in_range CHECK (default_max_retries BETWEEN 0 AND 1000),
    CONSTRAINT settings_lease_positive CHECK (default_lease > '0'::interval),
    CONSTRAINT settings_max_chunks_positive CHECK (max_chunks_per_job BETWEEN 1 AND 100000000),
    CONSTRAINT settings_max_error_length_in_range CHECK (max_error_length BETWEEN 100 AND 1000000),
    CONSTRAINT settings_retry_delays_valid
        CHECK (retry_base_delay >= '0'::interval AND retry_max_delay >= retry_base_delay)
);
INSERT INTO chunkq.settings DEFAULT VALUES;
COMMENT ON TABLE chunkq.settings IS
    'One row of per-deployment defaults, used wherever a call passes NULL. Example: '
    'UPDATE chunkq.settings SET chunk_size = 1000, max_priority = 20;';
COMMENT ON COLUMN chunkq.settings.singleton IS 'Always true: keeps this table to one row.';
COMMENT ON COLUMN chunkq.settings.chunk_size IS 'Images per chunk when create_job / create_chunks get no chunk size.';
COMMENT ON COLUMN chunkq.settings.min_priority IS 'Lowest priority a job or chunk may have.';
COMMENT ON COLUMN chunkq.settings.max_priority IS 'Highest priority a job or chunk may have; higher is claimed first.';
COMMENT ON COLUMN chunkq.settings.default_priority IS 'Priority of a job created without one.';
COMMENT ON COLUMN chunkq.settings.default_max_retries IS 'Retries a failed or abandoned chunk gets when its job sets none.';
COMMENT ON COLUMN chunkq.settings.default_lease IS 'How long a claim lasts without a heartbeat when the claim names no lease.';
COMMENT ON COLUMN chunkq.settings.max_chunks_per_job IS 'Largest number of chunks one job may be split into; guards against absurd max_images.';
COMMENT ON COLUMN chunkq.settings.max_error_length IS 'Error messages longer than this many characters are cut, with a note saying so.';
COMMENT ON COLUMN chunkq.settings.retry_base_delay IS 'First automatic retry waits about this long; each further retry doubles it (plus jitter).';
COMMENT ON COLUMN chunkq.settings.retry_max_delay IS 'Upper bound on the wait before an automatic retry.';

-- ---------------------------------------------------------------------------
-- Error codes: every error chunkq raises on purpose, by SQLSTATE.
-- ---------------------------------------------------------------------------

CREATE TABLE chunkq.error_codes (
    sqlstate char(5) PRIMARY KEY,
    name text NOT NULL UNIQUE,
    meaning text NOT NULL,
    CONSTRAINT error_codes_sqlstate_in_class_cq CHECK (sqlstate ~ '^CQ[0-9A-Z]{3}$')
);
COMMENT ON TABLE chunkq.error_codes IS
    'The SQLSTATEs chunkq functions raise, with the Python exception each maps to. A failed call changes nothing.';
COMMENT ON COLUMN chunkq.error_codes.sqlstate IS 'SQLSTATE of the error (class CQ is chunkq''s own).';
COMMENT ON COLUMN chunkq.error_codes.name IS 'Name of the matching exception class in the chunkq Python package.';
COMMENT ON COLUMN chunkq.error_codes.meaning IS 'When it is raised.';
INSERT INTO chunkq.error_codes (sqlstate, name, meaning) VALUES
    ('CQ001', 'ValidationError', 'An argument is out of range or malformed; nothing was changed.'),
    ('CQ002', 'JobNotFound', 'No crawl job has that id.'),
    ('CQ003', 'ChunkNotFound', 'No chunk has that id.'),
    ('CQ004', 'InvalidTransition', 'The job or chunk is not in a state that allows this operation.'),
    ('CQ005', 'JobAlreadyChunked', 'create_chunks was called for a job that already has its chunks.'),
    ('CQ006', 'LeaseLost', 'The caller no longer holds the chunk: its lease expired and the chunk was reclaimed, '
                           'or another attempt now holds it. The newer attempt is left untouched.'),
    ('CQ007', 'ChunkCancelled', 'The chunk was cancelled with its job while the caller held it; stop working on it.');

-- ---------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------

CREATE FUNCTION chunkq._counter_slots() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 16';
COMMENT ON FUNCTION chunkq._counter_slots() IS
    'Internal: how many job_chunk_counts rows a job''s chunks are spread over (slot = chunk_index % 16).';

CREATE TABLE chunkq.crawl_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id bigint NOT NULL,
    name text NOT NULL,
    keywords jsonb NOT NULL DEFAULT '[]',
    max_images bigint NOT NULL,
    chunk_size integer NOT NULL,
    priority smallint NOT NULL,
    max_retries integer NOT NULL,
    status chunkq.job_status NOT NULL DEFAULT 'pending',
    total_chunks integer NOT NULL DEFAULT 0,
    open_slots smallint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    chunked_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    CONSTRAINT crawl_jobs_name_not_blank CHECK (btrim(name) <> '' AND length(name) <= 500),
    CONSTRAINT crawl_jobs_max_images_positive CHECK (max_images > 0),
    CONSTRAINT crawl_jobs_chunk_size_positive CHECK (chunk_size > 0),
    CONSTRAINT crawl_jobs_priority_not_negative CHECK (priority >= 0),
    CONSTRAINT crawl_jobs_max_retries_not_negative CHECK (max_retries >= 0),
    CONSTRAINT crawl_jobs_chunk_count_matches
        CHECK ((chunked_at IS NULL AND total_chunks = 0)
               OR (chunked_at IS NOT NULL AND total_chunks = (max_images + chunk_size - 1) / chunk_size)),
    CONSTRAINT crawl_jobs_open_slots_in_range CHECK (open_slots BETWEEN 0 AND LEAST(total_chunks, chunkq._counter_slots())),
    CONSTRAINT crawl_jobs_finished_iff_final
        CHECK ((status IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CONSTRAINT crawl_jobs_running_has_started CHECK (status <> 'running' OR started_at IS NOT NULL)
);
CREATE INDEX crawl_jobs_by_project ON chunkq.crawl_jobs (project_id);
COMMENT ON INDEX chunkq.crawl_jobs_by_project IS 'The application''s lookups of a project''s jobs.';
COMMENT ON TABLE chunkq.crawl_jobs IS
    'A crawl job: up to max_images images to fetch, split by create_chunks into chunks of chunk_size images. '
    'Its status follows its chunks; see chunkq.job_status.';
COMMENT ON COLUMN chunkq.crawl_jobs.id IS 'Job id.';
COMMENT ON COLUMN chunkq.crawl_jobs.project_id IS 'The application''s project this job belongs to (not checked by chunkq).';
COMMENT ON COLUMN chunkq.crawl_jobs.name IS 'Human-readable name.';
COMMENT ON COLUMN chunkq.crawl_jobs.keywords IS 'Search keywords or any other JSON the workers need; handed to every chunk''s handler.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_images IS 'Number of images to crawl; chunks cover images 0 .. max_images-1.';
COMMENT ON COLUMN chunkq.crawl_jobs.chunk_size IS 'Images per chunk (the last chunk may be smaller).';
COMMENT ON COLUMN chunkq.crawl_jobs.priority IS 'Priority given to the job''s chunks when they are created; higher is claimed first.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_retries IS 'How many times a chunk that failed or was abandoned is put back automatically.';
COMMENT ON COLUMN chunkq.crawl_jobs.status IS 'See chunkq.job_status.';
COMMENT ON COLUMN chunkq.crawl_jobs.total_chunks IS 'Number of chunks, 0 until create_chunks.';
COMMENT ON COLUMN chunkq.crawl_jobs.open_slots IS
    'Internal: how many of the job''s job_chunk_counts rows still count a pending or processing chunk. '
    'The call that brings it to 0 finishes the job, exactly once.';
COMMENT ON COLUMN chunkq.crawl_jobs.created_at IS 'When the job was created.';
COMMENT ON COLUMN chunkq.crawl_jobs.chunked_at IS 'When create_chunks split the job; NULL before.';
COMMENT ON COLUMN chunkq.crawl_jobs.started_at IS 'When the first chunk was claimed.';
COMMENT ON COLUMN chunkq.crawl_jobs.finished_at IS 'When the job completed, failed or was cancelled; NULL while it can still run.';

CREATE TABLE chunkq.job_chunks (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES chunkq.crawl_jobs (id) ON DELETE CASCADE,
    chunk_index integer NOT NULL,
    image_start bigint NOT NULL,
    image_end bigint NOT NULL,
    status chunkq.chunk_status NOT NULL DEFAULT 'pending',
    priority smallint NOT NULL,
    attempt integer NOT NULL DEFAULT 0,
    retry_count integer NOT NULL DEFAULT 0,
    worker_id text,
    task_id text,
    lease_expires_at timestamptz,
    available_at timestamptz NOT NULL DEFAULT now(),
    error_message text,
    created_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz,
    heartbeat_at timestamptz,
    finished_at timestamptz,
    CONSTRAINT job_chunks_one_per_index UNIQUE (job_id, chunk_index),
    CONSTRAINT job_chunks_index_not_negative CHECK (chunk_index >= 0),
    CONSTRAINT job_chunks_image_range_valid CHECK (image_start >= 0 AND image_end >= image_start),
    CONSTRAINT job_chunks_priority_not_negative CHECK (priority >= 0),
    CONSTRAINT job_chunks_counts_not_negative CHECK (attempt >= 0 AND retry_count >= 0),
    CONSTRAINT job_chunks_retries_within_attempts CHECK (retry_count <= attempt),
    CONSTRAINT job_chunks_processing_is_leased
        CHECK ((status = 'processing') = (lease_expires_at IS NOT NULL)),
    CONSTRAINT job_chunks_processing_has_holder
        CHECK (status <> 'processing' OR (worker_id IS NOT NULL AND attempt > 0)),
    CONSTRAINT job_chunks_finished_iff_final
        CHECK ((status IN ('completed', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CONSTRAINT job_chunks_failed_has_error CHECK (status <> 'failed' OR error_message IS NOT NULL),
    CONSTRAINT job_chunks_completed_was_claimed CHECK (status <> 'completed' OR attempt > 0)
);
-- The claim: pending chunks in claim order. Partial, so it holds only what is
-- claimable and stays small however many finished chunks the table keeps.
CREATE INDEX job_chunks_claim_order ON chunkq.job_chunks (priority DESC, id) WHERE status = 'pending';
-- The same for a claim limited to one job (the seed's get_next_pending_chunk).
CREATE INDEX job_chunks_claim_order_by_job ON chunkq.job_chunks (job_id, priority DESC, id) WHERE status = 'pending';
-- Reclaiming abandoned chunks: processing chunks by lease expiry. The predicate
-- names the lease, not the status (the two go together, see
-- job_chunks_processing_is_leased): a predicate on status = 'processing' would
-- tempt the planner to answer "WHERE id = $1 AND status = 'processing'" (every
-- heartbeat and completion) by scanning all in-flight chunks instead of the key.
CREATE INDEX job_chunks_lease_expiry ON chunkq.job_chunks (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
-- get_failed_chunks for one job without reading the job's other chunks.
CREATE INDEX job_chunks_failed_by_job ON chunkq.job_chunks (job_id, chunk_index) WHERE status = 'failed';
COMMENT ON TABLE chunkq.job_chunks IS
    'One chunk of a crawl job: the inclusive image range image_start..image_end. Change it only through '
    'the chunkq functions, which keep job_chunk_counts and the job''s status in step.';
COMMENT ON COLUMN chunkq.job_chunks.id IS 'Chunk id.';
COMMENT ON COLUMN chunkq.job_chunks.job_id IS 'The crawl job; deleting the job deletes its chunks.';
COMMENT ON COLUMN chunkq.job_chunks.chunk_index IS 'Position in the job, from 0.';
COMMENT ON COLUMN chunkq.job_chunks.image_start IS 'First image of the chunk (inclusive).';
COMMENT ON COLUMN chunkq.job_chunks.image_end IS 'Last image of the chunk (inclusive).';
COMMENT ON COLUMN chunkq.job_chunks.status IS 'See chunkq.chunk_status.';
COMMENT ON COLUMN chunkq.job_chunks.priority IS 'Higher is claimed first; equal priorities are claimed oldest first.';
COMMENT ON COLUMN chunkq.job_chunks.attempt IS
    'How many times the chunk has been claimed. It is also the fencing token: heartbeat, complete and fail '
    'must present the attempt they claimed, so a worker that lost its lease cannot overwrite a newer attempt.';
COMMENT ON COLUMN chunkq.job_chunks.retry_count IS 'How many times the chunk was put back after a failure or an expired lease.';
COMMENT ON COLUMN chunkq.job_chunks.worker_id IS 'Who holds the chunk (processing) or last held it (finished).';
COMMENT ON COLUMN chunkq.job_chunks.task_id IS 'Optional caller reference for the current attempt, e.g. a task id.';
COMMENT ON COLUMN chunkq.job_chunks.lease_expires_at IS
    'While processing: when the claim lapses unless heartbeat_chunk extends it. An expired chunk is reclaimed '
    'by the next claim (or reclaim_expired_chunks) and the lapse counts as a retry.';
COMMENT ON COLUMN chunkq.job_chunks.available_at IS 'A pending chunk is not claimed before this time (retry backoff).';
COMMENT ON COLUMN chunkq.job_chunks.error_message IS 'Last error recorded for the chunk; chunk_errors keeps every one.';
COMMENT ON COLUMN chunkq.job_chunks.created_at IS 'When the chunk was created.';
COMMENT ON COLUMN chunkq.job_chunks.claimed_at IS 'When the current or last attempt was claimed.';
COMMENT ON COLUMN chunkq.job_chunks.heartbeat_at IS 'Last claim or heartbeat of the current or last attempt.';
COMMENT ON COLUMN chunkq.job_chunks.finished_at IS 'When the chunk completed, failed or was cancelled.';
COMMENT ON INDEX chunkq.job_chunks_claim_order IS 'Claim order over claimable chunks: priority, then age.';
COMMENT ON INDEX chunkq.job_chunks_claim_order_by_job IS 'Claim order within one job.';
COMMENT ON INDEX chunkq.job_chunks_lease_expiry IS 'Finds processing chunks whose lease has expired.';
COMMENT ON INDEX chunkq.job_chunks_failed_by_job IS 'Lists a job''s failed chunks.';

-- Progress counters. Each job's chunks are spread over up to 16 rows by
-- chunk_index % 16, so concurrent workers finishing neighbouring chunks of one
-- job update different rows and do not queue on one lock; progress sums at most
-- 16 small rows however large the job.
CREATE TABLE chunkq.job_chunk_counts (
    job_id bigint NOT NULL REFERENCES chunkq.crawl_jobs (id) ON DELETE CASCADE,
    slot smallint NOT NULL,
    total integer NOT NULL,
    pending integer NOT NULL,
    processing integer NOT NULL DEFAULT 0,
    completed integer NOT NULL DEFAULT 0,
    failed integer NOT NULL DEFAULT 0,
    cancelled integer NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, slot),
    CONSTRAINT job_chunk_counts_slot_in_range CHECK (slot >= 0 AND slot < chunkq._counter_slots()),
    CONSTRAINT job_chunk_counts_not_negative
        CHECK (pending >= 0 AND processing >= 0 AND completed >= 0 AND failed >= 0 AND cancelled >= 0),
    CONSTRAINT job_chunk_counts_add_up CHECK (pending + processing + completed + failed + cancelled = total)
);
COMMENT ON TABLE chunkq.job_chunk_counts IS
    'Chunk counts by status for each job, split over up to 16 rows (slot = chunk_index % 16) so that '
    'completions of one job rarely wait on each other. A job''s progress is the sum of its rows.';
COMMENT ON COLUMN chunkq.job_chunk_counts.job_id IS 'The crawl job.';
COMMENT ON COLUMN chunkq.job_chunk_counts.slot IS 'chunk_index % 16 of the chunks this row counts.';
COMMENT ON COLUMN chunkq.job_chunk_counts.total IS 'Chunks counted by this row; never changes.';
COMMENT ON COLUMN chunkq.job_chunk_counts.pending IS 'Of those, how many are pending.';
COMMENT ON COLUMN chunkq.job_chunk_counts.processing IS 'Of those, how many are processing.';
COMMENT ON COLUMN chunkq.job_chunk_counts.completed IS 'Of those, how many are completed.';
COMMENT ON COLUMN chunkq.job_chunk_counts.failed IS 'Of those, how many are failed.';
COMMENT ON COLUMN chunkq.job_chunk_counts.cancelled IS 'Of those, how many are cancelled.';

CREATE TABLE chunkq.chunk_errors (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chunk_id bigint NOT NULL REFERENCES chunkq.job_chunks (id) ON DELETE CASCADE,
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    worker_id text,
    error text NOT NULL,
    lease_expired boolean NOT NULL DEFAULT false,
    retried boolean NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chunk_errors_by_chunk ON chunkq.chunk_errors (chunk_id, attempt);
COMMENT ON TABLE chunkq.chunk_errors IS 'Every error recorded for a chunk, one row per failed or abandoned attempt.';
COMMENT ON COLUMN chunkq.chunk_errors.id IS 'Error id, in the order errors were recorded.';
COMMENT ON COLUMN chunkq.chunk_errors.chunk_id IS 'The chunk.';
COMMENT ON COLUMN chunkq.chunk_errors.job_id IS 'The chunk''s job, for grouping errors by job.';
COMMENT ON COLUMN chunkq.chunk_errors.attempt IS 'The attempt that failed (job_chunks.attempt at the time).';
COMMENT ON COLUMN chunkq.chunk_errors.worker_id IS 'Who held the attempt.';
COMMENT ON COLUMN chunkq.chunk_errors.error IS 'What went wrong, cut to settings.max_error_length.';
COMMENT ON COLUMN chunkq.chunk_errors.lease_expired IS 'True when the attempt was abandoned (its lease expired and it was reclaimed) rather than reported as failed.';
COMMENT ON COLUMN chunkq.chunk_errors.retried IS 'Whether the chunk was put back to pending after this error.';
COMMENT ON COLUMN chunkq.chunk_errors.failed_at IS 'When the error was recorded.';
COMMENT ON INDEX chunkq.chunk_errors_by_chunk IS 'Error history of one chunk.';

-- ---------------------------------------------------------------------------
-- Composite results
-- ---------------------------------------------------------------------------

CREATE TYPE chunkq.chunk_outcome AS (
    chunk_id bigint,
    job_id bigint,
    chunk_status chunkq.chunk_status,
    attempt integer,
    retry_count integer,
    available_at timestamptz,
    job_status chunkq.job_status,
    job_finished boolean
);
COMMENT ON TYPE chunkq.chunk_outcome IS
    'What complete_chunk and fail_chunk did: the chunk''s new status, its job''s status, and job_finished = '
    'true for the one call that finished the job.';

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
    is_complete boolean
);
COMMENT ON TYPE chunkq.job_progress IS
    'Progress of one job. completion_percentage = completed / total * 100; is_complete = the job has chunks '
    'and none is pending or processing.';

CREATE TYPE chunkq._chunk_move AS (
    job_id bigint,
    chunk_index integer,
    from_status chunkq.chunk_status,
    to_status chunkq.chunk_status
);
COMMENT ON TYPE chunkq._chunk_move IS
    'Internal: one chunk''s change of status, as booked by _apply_chunk_moves.';

-- ---------------------------------------------------------------------------
-- Internal helpers
-- ---------------------------------------------------------------------------

CREATE FUNCTION chunkq._lock_job(p_job_id bigint) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtext('chunkq.job'), (p_job_id & 2147483647)::integer);
$$;
COMMENT ON FUNCTION chunkq._lock_job(bigint) IS
    'Internal: serialises the job-level operations (create_chunks, retry_chunk, cancel_job) on one job until '
    'commit. Workers'' claims and completions never take it.';

CREATE FUNCTION chunkq._clip_error(p_error text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_max integer := (SELECT max_error_length FROM chunkq.settings);
    v_error text := coalesce(nullif(p_error, ''), '(no error message)');
BEGIN
    IF length(v_error) <= v_max THEN
        RETURN v_error;
    END IF;
    RETURN left(v_error, v_max) || format(' [... %s more characters cut]', length(v_error) - v_max);
END $$;
COMMENT ON FUNCTION chunkq._clip_error(text) IS
    'Internal: an error message fit to store: empty becomes "(no error message)", long ones are cut to '
    'settings.max_error_length with a note.';

CREATE FUNCTION chunkq._retry_delay(p_retry_count integer) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT LEAST(s.retry_max_delay, s.retry_base_delay * power(2, LEAST(p_retry_count, 30)))
           + s.retry_base_delay * random()
      FROM chunkq.settings s;
$$;
COMMENT ON FUNCTION chunkq._retry_delay(integer) IS
    'Internal: wait before automatic retry number p_retry_count + 1: retry_base_delay doubled per earlier '
    'retry, capped at retry_max_delay, plus up to one retry_base_delay of random jitter.';

CREATE FUNCTION chunkq._notify_claimable(p_job_id bigint, p_count integer) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('chunkq_claimable', json_build_object('job_id', p_job_id, 'chunks', p_count)::text);
$$;
COMMENT ON FUNCTION chunkq._notify_claimable(bigint, integer) IS
    'Internal: NOTIFY chunkq_claimable with {"job_id": ..., "chunks": n} when chunks become claimable, so '
    'idle workers that LISTEN wake at once instead of at their next poll. Sent on commit.';

CREATE FUNCTION chunkq._validate_priority(p_priority integer) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_settings chunkq.settings;
BEGIN
    SELECT * INTO v_settings FROM chunkq.settings;
    IF p_priority NOT BETWEEN v_settings.min_priority AND v_settings.max_priority THEN
        RAISE EXCEPTION 'priority must be between % and %, got %',
            v_settings.min_priority, v_settings.max_priority, p_priority
            USING ERRCODE = 'CQ001', HINT = 'The range is set in chunkq.settings.';
    END IF;
END $$;
COMMENT ON FUNCTION chunkq._validate_priority(integer) IS
    'Internal: raises CQ001 unless the priority lies in settings.min_priority .. max_priority.';

CREATE FUNCTION chunkq._lease(p_lease interval) RETURNS interval
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_lease interval := coalesce(p_lease, (SELECT default_lease FROM chunkq.settings));
BEGIN
    IF v_lease <= '0'::interval THEN
        RAISE EXCEPTION 'lease must be positive, got %', v_lease USING ERRCODE = 'CQ001';
    END IF;
    RETURN v_lease;
END $$;
COMMENT ON FUNCTION chunkq._lease(interval) IS
    'Internal: the lease to grant: p_lease, or settings.default_lease when NULL; raises CQ001 unless positive.';

CREATE FUNCTION chunkq._validate_shape(p_max_images bigint, p_chunk_size integer) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
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
END $$;
COMMENT ON FUNCTION chunkq._validate_shape(bigint, integer) IS
    'Internal: raises CQ001 unless max_images and chunk_size are sane and make at most '
    'settings.max_chunks_per_job chunks; returns the number of chunks.';

CREATE FUNCTION chunkq._settle_job(p_job_id bigint, p_open_slots_delta integer, p_claimed boolean)
RETURNS TABLE (job bigint, job_status chunkq.job_status, finished boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
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
END $$;
COMMENT ON FUNCTION chunkq._settle_job(bigint, integer, boolean) IS
    'Internal: moves a job along after its counter rows changed: started on its first claim; finished '
    'exactly once when its last open counter row closes (cancelled if any chunk was cancelled, else failed if '
    'any failed, else completed; NOTIFY chunkq_job_finished with {"job_id": ..., "status": ...}); running '
    'again when a retried chunk reopens it.';

CREATE FUNCTION chunkq._apply_chunk_moves(p_moves chunkq._chunk_move[])
RETURNS TABLE (job bigint, job_status chunkq.job_status, finished boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
-- Every change of chunk status goes through here, in the same transaction as the
-- change, once per call with all of the call's moves. It moves the counts in
-- job_chunk_counts and lets _settle_job move the jobs along. Returns one row per
-- job whose open_slots changed; finished is true for the call that finished it.
--
-- Finishing exactly once: each counter row is changed by UPDATE, which waits for
-- a concurrent change of the same row and applies on top of it, so exactly one
-- call sees a row's open count (pending + processing) reach 0; only that call
-- decrements the job's open_slots, again by UPDATE, so exactly one call sees the
-- job reach 0 open slots. Two workers finishing the last two chunks cannot both
-- miss the end, and cannot both finish it.
DECLARE
    v_slots constant integer := chunkq._counter_slots();
    v_row record;
    v_open_after integer;
    v_job_id bigint;
    v_open_slots_delta integer := 0;
    v_claimed boolean := false;
BEGIN
    -- One key UPDATE per counter row, in (job, slot) order: calls that move several
    -- rows lock them in the same order, so they queue instead of deadlocking.
    FOR v_row IN
        SELECT m.job_id, (m.chunk_index % v_slots)::smallint AS slot,
               count(*) FILTER (WHERE m.to_status = 'pending') - count(*) FILTER (WHERE m.from_status = 'pending') AS d_pending,
               count(*) FILTER (WHERE m.to_status = 'processing') - count(*) FILTER (WHERE m.from_status = 'processing') AS d_processing,
               count(*) FILTER (WHERE m.to_status = 'completed') - count(*) FILTER (WHERE m.from_status = 'completed') AS d_completed,
               count(*) FILTER (WHERE m.to_status = 'failed') - count(*) FILTER (WHERE m.from_status = 'failed') AS d_failed,
               count(*) FILTER (WHERE m.to_status = 'cancelled') - count(*) FILTER (WHERE m.from_status = 'cancelled') AS d_cancelled,
               bool_or(m.to_status = 'processing') AS claimed
          FROM unnest(p_moves) m
         GROUP BY 1, 2
         ORDER BY 1, 2
    LOOP
        IF v_job_id IS DISTINCT FROM v_row.job_id THEN
            IF v_job_id IS NOT NULL THEN
                RETURN QUERY SELECT * FROM chunkq._settle_job(v_job_id, v_open_slots_delta, v_claimed);
            END IF;
            v_job_id := v_row.job_id;
            v_open_slots_delta := 0;
            v_claimed := false;
        END IF;
        UPDATE chunkq.job_chunk_counts k
           SET pending = k.pending + v_row.d_pending,
               processing = k.processing + v_row.d_processing,
               completed = k.completed + v_row.d_completed,
               failed = k.failed + v_row.d_failed,
               cancelled = k.cancelled + v_row.d_cancelled
         WHERE k.job_id = v_row.job_id AND k.slot = v_row.slot
        RETURNING k.pending + k.processing INTO v_open_after;
        v_open_slots_delta := v_open_slots_delta + CASE
            WHEN v_open_after = 0 AND v_row.d_pending + v_row.d_processing < 0 THEN -1  -- this row closed
            WHEN v_open_after > 0 AND v_open_after = v_row.d_pending + v_row.d_processing THEN 1  -- it reopened
            ELSE 0 END;
        v_claimed := v_claimed OR v_row.claimed;
    END LOOP;
    IF v_job_id IS NOT NULL THEN
        RETURN QUERY SELECT * FROM chunkq._settle_job(v_job_id, v_open_slots_delta, v_claimed);
    END IF;
END $$;
COMMENT ON FUNCTION chunkq._apply_chunk_moves(chunkq._chunk_move[]) IS
    'Internal: books status changes of chunks into job_chunk_counts, one row at a time in (job, slot) order, '
    'and settles the jobs whose counts opened or closed (_settle_job).';

CREATE FUNCTION chunkq._refuse_report(p_chunk_id bigint, p_attempt integer, p_action text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
-- Called when heartbeat/complete/fail matched no row: say precisely why.
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
    -- A stale token: a newer attempt exists, or this attempt's lease lapsed and
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
    RAISE EXCEPTION 'cannot % chunk %: it is %, not processing', p_action, p_chunk_id, v_chunk.status
        USING ERRCODE = 'CQ004';
END $$;
COMMENT ON FUNCTION chunkq._refuse_report(bigint, integer, text) IS
    'Internal: raises the precise error for a heartbeat, complete or fail that matched no chunk: CQ003 unknown '
    'chunk, CQ007 cancelled, CQ006 lease lost (stale attempt), CQ004 not processing.';

CREATE FUNCTION chunkq._take_chunks(p_ids bigint[], p_worker_id text, p_lease interval, p_task_id text)
RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
-- Turns locked pending chunks into processing ones leased to p_worker_id. The
-- caller books the moves (pending -> processing) with its other moves.
DECLARE
    v_worker text := coalesce(nullif(btrim(p_worker_id), ''), session_user || '@backend-' || pg_backend_pid());
BEGIN
    RETURN QUERY
    UPDATE chunkq.job_chunks c
       SET status = 'processing',
           attempt = c.attempt + 1,
           worker_id = v_worker,
           task_id = p_task_id,
           lease_expires_at = now() + p_lease,
           claimed_at = now(),
           heartbeat_at = now()
     WHERE c.id = ANY (p_ids)
    RETURNING c.*;
END $$;
COMMENT ON FUNCTION chunkq._take_chunks(bigint[], text, interval, text) IS
    'Internal: leases the given locked pending chunks to a worker for p_lease (attempt + 1); the caller books it.';

CREATE FUNCTION chunkq._outcome(p_chunk chunkq.job_chunks, p_from chunkq.chunk_status)
RETURNS chunkq.chunk_outcome
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
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
END $$;
COMMENT ON FUNCTION chunkq._outcome(chunkq.job_chunks, chunkq.chunk_status) IS
    'Internal: books one chunk''s move from p_from to its current status and reports the outcome.';

-- ---------------------------------------------------------------------------
-- Jobs
-- ---------------------------------------------------------------------------

CREATE FUNCTION chunkq.create_job(
    p_project_id bigint,
    p_name text,
    p_keywords jsonb,
    p_max_images bigint,
    p_priority integer DEFAULT NULL,
    p_max_retries integer DEFAULT NULL,
    p_chunk_size integer DEFAULT NULL
) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql AS $$
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

    INSERT INTO chunkq.crawl_jobs (project_id, name, keywords, max_images, chunk_size, priority, max_retries)
    VALUES (p_project_id, p_name, coalesce(p_keywords, '[]'::jsonb), p_max_images,
            coalesce(p_chunk_size, v_settings.chunk_size),
            coalesce(p_priority, v_settings.default_priority),
            coalesce(p_max_retries, v_settings.default_max_retries))
    RETURNING * INTO v_job;
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer) IS
    'Creates a crawl job (no chunks yet; see create_chunks). NULL priority, max_retries and chunk_size take the '
    'defaults in chunkq.settings. Raises CQ001 for a blank name, max_images <= 0, or more chunks than '
    'settings.max_chunks_per_job.';

CREATE FUNCTION chunkq.create_chunks(
    p_job_id bigint,
    p_max_images bigint DEFAULT NULL,
    p_priority integer DEFAULT NULL,
    p_chunk_size integer DEFAULT NULL
) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql AS $$
DECLARE
    v_job chunkq.crawl_jobs;
    v_chunk_size integer;
    v_priority integer;
    v_chunks integer;
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

    INSERT INTO chunkq.job_chunks (job_id, chunk_index, image_start, image_end, priority)
    SELECT p_job_id, i, i::bigint * v_chunk_size, LEAST((i + 1)::bigint * v_chunk_size, v_job.max_images) - 1, v_priority
      FROM generate_series(0, v_chunks - 1) AS i;

    -- Slot s counts chunk indexes s, s+16, s+32, ...: ceil((n - s) / 16) of them.
    INSERT INTO chunkq.job_chunk_counts (job_id, slot, total, pending)
    SELECT p_job_id, s, (v_chunks - s + v_slots - 1) / v_slots, (v_chunks - s + v_slots - 1) / v_slots
      FROM generate_series(0, LEAST(v_chunks, v_slots) - 1) AS s;

    UPDATE chunkq.crawl_jobs
       SET chunk_size = v_chunk_size, priority = v_priority, total_chunks = v_chunks,
           open_slots = LEAST(v_chunks, v_slots), chunked_at = now()
     WHERE id = p_job_id
    RETURNING * INTO v_job;
    PERFORM chunkq._notify_claimable(p_job_id, v_chunks);
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.create_chunks(bigint, bigint, integer, integer) IS
    'Splits a job into chunks of chunk_size images: inclusive ranges 0..499, 500..999, ... (the last one '
    'shorter). NULL arguments take the job''s values; p_max_images, when given, must equal the job''s. '
    'Returns the job. Raises CQ005 if the job already has chunks (it never duplicates them).';

CREATE FUNCTION chunkq.get_job(p_job_id bigint) RETURNS SETOF chunkq.crawl_jobs
LANGUAGE sql STABLE AS $$
    SELECT * FROM chunkq.crawl_jobs WHERE id = p_job_id;
$$;
COMMENT ON FUNCTION chunkq.get_job(bigint) IS 'The job with this id, or no row.';

CREATE FUNCTION chunkq.job_progress(p_job_id bigint) RETURNS chunkq.job_progress
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_progress chunkq.job_progress;
BEGIN
    SELECT j.id, j.status, j.total_chunks,
           coalesce(sum(k.pending), 0), coalesce(sum(k.processing), 0), coalesce(sum(k.completed), 0),
           coalesce(sum(k.failed), 0), coalesce(sum(k.cancelled), 0),
           CASE WHEN j.total_chunks = 0 THEN 0.0
                ELSE round(100.0 * coalesce(sum(k.completed), 0) / j.total_chunks, 2)::double precision END,
           j.total_chunks > 0 AND coalesce(sum(k.pending) + sum(k.processing), 0) = 0
      INTO v_progress
      FROM chunkq.crawl_jobs j
      LEFT JOIN chunkq.job_chunk_counts k ON k.job_id = j.id
     WHERE j.id = p_job_id
     GROUP BY j.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    RETURN v_progress;
END $$;
COMMENT ON FUNCTION chunkq.job_progress(bigint) IS
    'Chunk counts by status for one job, from job_chunk_counts: at most 16 rows read, however large the job.';

CREATE FUNCTION chunkq.cancel_job(p_job_id bigint) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql AS $$
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
END $$;
COMMENT ON FUNCTION chunkq.cancel_job(bigint) IS
    'Cancels a job: its pending and processing chunks become cancelled (a worker holding one gets CQ007 at its '
    'next heartbeat or report). Cancelling a cancelled job does nothing; a completed or failed one raises CQ004.';

-- ---------------------------------------------------------------------------
-- Chunks: reading
-- ---------------------------------------------------------------------------

CREATE FUNCTION chunkq.get_chunk(p_chunk_id bigint) RETURNS SETOF chunkq.job_chunks
LANGUAGE sql STABLE AS $$
    SELECT * FROM chunkq.job_chunks WHERE id = p_chunk_id;
$$;
COMMENT ON FUNCTION chunkq.get_chunk(bigint) IS 'The chunk with this id, or no row.';

CREATE FUNCTION chunkq.list_chunks(p_job_id bigint, p_status chunkq.chunk_status DEFAULT NULL)
RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    RETURN QUERY SELECT * FROM chunkq.job_chunks c
                  WHERE c.job_id = p_job_id AND (p_status IS NULL OR c.status = p_status)
                  ORDER BY c.chunk_index;
END $$;
COMMENT ON FUNCTION chunkq.list_chunks(bigint, chunkq.chunk_status) IS
    'A job''s chunks in chunk_index order, optionally only those in one status.';

CREATE FUNCTION chunkq.failed_chunks(p_job_id bigint) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    RETURN QUERY SELECT * FROM chunkq.job_chunks c
                  WHERE c.job_id = p_job_id AND c.status = 'failed'
                  ORDER BY c.chunk_index;
END $$;
COMMENT ON FUNCTION chunkq.failed_chunks(bigint) IS
    'A job''s failed chunks in chunk_index order (uses the small job_chunks_failed_by_job index).';

CREATE FUNCTION chunkq.chunk_error_history(p_chunk_id bigint) RETURNS SETOF chunkq.chunk_errors
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.job_chunks WHERE id = p_chunk_id) THEN
        RAISE EXCEPTION 'chunk % does not exist', p_chunk_id USING ERRCODE = 'CQ003';
    END IF;
    RETURN QUERY SELECT * FROM chunkq.chunk_errors e WHERE e.chunk_id = p_chunk_id ORDER BY e.id;
END $$;
COMMENT ON FUNCTION chunkq.chunk_error_history(bigint) IS 'Every error recorded for a chunk, oldest first.';

-- ---------------------------------------------------------------------------
-- Chunks: the worker's calls
-- ---------------------------------------------------------------------------

CREATE FUNCTION chunkq._reclaim_expired(p_limit integer) RETURNS SETOF chunkq._chunk_move
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
-- Takes back abandoned chunks and records each lapse; the caller books the moves.
DECLARE
    v_moves chunkq._chunk_move[];
    v_pending integer;
BEGIN
    -- Nearly always nothing has expired: find that out with one index probe.
    IF NOT EXISTS (SELECT 1 FROM chunkq.job_chunks c WHERE c.lease_expires_at < now()) THEN
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
END $$;
COMMENT ON FUNCTION chunkq._reclaim_expired(integer) IS
    'Internal: the work of reclaim_expired_chunks, leaving the booking of the moves to the caller.';

CREATE FUNCTION chunkq.reclaim_expired_chunks(p_limit integer DEFAULT 100) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_moves chunkq._chunk_move[] := ARRAY(SELECT m FROM chunkq._reclaim_expired(p_limit) m);
BEGIN
    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
    END IF;
    RETURN cardinality(v_moves);
END $$;
COMMENT ON FUNCTION chunkq.reclaim_expired_chunks(integer) IS
    'Puts back up to p_limit processing chunks whose lease expired (their worker died or stalled): to pending '
    'with retry_count + 1 while the job''s max_retries allow, else to failed. Each lapse is recorded in '
    'chunk_errors. claim_chunks calls this itself; returns how many chunks were reclaimed.';

CREATE FUNCTION chunkq.claim_chunks(
    p_worker_id text DEFAULT NULL,
    p_limit integer DEFAULT 1,
    p_job_id bigint DEFAULT NULL,
    p_lease interval DEFAULT NULL
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_moves chunkq._chunk_move[];
    v_ids bigint[];
    v_taken chunkq.job_chunks[] := '{}';
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'claim limit must be between 1 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    -- Abandoned chunks first, so that they can be claimed again right away.
    v_moves := ARRAY(SELECT m FROM chunkq._reclaim_expired(100) m);

    -- SKIP LOCKED: chunks another claim is taking right now are passed over, not
    -- waited for, so concurrent claims never hand out the same chunk and never queue.
    IF p_job_id IS NULL THEN
        v_ids := ARRAY(SELECT c.id FROM chunkq.job_chunks c
                        WHERE c.status = 'pending' AND c.available_at <= now()
                        ORDER BY c.priority DESC, c.id
                        LIMIT p_limit
                          FOR UPDATE SKIP LOCKED);
    ELSE
        v_ids := ARRAY(SELECT c.id FROM chunkq.job_chunks c
                        WHERE c.job_id = p_job_id AND c.status = 'pending' AND c.available_at <= now()
                        ORDER BY c.priority DESC, c.id
                        LIMIT p_limit
                          FOR UPDATE SKIP LOCKED);
    END IF;

    IF cardinality(v_ids) > 0 THEN
        v_taken := ARRAY(SELECT t FROM chunkq._take_chunks(v_ids, p_worker_id, v_lease, NULL) t);
        v_moves := v_moves || ARRAY(SELECT (t.job_id, t.chunk_index, 'pending', 'processing')::chunkq._chunk_move
                                      FROM unnest(v_taken) t);
    ELSIF p_job_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    -- One booking for the reclaim and the claim: counter rows locked in one ordered pass.
    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_taken) t ORDER BY t.priority DESC, t.id;
END $$;
COMMENT ON FUNCTION chunkq.claim_chunks(text, integer, bigint, interval) IS
    'Claims up to p_limit (1..1000) claimable chunks, highest priority first and oldest first within a '
    'priority, optionally only from job p_job_id, leasing them to p_worker_id for p_lease (default '
    'settings.default_lease). Returns them with their new attempt, the token heartbeat/complete/fail need. '
    'No chunk is ever returned to two callers.';

CREATE FUNCTION chunkq.claim_chunk(
    p_chunk_id bigint,
    p_worker_id text DEFAULT NULL,
    p_lease interval DEFAULT NULL,
    p_task_id text DEFAULT NULL
) RETURNS chunkq.job_chunks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
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
    SELECT * INTO v_chunk FROM chunkq._take_chunks(ARRAY[p_chunk_id], p_worker_id, v_lease, p_task_id);
    PERFORM chunkq._apply_chunk_moves(
        ARRAY[(v_chunk.job_id, v_chunk.chunk_index, 'pending', 'processing')::chunkq._chunk_move]);
    RETURN v_chunk;
END $$;
COMMENT ON FUNCTION chunkq.claim_chunk(bigint, text, interval, text) IS
    'Claims one given pending chunk (even one waiting out a retry backoff). Raises CQ004 if it is not pending, '
    'for instance because another worker holds it.';

CREATE FUNCTION chunkq.heartbeat_chunk(
    p_chunk_id bigint,
    p_attempt integer,
    p_lease interval DEFAULT NULL,
    p_task_id text DEFAULT NULL
) RETURNS chunkq.job_chunks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_chunk chunkq.job_chunks;
BEGIN
    UPDATE chunkq.job_chunks c
       SET lease_expires_at = now() + v_lease,
           heartbeat_at = now(),
           task_id = coalesce(p_task_id, c.task_id)
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'heartbeat');
    END IF;
    RETURN v_chunk;
END $$;
COMMENT ON FUNCTION chunkq.heartbeat_chunk(bigint, integer, interval, text) IS
    'Extends the lease of a chunk the caller holds (attempt p_attempt) to now + p_lease. Raises CQ006 if the '
    'lease was lost, CQ007 if the job was cancelled. NULL p_attempt skips the fencing check (operator use).';

CREATE FUNCTION chunkq.complete_chunk(p_chunk_id bigint, p_attempt integer DEFAULT NULL)
RETURNS chunkq.chunk_outcome
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_chunk chunkq.job_chunks;
BEGIN
    UPDATE chunkq.job_chunks c
       SET status = 'completed', lease_expires_at = NULL, finished_at = now()
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'complete');
    END IF;
    RETURN chunkq._outcome(v_chunk, 'processing');
END $$;
COMMENT ON FUNCTION chunkq.complete_chunk(bigint, integer) IS
    'Marks a processing chunk completed. p_attempt is the token from the claim: a stale one raises CQ006 and '
    'leaves the newer attempt alone (NULL skips the check: operator use). job_finished is true for the one '
    'call that finished the job.';

CREATE FUNCTION chunkq.fail_chunk(
    p_chunk_id bigint,
    p_attempt integer,
    p_error text,
    p_retry boolean DEFAULT false
) RETURNS chunkq.chunk_outcome
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_error text := chunkq._clip_error(p_error);
    v_chunk chunkq.job_chunks;
BEGIN
    UPDATE chunkq.job_chunks c
       SET status = CASE WHEN p_retry AND c.retry_count < j.max_retries THEN 'pending' ELSE 'failed' END::chunkq.chunk_status,
           retry_count = CASE WHEN p_retry AND c.retry_count < j.max_retries THEN c.retry_count + 1 ELSE c.retry_count END,
           available_at = CASE WHEN p_retry AND c.retry_count < j.max_retries
                               THEN now() + chunkq._retry_delay(c.retry_count) ELSE c.available_at END,
           finished_at = CASE WHEN p_retry AND c.retry_count < j.max_retries THEN NULL ELSE now() END,
           error_message = v_error,
           lease_expires_at = NULL
      FROM chunkq.crawl_jobs j
     WHERE c.id = p_chunk_id AND j.id = c.job_id
       AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'fail');
    END IF;
    INSERT INTO chunkq.chunk_errors (chunk_id, job_id, attempt, worker_id, error, retried)
    VALUES (v_chunk.id, v_chunk.job_id, v_chunk.attempt, v_chunk.worker_id, v_error, v_chunk.status = 'pending');
    RETURN chunkq._outcome(v_chunk, 'processing');
END $$;
COMMENT ON FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean) IS
    'Records an error for a processing chunk (attempt p_attempt, as for complete_chunk). With p_retry true and '
    'retries left (retry_count < the job''s max_retries) the chunk goes back to pending after a backoff '
    '(see _retry_delay) with retry_count + 1; otherwise it is failed. Every error is kept in chunk_errors.';

CREATE FUNCTION chunkq.retry_chunk(p_chunk_id bigint) RETURNS chunkq.job_chunks
LANGUAGE plpgsql AS $$
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
END $$;
COMMENT ON FUNCTION chunkq.retry_chunk(bigint) IS
    'Puts a failed chunk back to pending at once with retry_count + 1, whatever max_retries says (an explicit '
    'retry is the operator''s call). A finished job becomes running again. Raises CQ004 unless the chunk is failed.';

CREATE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 1';
COMMENT ON FUNCTION chunkq.schema_version() IS
    'Version of the chunkq schema: the number of the last migration applied. Clients refuse to run against an '
    'older one.';
