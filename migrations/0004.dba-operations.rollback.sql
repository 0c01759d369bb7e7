-- Rolls back 0004: no pause, no rates, no DBA views or pruning; the 0001/0003 definitions return.
CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 3';

ALTER TABLE chunkq.job_chunk_counts RESET (fillfactor, autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold,
                                           autovacuum_vacuum_cost_delay);
ALTER TABLE chunkq.job_chunks RESET (fillfactor, autovacuum_vacuum_scale_factor,
                                     autovacuum_vacuum_insert_scale_factor, autovacuum_vacuum_cost_delay);

DROP FUNCTION chunkq.prune_finished_jobs(interval, integer);
DROP TYPE chunkq.prune_result;

ALTER TYPE chunkq.queue_stats
    DROP ATTRIBUTE dead_chunk_rows, DROP ATTRIBUTE last_autovacuum, DROP ATTRIBUTE autovacuum_on,
    DROP ATTRIBUTE oldest_transaction_age, DROP ATTRIBUTE oldest_transaction_pid;
COMMENT ON TYPE chunkq.queue_stats IS
    'Health of the whole queue, see queue_stats(). failure_rate = failed / (completed + failed) chunks; '
    'expired_leases counts processing chunks whose worker stopped heartbeating and that no claim has '
    'reclaimed yet (non-zero for long means no worker is claiming).';
CREATE OR REPLACE FUNCTION chunkq.queue_stats() RETURNS chunkq.queue_stats
LANGUAGE sql STABLE AS $$
    SELECT (SELECT count(*) FROM chunkq.crawl_jobs WHERE status = 'pending'),
           (SELECT count(*) FROM chunkq.crawl_jobs WHERE status = 'running'),
           coalesce(sum(k.pending), 0), coalesce(sum(k.processing), 0),
           (SELECT count(*) FROM chunkq.job_chunks c WHERE c.lease_expires_at < now()),
           coalesce(sum(k.completed), 0), coalesce(sum(k.failed), 0),
           CASE WHEN coalesce(sum(k.completed) + sum(k.failed), 0) = 0 THEN NULL
                ELSE sum(k.failed)::double precision / (sum(k.completed) + sum(k.failed)) END,
           (SELECT count(*) FROM chunkq.chunk_errors e WHERE e.failed_at > now() - interval '1 hour'),
           (SELECT max(d.oldest_pending_age) FROM chunkq.queue_depth d)
      FROM chunkq.job_chunk_counts k;
$$;
COMMENT ON FUNCTION chunkq.queue_stats() IS
    'One row about the whole queue: jobs pending and running, chunks by state (from the counters), expired '
    'leases, failure rate, errors in the last hour, age of the oldest pending chunk.';


DROP VIEW chunkq.failure_summary;
DROP VIEW chunkq.live_workers;
DROP VIEW chunkq.expired_leases;
DROP FUNCTION chunkq.list_jobs(chunkq.job_status, integer);
DROP VIEW chunkq.job_overview;
CREATE VIEW chunkq.job_overview AS
SELECT j.id, j.project_id, j.name, j.status, j.priority, j.total_chunks,
       coalesce(k.pending, 0) AS pending_chunks,
       coalesce(k.processing, 0) AS processing_chunks,
       coalesce(k.completed, 0) AS completed_chunks,
       coalesce(k.failed, 0) AS failed_chunks,
       coalesce(k.cancelled, 0) AS cancelled_chunks,
       CASE WHEN j.total_chunks = 0 THEN 0.0
            ELSE round(100.0 * coalesce(k.completed, 0) / j.total_chunks, 2)::double precision
       END AS completion_percentage,
       j.max_images,
       j.created_at, j.started_at, j.finished_at
  FROM chunkq.crawl_jobs j
  LEFT JOIN LATERAL (
        SELECT sum(c.pending)::integer AS pending, sum(c.processing)::integer AS processing,
               sum(c.completed)::integer AS completed, sum(c.failed)::integer AS failed,
               sum(c.cancelled)::integer AS cancelled
          FROM chunkq.job_chunk_counts c WHERE c.job_id = j.id) k ON true;
COMMENT ON VIEW chunkq.job_overview IS
    'Every job with its chunk counts by status and completion percentage (from job_chunk_counts: cheap per job). '
    'Example: SELECT * FROM chunkq.job_overview WHERE status = ''running'';';
COMMENT ON COLUMN chunkq.job_overview.id IS 'Job id.';
COMMENT ON COLUMN chunkq.job_overview.project_id IS 'The application''s project.';
COMMENT ON COLUMN chunkq.job_overview.name IS 'Job name.';
COMMENT ON COLUMN chunkq.job_overview.status IS 'Job status.';
COMMENT ON COLUMN chunkq.job_overview.priority IS 'Priority the job''s chunks were created with.';
COMMENT ON COLUMN chunkq.job_overview.total_chunks IS 'Chunks in the job.';
COMMENT ON COLUMN chunkq.job_overview.pending_chunks IS 'Chunks waiting to be claimed.';
COMMENT ON COLUMN chunkq.job_overview.processing_chunks IS 'Chunks held by workers.';
COMMENT ON COLUMN chunkq.job_overview.completed_chunks IS 'Chunks completed.';
COMMENT ON COLUMN chunkq.job_overview.failed_chunks IS 'Chunks failed for good.';
COMMENT ON COLUMN chunkq.job_overview.cancelled_chunks IS 'Chunks cancelled with the job.';
COMMENT ON COLUMN chunkq.job_overview.completion_percentage IS 'completed_chunks / total_chunks * 100.';
COMMENT ON COLUMN chunkq.job_overview.max_images IS 'Images in the job.';
COMMENT ON COLUMN chunkq.job_overview.created_at IS 'When the job was created.';
COMMENT ON COLUMN chunkq.job_overview.started_at IS 'When its first chunk was claimed.';
COMMENT ON COLUMN chunkq.job_overview.finished_at IS 'When it finished.';
CREATE FUNCTION chunkq.list_jobs(p_status chunkq.job_status DEFAULT NULL, p_limit integer DEFAULT 50)
RETURNS SETOF chunkq.job_overview
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'limit must be positive, got %', coalesce(p_limit::text, 'NULL') USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT * FROM chunkq.job_overview o
                  WHERE p_status IS NULL OR o.status = p_status
                  ORDER BY o.id DESC
                  LIMIT p_limit;
END $$;
COMMENT ON FUNCTION chunkq.list_jobs(chunkq.job_status, integer) IS
    'The newest p_limit jobs from job_overview, optionally only those in one status.';

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

ALTER TABLE chunkq.job_chunk_counts
    DROP CONSTRAINT job_chunk_counts_rates_not_negative,
    DROP COLUMN rate_minute, DROP COLUMN completed_this_minute, DROP COLUMN completed_last_minute;

DROP FUNCTION chunkq.set_job_priority(bigint, integer);
DROP FUNCTION chunkq.resume_job(bigint);
DROP FUNCTION chunkq.pause_job(bigint);

-- Paused chunks become claimable again: without 0004 nothing would ever resume them.
UPDATE chunkq.job_chunks SET available_at = now() WHERE available_at = 'infinity';
CREATE OR REPLACE FUNCTION chunkq.claim_chunks(
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

DROP FUNCTION chunkq._job_paused(bigint);
DROP INDEX chunkq.job_chunks_claim_order;
CREATE INDEX job_chunks_claim_order ON chunkq.job_chunks (priority DESC, id) WHERE status = 'pending';
COMMENT ON INDEX chunkq.job_chunks_claim_order IS 'Claim order over claimable chunks: priority, then age.';
DROP INDEX chunkq.job_chunks_claim_order_by_job;
CREATE INDEX job_chunks_claim_order_by_job ON chunkq.job_chunks (job_id, priority DESC, id) WHERE status = 'pending';
COMMENT ON INDEX chunkq.job_chunks_claim_order_by_job IS 'Claim order within one job.';

DROP INDEX chunkq.crawl_jobs_finished;
ALTER TABLE chunkq.crawl_jobs DROP CONSTRAINT crawl_jobs_paused_only_while_open, DROP COLUMN paused_at;
