-- Rolls back 0009: the job's own retry back-off, create_job's id, job_progress's retry fields.

DROP FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval);
CREATE OR REPLACE FUNCTION chunkq.create_job(p_project_id bigint, p_name text, p_keywords jsonb, p_max_images bigint, p_priority integer DEFAULT NULL::integer, p_max_retries integer DEFAULT NULL::integer, p_chunk_size integer DEFAULT NULL::integer)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
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
GRANT EXECUTE ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer) TO chunkq_app;
REVOKE ALL ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer) FROM PUBLIC;

-- (CREATE OR REPLACE keeps the grants.)
CREATE OR REPLACE FUNCTION chunkq.fail_chunk(p_chunk_id bigint, p_attempt integer, p_error text, p_retry boolean DEFAULT false, p_max_retries integer DEFAULT NULL::integer, p_lease_token uuid DEFAULT NULL::uuid)
 RETURNS chunkq.chunk_outcome
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    v_error text := chunkq._clip_error(p_error);
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_retries_done integer;
    v_max_retries integer;
    v_retry boolean;
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    IF p_max_retries < 0 THEN
        RAISE EXCEPTION 'max_retries must not be negative, got %', p_max_retries USING ERRCODE = 'CQ001';
    END IF;
    SELECT c.retry_count, j.max_retries INTO v_retries_done, v_max_retries
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
           available_at = CASE WHEN v_retry THEN now() + chunkq._retry_delay(c.retry_count) ELSE c.available_at END,
           finished_at = CASE WHEN v_retry THEN NULL ELSE now() END,
           error_message = v_error,
           lease_expires_at = NULL
     WHERE c.id = p_chunk_id
    RETURNING c.* INTO v_chunk;
    INSERT INTO chunkq.chunk_errors (chunk_id, job_id, attempt, worker_id, error, retried)
    VALUES (v_chunk.id, v_chunk.job_id, v_chunk.attempt, v_chunk.worker_id, v_error, v_chunk.status = 'pending');
    RETURN chunkq._outcome(v_chunk, 'processing');
END $$;
COMMENT ON FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean, integer, uuid) IS
    'Records an error for a processing chunk (p_attempt and p_lease_token as for complete_chunk). With p_retry '
    'true and retries left (retry_count < p_max_retries, default the job''s max_retries) the chunk goes back to '
    'pending after a backoff (see _retry_delay) with retry_count + 1; otherwise it is failed. Every error is kept '
    'in chunk_errors.';

DROP FUNCTION chunkq._retry_delay(integer, interval);
CREATE OR REPLACE FUNCTION chunkq._retry_delay(p_retry_count integer)
 RETURNS interval
 LANGUAGE sql
AS $$
    SELECT LEAST(s.retry_max_delay, s.retry_base_delay * power(2, LEAST(p_retry_count, 30)))
           + s.retry_base_delay * random()
      FROM chunkq.settings s;
$$;
COMMENT ON FUNCTION chunkq._retry_delay(integer) IS
    'Internal: wait before automatic retry number p_retry_count + 1: retry_base_delay doubled per earlier retry, '
    'capped at retry_max_delay, plus up to one retry_base_delay of random jitter.';
REVOKE ALL ON FUNCTION chunkq._retry_delay(integer) FROM PUBLIC;

CREATE OR REPLACE FUNCTION chunkq.job_progress(p_job_id bigint)
 RETURNS chunkq.job_progress
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
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
    RETURN v_progress;
END $$;
COMMENT ON FUNCTION chunkq.job_progress(bigint) IS
    'Chunk counts by status for one job, from job_chunk_counts: at most 16 rows read, however large the job.';

ALTER TYPE chunkq.job_progress DROP ATTRIBUTE next_retry_at;
ALTER TYPE chunkq.job_progress DROP ATTRIBUTE retrying_chunks;
COMMENT ON TYPE chunkq.job_progress IS
    'Progress of one job. completion_percentage = completed / total * 100; is_complete = the job has chunks and '
    'none is pending or processing; completed_images counts the images of completed chunks.';

DROP INDEX chunkq.job_chunks_retry_wait;
ALTER TABLE chunkq.crawl_jobs DROP CONSTRAINT crawl_jobs_retry_base_delay_not_negative;
ALTER TABLE chunkq.crawl_jobs DROP COLUMN retry_base_delay;

CREATE OR REPLACE FUNCTION chunkq.delete_job(p_job_id bigint)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    v_job chunkq.crawl_jobs;
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.status = 'running' THEN
        RAISE EXCEPTION 'crawl job % is running: cancel it first (chunkq.cancel_job)', p_job_id
            USING ERRCODE = 'CQ004';
    END IF;
    DELETE FROM chunkq.crawl_jobs WHERE id = p_job_id;
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.delete_job(bigint) IS
    'Deletes a job that is not running, with its chunks, counters and error history; returns the deleted row. A '
    'running job must be cancelled first (CQ004), so no worker is left holding a chunk that vanished.';

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 8';
