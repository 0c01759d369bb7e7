-- chunkq 0002: what the worker pool needs.
--
-- release_chunk hands a chunk back on shutdown without spending a retry;
-- heartbeat_chunks extends every lease a worker holds in one call; fail_chunk
-- takes a max_retries override (the pool's --max-retries).
-- depends: 0001.chunk-queue

CREATE FUNCTION chunkq.release_chunk(p_chunk_id bigint, p_attempt integer) RETURNS chunkq.job_chunks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_chunk chunkq.job_chunks;
BEGIN
    UPDATE chunkq.job_chunks c
       SET status = 'pending', lease_expires_at = NULL, available_at = now()
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'release');
    END IF;
    PERFORM chunkq._apply_chunk_moves(
        ARRAY[(v_chunk.job_id, v_chunk.chunk_index, 'processing', 'pending')::chunkq._chunk_move]);
    PERFORM chunkq._notify_claimable(v_chunk.job_id, 1);
    RETURN v_chunk;
END $$;
COMMENT ON FUNCTION chunkq.release_chunk(bigint, integer) IS
    'Hands a processing chunk the caller holds (attempt p_attempt) back to pending at once, without counting '
    'a retry: for a worker shutting down before it could finish. The next claim gets attempt + 1, so the '
    'releasing worker can never report on the chunk again. Raises like complete_chunk.';

CREATE TYPE chunkq.lease_state AS (
    chunk_id bigint,
    held boolean,
    status chunkq.chunk_status,
    lease_expires_at timestamptz
);
COMMENT ON TYPE chunkq.lease_state IS
    'One chunk of a heartbeat_chunks call: held = the caller still holds it and its lease was extended; '
    'otherwise status says what became of it (cancelled, or processing/pending under a newer attempt).';

CREATE FUNCTION chunkq.heartbeat_chunks(p_chunk_ids bigint[], p_attempts integer[], p_lease interval DEFAULT NULL)
RETURNS SETOF chunkq.lease_state
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
BEGIN
    IF cardinality(p_chunk_ids) IS DISTINCT FROM cardinality(p_attempts) THEN
        RAISE EXCEPTION 'p_chunk_ids and p_attempts must have the same length' USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY
    WITH wanted AS (
        SELECT w.chunk_id, w.attempt FROM unnest(p_chunk_ids, p_attempts) AS w(chunk_id, attempt)
    ), extended AS (
        UPDATE chunkq.job_chunks c
           SET lease_expires_at = now() + v_lease, heartbeat_at = now()
          FROM wanted w
         WHERE c.id = w.chunk_id AND c.attempt = w.attempt AND c.status = 'processing'
        RETURNING c.id, c.lease_expires_at
    )
    SELECT w.chunk_id, e.id IS NOT NULL, c.status, e.lease_expires_at
      FROM wanted w
      LEFT JOIN extended e ON e.id = w.chunk_id
      LEFT JOIN chunkq.job_chunks c ON c.id = w.chunk_id
     ORDER BY w.chunk_id;
END $$;
COMMENT ON FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval) IS
    'Extends the leases of several chunks at once (parallel arrays of chunk ids and the attempts the caller '
    'holds). Never raises for a lost chunk: it answers held = false for it, so one lost chunk does not stop '
    'the heartbeat of the others.';

DROP FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean);

CREATE FUNCTION chunkq.fail_chunk(
    p_chunk_id bigint,
    p_attempt integer,
    p_error text,
    p_retry boolean DEFAULT false,
    p_max_retries integer DEFAULT NULL
) RETURNS chunkq.chunk_outcome
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_error text := chunkq._clip_error(p_error);
    v_retries_done integer;
    v_max_retries integer;
    v_retry boolean;
    v_chunk chunkq.job_chunks;
BEGIN
    IF p_max_retries < 0 THEN
        RAISE EXCEPTION 'max_retries must not be negative, got %', p_max_retries USING ERRCODE = 'CQ001';
    END IF;
    SELECT c.retry_count, j.max_retries INTO v_retries_done, v_max_retries
      FROM chunkq.job_chunks c JOIN chunkq.crawl_jobs j ON j.id = c.job_id
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       FOR UPDATE OF c;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'fail');
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
COMMENT ON FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean, integer) IS
    'Records an error for a processing chunk (attempt p_attempt, as for complete_chunk). With p_retry true and '
    'retries left (retry_count < p_max_retries, default the job''s max_retries) the chunk goes back to pending '
    'after a backoff (see _retry_delay) with retry_count + 1; otherwise it is failed. Every error is kept in '
    'chunk_errors.';

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 2';
