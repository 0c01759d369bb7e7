-- Rolls back 0005: back to no roles and open functions. The roles themselves are
-- dropped only if no other database still grants them something.
CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 4';

DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'chunkq'::regnamespace AND p.proname !~ '^_'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY INVOKER RESET search_path', v_function);
    END LOOP;
END $$;
ALTER FUNCTION chunkq._completed_images(chunkq.crawl_jobs, bigint) SECURITY INVOKER RESET search_path;

CREATE OR REPLACE VIEW chunkq.live_workers AS
WITH connected AS (
    SELECT substr(a.application_name, length('chunkq worker ') + 1) AS worker_id, a.pid, a.backend_start
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.application_name LIKE 'chunkq worker %'
), holding AS (
    SELECT c.worker_id, count(*) AS chunks_held, min(c.claimed_at) AS oldest_claim,
           max(c.heartbeat_at) AS last_heartbeat, min(c.lease_expires_at) AS next_lease_expiry
      FROM chunkq.job_chunks c
     WHERE c.lease_expires_at IS NOT NULL
     GROUP BY c.worker_id
)
SELECT coalesce(w.worker_id, h.worker_id) AS worker_id,
       w.pid AS backend_pid,
       w.backend_start AS connected_since,
       coalesce(h.chunks_held, 0) AS chunks_held,
       h.oldest_claim,
       now() - h.last_heartbeat AS heartbeat_age,
       h.next_lease_expiry
  FROM connected w
  FULL JOIN holding h ON h.worker_id = w.worker_id;
DROP FUNCTION chunkq._connected_workers();

CREATE OR REPLACE FUNCTION chunkq.complete_chunk(p_chunk_id bigint, p_attempt integer DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION chunkq.heartbeat_chunk(
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

CREATE OR REPLACE FUNCTION chunkq.fail_chunk(
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

CREATE OR REPLACE FUNCTION chunkq.release_chunk(p_chunk_id bigint, p_attempt integer) RETURNS chunkq.job_chunks
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
DROP FUNCTION chunkq._check_override(integer);

REVOKE ALL ON ALL TABLES IN SCHEMA chunkq FROM chunkq_reader, chunkq_worker, chunkq_app;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA chunkq FROM chunkq_reader, chunkq_worker, chunkq_app;
REVOKE ALL ON SCHEMA chunkq FROM chunkq_reader, chunkq_worker, chunkq_app;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA chunkq TO PUBLIC;

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['chunkq_app', 'chunkq_worker', 'chunkq_reader'] LOOP
        BEGIN
            EXECUTE format('DROP ROLE IF EXISTS %I', v_role);
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'role % is still used in another database: kept', v_role;
        END;
    END LOOP;
END $$;
