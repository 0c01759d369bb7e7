-- chunkq 0009: what operators and applications integrating chunkq need.
-- 1. A job may carry its own retry back-off (crawl_jobs.retry_base_delay), instead
--    of only the deployment's: a short one for a demo or a test, a long one for a
--    site that needs time to recover.
-- 2. create_job may take the job's id, so that an application with its own
--    crawl_jobs table can give chunkq's job the same id (the seed's workflow passes
--    its job's id to create_chunks_for_job).
-- 3. job_progress says how many chunks wait for a retry and when the next one is
--    due, from a small index of retried chunks, so that a live view can say what a
--    job near its end is waiting for.
-- 4. delete_job refuses a job with a chunk being processed, whatever the job's
--    status says (a job's first claim may leave it pending for a moment).
-- depends: 0008.lease-token

ALTER TABLE chunkq.crawl_jobs ADD COLUMN retry_base_delay interval;
ALTER TABLE chunkq.crawl_jobs ADD CONSTRAINT crawl_jobs_retry_base_delay_not_negative
    CHECK (retry_base_delay >= interval '0');
COMMENT ON COLUMN chunkq.crawl_jobs.retry_base_delay IS
    'Wait before the first automatic retry of a failed chunk of this job, doubled per retry up to '
    'settings.retry_max_delay; NULL takes settings.retry_base_delay.';

-- Chunks that wait out a retry back-off: pending with retry_count > 0 (a retried or
-- reclaimed chunk). Few at any time, so the index costs the hot path nothing; a
-- chunk that waits is one whose available_at is still ahead.
CREATE INDEX job_chunks_retry_wait ON chunkq.job_chunks (job_id, available_at)
    WHERE status = 'pending' AND retry_count > 0;
COMMENT ON INDEX chunkq.job_chunks_retry_wait IS
    'Pending chunks of a job that were retried, by when they may be claimed: which wait out a back-off.';

DROP FUNCTION chunkq._retry_delay(integer);
CREATE FUNCTION chunkq._retry_delay(p_retry_count integer, p_base_delay interval) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT LEAST(s.retry_max_delay, b.base * power(2, LEAST(p_retry_count, 30))) + b.base * random()
      FROM chunkq.settings s, LATERAL (SELECT coalesce(p_base_delay, s.retry_base_delay) AS base) b;
$$;
COMMENT ON FUNCTION chunkq._retry_delay(integer, interval) IS
    'Internal: wait before automatic retry number p_retry_count + 1: the job''s base delay (NULL: '
    'settings.retry_base_delay) doubled per earlier retry, capped at settings.retry_max_delay, plus up to one '
    'base delay of random jitter.';
REVOKE ALL ON FUNCTION chunkq._retry_delay(integer, interval) FROM PUBLIC;

-- 0008's fail_chunk, with the job's own back-off.
CREATE OR REPLACE FUNCTION chunkq.fail_chunk(
    p_chunk_id bigint,
    p_attempt integer,
    p_error text,
    p_retry boolean DEFAULT false,
    p_max_retries integer DEFAULT NULL,
    p_lease_token uuid DEFAULT NULL
) RETURNS chunkq.chunk_outcome
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_error text := chunkq._clip_error(p_error);
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_retries_done integer;
    v_max_retries integer;
    v_base_delay interval;
    v_retry boolean;
    v_chunk chunkq.job_chunks;
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
    RETURN chunkq._outcome(v_chunk, 'processing');
END $$;

DROP FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer);
CREATE FUNCTION chunkq.create_job(
    p_project_id bigint,
    p_name text,
    p_keywords jsonb,
    p_max_images bigint,
    p_priority integer DEFAULT NULL,
    p_max_retries integer DEFAULT NULL,
    p_chunk_size integer DEFAULT NULL,
    p_id bigint DEFAULT NULL,
    p_retry_base_delay interval DEFAULT NULL
) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
                                       retry_base_delay)
        OVERRIDING SYSTEM VALUE
        VALUES (coalesce(p_id, nextval(pg_get_serial_sequence('chunkq.crawl_jobs', 'id'))), p_project_id, p_name,
                coalesce(p_keywords, '[]'::jsonb), p_max_images,
                coalesce(p_chunk_size, v_settings.chunk_size),
                coalesce(p_priority, v_settings.default_priority),
                coalesce(p_max_retries, v_settings.default_max_retries),
                p_retry_base_delay)
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
END $$;
COMMENT ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval) IS
    'Creates a crawl job (no chunks yet; see create_chunks). NULL priority, max_retries, chunk_size and '
    'retry_base_delay take the defaults in chunkq.settings. p_id gives the job an id of your own (e.g. your '
    'application''s job id); ids chunkq hands out afterwards skip past it. Raises CQ001 for a blank name, '
    'max_images <= 0, more chunks than settings.max_chunks_per_job, or an id in use.';
REVOKE ALL ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval)
    TO chunkq_app;

ALTER TYPE chunkq.job_progress ADD ATTRIBUTE retrying_chunks integer;
ALTER TYPE chunkq.job_progress ADD ATTRIBUTE next_retry_at timestamptz;
COMMENT ON TYPE chunkq.job_progress IS
    'Progress of one job. completion_percentage = completed / total * 100; is_complete = the job has chunks and '
    'none is pending or processing; completed_images counts the images of completed chunks; retrying_chunks '
    'are pending chunks waiting out a retry back-off, the next of them due at next_retry_at.';

CREATE OR REPLACE FUNCTION chunkq.job_progress(p_job_id bigint) RETURNS chunkq.job_progress
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    RETURN v_progress;
END $$;
COMMENT ON FUNCTION chunkq.job_progress(bigint) IS
    'Chunk counts by status for one job, from job_chunk_counts (at most 16 rows read, however large the job), and '
    'how many pending chunks wait out a retry back-off (retrying_chunks) with the moment the next one is due.';

CREATE OR REPLACE FUNCTION chunkq.delete_job(p_job_id bigint) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
END $$;
COMMENT ON FUNCTION chunkq.delete_job(bigint) IS
    'Deletes a job that is not running, with its chunks, counters and error history; returns the deleted row. A '
    'job with a chunk being processed must be cancelled first (CQ004), so no worker is left holding a chunk that '
    'vanished.';

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 9';
