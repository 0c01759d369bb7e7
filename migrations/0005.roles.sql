-- chunkq 0005: least-privilege roles. Three NOLOGIN group roles (cluster-wide,
-- created once, shared by every database that runs chunkq):
--   chunkq_worker  claims, heartbeats, completes, fails and releases chunks it holds;
--   chunkq_reader  reads the views and read-only functions;
--   chunkq_app     both, plus creating and managing jobs.
-- Grant a login role one of them:  CREATE ROLE crawler LOGIN PASSWORD '...' IN ROLE chunkq_worker;
-- Nothing in schema chunkq is open to PUBLIC; the API functions run as their owner
-- (SECURITY DEFINER) with a fixed search_path, so the roles need no table privileges.
-- Creating roles needs CREATEROLE (or superuser) for the role that migrates.
-- depends: 0004.dba-operations

-- Roles are cluster-wide: a second database on the same cluster finds them made by
-- the first, and its owner need not be allowed to create or comment on roles. So
-- each role is created, and commented, only where it is missing (chunkq.migrate
-- checks the privileges this needs before it applies anything).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'chunkq_reader') THEN
        CREATE ROLE chunkq_reader NOLOGIN;
        COMMENT ON ROLE chunkq_reader IS 'chunkq: may read the queue''s views and read-only functions, nothing else.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'chunkq_worker') THEN
        CREATE ROLE chunkq_worker NOLOGIN;
        COMMENT ON ROLE chunkq_worker IS 'chunkq: may claim chunks and report on the chunks it holds, nothing else.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'chunkq_app') THEN
        CREATE ROLE chunkq_app NOLOGIN IN ROLE chunkq_reader, chunkq_worker;
        COMMENT ON ROLE chunkq_app IS 'chunkq: chunkq_reader and chunkq_worker, plus creating and managing jobs.';
    END IF;
END $$;


-- Who may skip the fencing check (a NULL attempt: an operator completing or failing
-- a chunk by hand): the app role, a superuser, the schema's owner. Not a worker.
CREATE FUNCTION chunkq._check_override(p_attempt integer) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_attempt IS NULL
       AND NOT pg_has_role(session_user, 'chunkq_app', 'USAGE')
       AND NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = session_user)
       AND NOT pg_has_role(session_user, (SELECT n.nspowner FROM pg_catalog.pg_namespace n
                                           WHERE n.nspname = 'chunkq'), 'USAGE') THEN
        RAISE EXCEPTION 'only chunkq_app may report on a chunk without its attempt'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Pass the attempt the claim returned.';
    END IF;
END $$;
COMMENT ON FUNCTION chunkq._check_override(integer) IS
    'Internal: raises insufficient_privilege when a NULL attempt (skip the fencing check) comes from a role '
    'that is not chunkq_app, a superuser or the schema owner.';

CREATE OR REPLACE FUNCTION chunkq.complete_chunk(p_chunk_id bigint, p_attempt integer DEFAULT NULL)
RETURNS chunkq.chunk_outcome
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
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
    PERFORM chunkq._check_override(p_attempt);
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
    PERFORM chunkq._check_override(p_attempt);
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
    PERFORM chunkq._check_override(p_attempt);
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

-- The workers connected to this database (the pool names its connections "chunkq
-- worker HOST:PID"), seen with the owner's rights so that readers see them too.
CREATE FUNCTION chunkq._connected_workers()
RETURNS TABLE (worker_id text, pid integer, backend_start timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT substr(a.application_name, length('chunkq worker ') + 1), a.pid, a.backend_start
      FROM pg_catalog.pg_stat_activity a
     WHERE a.datname = current_database() AND a.application_name LIKE 'chunkq worker %';
$$;
COMMENT ON FUNCTION chunkq._connected_workers() IS
    'Internal: worker connections to this database, from pg_stat_activity, for live_workers.';

CREATE OR REPLACE VIEW chunkq.live_workers AS
WITH connected AS (
    SELECT * FROM chunkq._connected_workers()
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

-- Views call this one with the reader's rights; it reads job_chunks with the owner's.
ALTER FUNCTION chunkq._completed_images(chunkq.crawl_jobs, bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Every API function (no leading underscore) runs as its owner with a search_path
-- nobody can plant objects in. Internal functions run inside them.
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'chunkq'::regnamespace AND p.proname !~ '^_'
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', v_function);
    END LOOP;
END $$;

-- PUBLIC gets nothing. (Functions are executable by PUBLIC when created, and a
-- schema's default privileges cannot take that back: every migration that adds a
-- function revokes it again; tests/sql/test_roles.py checks.)
REVOKE ALL ON SCHEMA chunkq FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA chunkq FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA chunkq FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA chunkq FROM PUBLIC;

GRANT USAGE ON SCHEMA chunkq TO chunkq_reader, chunkq_worker;

GRANT SELECT ON chunkq.job_overview, chunkq.queue_depth, chunkq.expired_leases, chunkq.live_workers,
                chunkq.failure_summary, chunkq.settings, chunkq.error_codes TO chunkq_reader;
GRANT EXECUTE ON FUNCTION
    chunkq.get_job(bigint), chunkq.get_chunk(bigint), chunkq.list_chunks(bigint, chunkq.chunk_status, integer),
    chunkq.failed_chunks(bigint), chunkq.chunk_error_history(bigint), chunkq.job_progress(bigint),
    chunkq.list_jobs(chunkq.job_status, integer), chunkq.queue_stats(), chunkq.job_error_summary(bigint),
    chunkq.schema_version(), chunkq._completed_images(chunkq.crawl_jobs, bigint), chunkq._connected_workers()
    TO chunkq_reader;

GRANT EXECUTE ON FUNCTION
    chunkq.claim_chunks(text, integer, bigint, interval), chunkq.claim_chunk(bigint, text, interval, text),
    chunkq.heartbeat_chunk(bigint, integer, interval, text), chunkq.heartbeat_chunks(bigint[], integer[], interval),
    chunkq.complete_chunk(bigint, integer), chunkq.fail_chunk(bigint, integer, text, boolean, integer),
    chunkq.release_chunk(bigint, integer), chunkq.reclaim_expired_chunks(integer),
    chunkq.get_job(bigint), chunkq.get_chunk(bigint), chunkq.schema_version()
    TO chunkq_worker;

GRANT EXECUTE ON FUNCTION
    chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer),
    chunkq.create_chunks(bigint, bigint, integer, integer), chunkq.cancel_job(bigint),
    chunkq.retry_chunk(bigint), chunkq.retry_failed_chunks(bigint), chunkq.delete_job(bigint),
    chunkq.pause_job(bigint), chunkq.resume_job(bigint), chunkq.set_job_priority(bigint, integer),
    chunkq.prune_finished_jobs(interval, integer)
    TO chunkq_app;

-- (CREATE OR REPLACE keeps the grants made above.)
CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 5';
