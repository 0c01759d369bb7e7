-- Rolls back 0002: the worker pool's functions go, fail_chunk gets back its 0001 form.
DROP FUNCTION chunkq.release_chunk(bigint, integer);
DROP FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval);
DROP TYPE chunkq.lease_state;
DROP FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean, integer);

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

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 1';
