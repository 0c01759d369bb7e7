-- Rolls back 0011: checkpoints.

DROP FUNCTION chunkq.checkpoint_chunk(bigint, integer, bigint, jsonb, uuid, interval);
DROP FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[], bigint[], jsonb[]);
CREATE OR REPLACE FUNCTION chunkq.heartbeat_chunks(p_chunk_ids bigint[], p_attempts integer[], p_lease interval DEFAULT NULL::interval, p_lease_tokens uuid[] DEFAULT NULL::uuid[])
 RETURNS SETOF chunkq.lease_state
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_waived constant boolean := CASE WHEN p_lease_tokens IS NULL OR array_position(p_lease_tokens, NULL) IS NOT NULL
                                      THEN chunkq._may_override() ELSE false END;
BEGIN
    IF cardinality(p_chunk_ids) IS DISTINCT FROM cardinality(p_attempts)
       OR (p_lease_tokens IS NOT NULL AND cardinality(p_lease_tokens) IS DISTINCT FROM cardinality(p_chunk_ids)) THEN
        RAISE EXCEPTION 'p_chunk_ids, p_attempts and p_lease_tokens must have the same length' USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY
    WITH wanted AS (
        SELECT w.chunk_id, w.attempt, w.lease_token
          FROM unnest(p_chunk_ids, p_attempts, p_lease_tokens) AS w(chunk_id, attempt, lease_token)
    ), extended AS (
        UPDATE chunkq.job_chunks c
           SET lease_expires_at = now() + v_lease, heartbeat_at = now()
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
END $$;
COMMENT ON FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[]) IS
    'Extends the leases of several chunks at once (parallel arrays of chunk ids and the attempts and lease tokens '
    'the caller''s claims returned). Never raises for a lost chunk: it answers held = false for it, so one lost '
    'chunk does not stop the heartbeat of the others.';
REVOKE ALL ON FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[]) TO chunkq_worker;

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

ALTER TYPE chunkq.job_progress DROP ATTRIBUTE images_completed;
COMMENT ON TYPE chunkq.job_progress IS
    'Progress of one job. completion_percentage = completed / total * 100; is_complete = the job has chunks and '
    'none is pending or processing; completed_images counts the images of completed chunks; retrying_chunks are '
    'pending chunks waiting out a retry back-off, the next of them due at next_retry_at.';

DROP FUNCTION chunkq._checkpointed_images(bigint);
DROP FUNCTION chunkq._check_checkpoints(bigint[], bigint[], jsonb[]);
ALTER TABLE chunkq.settings DROP COLUMN max_checkpoint_state_bytes;
DROP INDEX chunkq.job_chunks_checkpointed;
ALTER TABLE chunkq.job_chunks DROP COLUMN checkpoint_position, DROP COLUMN checkpoint_state, DROP COLUMN checkpoint_at;

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 10';
