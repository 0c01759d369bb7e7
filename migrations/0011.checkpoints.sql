-- chunkq 0011: checkpoints inside a chunk.
-- A handler records how far it got (the last image done, and a little JSON state
-- of its own) with its worker's heartbeat; a chunk that is retried or reclaimed
-- gives the next attempt the checkpoint, so the retry continues where the last
-- attempt stopped instead of at the chunk's first image. A checkpoint is a report
-- like any other: fenced by the attempt and the lease token.
-- Progress gains images_completed: the images of completed chunks plus the
-- checkpointed images of unfinished ones (from a partial index of those few
-- chunks), so no image is counted twice.
-- depends: 0010.scheduler

ALTER TABLE chunkq.job_chunks
    ADD COLUMN checkpoint_position bigint,
    ADD COLUMN checkpoint_state jsonb,
    ADD COLUMN checkpoint_at timestamptz,
    ADD CONSTRAINT job_chunks_checkpoint_in_range
        CHECK (checkpoint_position BETWEEN image_start AND image_end),
    ADD CONSTRAINT job_chunks_checkpoint_state_needs_position
        CHECK (checkpoint_state IS NULL OR checkpoint_position IS NOT NULL);
COMMENT ON COLUMN chunkq.job_chunks.checkpoint_position IS
    'The last image a handler reported done (a checkpoint); the next attempt resumes after it. NULL: none yet.';
COMMENT ON COLUMN chunkq.job_chunks.checkpoint_state IS
    'Small JSON state the handler saved with its checkpoint, handed to the next attempt.';
COMMENT ON COLUMN chunkq.job_chunks.checkpoint_at IS 'When the checkpoint was recorded.';

CREATE INDEX job_chunks_checkpointed ON chunkq.job_chunks (job_id)
    WHERE checkpoint_position IS NOT NULL AND status IN ('pending', 'processing', 'failed');
COMMENT ON INDEX chunkq.job_chunks_checkpointed IS
    'Unfinished chunks with a checkpoint: the few whose partial work progress counts.';

ALTER TABLE chunkq.settings
    ADD COLUMN max_checkpoint_state_bytes integer NOT NULL DEFAULT 65536,
    ADD CONSTRAINT settings_max_checkpoint_state_in_range CHECK (max_checkpoint_state_bytes BETWEEN 0 AND 10485760);
COMMENT ON COLUMN chunkq.settings.max_checkpoint_state_bytes IS
    'Largest checkpoint state (as JSON text) a handler may save with a checkpoint.';

-- Validates checkpoints against their chunks before anything is written.
CREATE FUNCTION chunkq._check_checkpoints(p_chunk_ids bigint[], p_positions bigint[], p_states jsonb[])
RETURNS void
LANGUAGE plpgsql STABLE AS $$
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
END $$;
COMMENT ON FUNCTION chunkq._check_checkpoints(bigint[], bigint[], jsonb[]) IS
    'Internal: raises CQ001 for a checkpoint position outside its chunk''s images, a state without a position or '
    'a state larger than settings.max_checkpoint_state_bytes.';
REVOKE ALL ON FUNCTION chunkq._check_checkpoints(bigint[], bigint[], jsonb[]) FROM PUBLIC;

-- 0008's heartbeat_chunks, which also records the checkpoints of the chunks it extends.
DROP FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[]);
CREATE FUNCTION chunkq.heartbeat_chunks(
    p_chunk_ids bigint[],
    p_attempts integer[],
    p_lease interval DEFAULT NULL,
    p_lease_tokens uuid[] DEFAULT NULL,
    p_positions bigint[] DEFAULT NULL,
    p_states jsonb[] DEFAULT NULL
) RETURNS SETOF chunkq.lease_state
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
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
END $$;
COMMENT ON FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[], bigint[], jsonb[]) IS
    'Extends the leases of several chunks at once (parallel arrays of chunk ids and the attempts and lease tokens '
    'the caller''s claims returned), and records the checkpoints given in p_positions (the last image done; NULL: '
    'none this time) and p_states. Never raises for a lost chunk: it answers held = false for it, so one lost '
    'chunk does not stop the heartbeat of the others (its checkpoint is not recorded). Raises CQ001, changing '
    'nothing, for a position outside its chunk or an oversized state.';
REVOKE ALL ON FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[], bigint[], jsonb[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[], bigint[], jsonb[])
    TO chunkq_worker;

CREATE FUNCTION chunkq.checkpoint_chunk(
    p_chunk_id bigint,
    p_attempt integer,
    p_position bigint,
    p_state jsonb DEFAULT NULL,
    p_lease_token uuid DEFAULT NULL,
    p_lease interval DEFAULT NULL
) RETURNS chunkq.job_chunks
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
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
END $$;
COMMENT ON FUNCTION chunkq.checkpoint_chunk(bigint, integer, bigint, jsonb, uuid, interval) IS
    'Records how far a handler got in a chunk it holds: p_position, the last image done, and p_state, a little JSON '
    'of its own (at most settings.max_checkpoint_state_bytes); also extends the lease. Fenced like every report '
    '(CQ006 for a stale attempt or another token). A retried or reclaimed chunk hands the checkpoint to its next '
    'attempt.';
REVOKE ALL ON FUNCTION chunkq.checkpoint_chunk(bigint, integer, bigint, jsonb, uuid, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.checkpoint_chunk(bigint, integer, bigint, jsonb, uuid, interval) TO chunkq_worker;

-- Images done by unfinished chunks, from their checkpoints.
CREATE FUNCTION chunkq._checkpointed_images(p_job_id bigint) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(sum(c.checkpoint_position - c.image_start + 1), 0)::bigint
      FROM chunkq.job_chunks c
     WHERE c.job_id = p_job_id AND c.checkpoint_position IS NOT NULL
       AND c.status IN ('pending', 'processing', 'failed');
$$;
COMMENT ON FUNCTION chunkq._checkpointed_images(bigint) IS
    'Internal: images done by a job''s unfinished chunks, from their checkpoints (the job_chunks_checkpointed '
    'index: only those chunks).';
REVOKE ALL ON FUNCTION chunkq._checkpointed_images(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq._checkpointed_images(bigint) TO chunkq_reader;

ALTER TYPE chunkq.job_progress ADD ATTRIBUTE images_completed bigint;
COMMENT ON TYPE chunkq.job_progress IS
    'Progress of one job. completion_percentage = completed / total * 100; is_complete = the job has chunks and '
    'none is pending or processing; completed_images counts the images of completed chunks, images_completed also '
    'the images checkpointed in unfinished ones; retrying_chunks are pending chunks waiting out a retry back-off, '
    'the next of them due at next_retry_at.';

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
    v_progress.images_completed := v_progress.completed_images + chunkq._checkpointed_images(p_job_id);
    RETURN v_progress;
END $$;
COMMENT ON FUNCTION chunkq.job_progress(bigint) IS
    'Chunk counts by status for one job, from job_chunk_counts (at most 16 rows read, however large the job); '
    'images done, completed chunks and checkpoints together (images_completed); how many pending chunks wait out a '
    'retry back-off (retrying_chunks) with the moment the next one is due.';

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 11';
