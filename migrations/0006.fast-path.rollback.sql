-- Rolls back 0006: claim_chunks claims on its own again; the fused call is gone.
CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 5';

DROP FUNCTION chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval);

CREATE OR REPLACE FUNCTION chunkq.claim_chunks(
    p_worker_id text DEFAULT NULL,
    p_limit integer DEFAULT 1,
    p_job_id bigint DEFAULT NULL,
    p_lease interval DEFAULT NULL
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS $$
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
    -- A paused job's pending chunks wait with available_at = infinity, outside the
    -- claim index; _job_paused also catches one that went back to pending since.
    IF p_job_id IS NULL THEN
        v_ids := ARRAY(SELECT c.id FROM chunkq.job_chunks c
                        WHERE c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
                          AND NOT chunkq._job_paused(c.job_id)
                        ORDER BY c.priority DESC, c.id
                        LIMIT p_limit
                          FOR UPDATE OF c SKIP LOCKED);
    ELSE
        v_ids := ARRAY(SELECT c.id FROM chunkq.job_chunks c
                        WHERE c.job_id = p_job_id AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
                          AND NOT chunkq._job_paused(c.job_id)
                        ORDER BY c.priority DESC, c.id
                        LIMIT p_limit
                          FOR UPDATE OF c SKIP LOCKED);
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

DROP FUNCTION chunkq._claim(text, integer, bigint, interval, chunkq._chunk_move[]);

-- Booking by the loop of 0004 again.
CREATE OR REPLACE FUNCTION chunkq._apply_chunk_moves(p_moves chunkq._chunk_move[])
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
    v_minute constant timestamptz := date_trunc('minute', now());
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
               cancelled = k.cancelled + v_row.d_cancelled,
               -- Completions per minute, for job_overview's rate: this minute's and the last.
               rate_minute = CASE WHEN v_row.d_completed > 0 THEN v_minute ELSE k.rate_minute END,
               completed_this_minute = CASE
                   WHEN v_row.d_completed <= 0 THEN k.completed_this_minute
                   WHEN k.rate_minute = v_minute THEN k.completed_this_minute + v_row.d_completed
                   ELSE v_row.d_completed END,
               completed_last_minute = CASE
                   WHEN v_row.d_completed <= 0 OR k.rate_minute = v_minute THEN k.completed_last_minute
                   WHEN k.rate_minute = v_minute - interval '1 minute' THEN k.completed_this_minute
                   ELSE 0 END
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

-- The foreign key again (it checks the existing chunks as it is added).
DROP TRIGGER crawl_jobs_delete_chunks ON chunkq.crawl_jobs;
DROP TRIGGER crawl_jobs_id_fixed ON chunkq.crawl_jobs;
DROP TRIGGER job_chunks_job_id_fixed ON chunkq.job_chunks;
DROP TRIGGER job_chunks_job_exists ON chunkq.job_chunks;
DROP FUNCTION chunkq._delete_chunks_of_jobs();
DROP FUNCTION chunkq._refuse_job_change();
DROP FUNCTION chunkq._check_chunk_jobs();
ALTER TABLE chunkq.job_chunks ADD CONSTRAINT job_chunks_job_id_fkey
    FOREIGN KEY (job_id) REFERENCES chunkq.crawl_jobs (id) ON DELETE CASCADE;
COMMENT ON COLUMN chunkq.job_chunks.job_id IS 'The crawl job; deleting the job deletes its chunks.';
