-- chunkq 0007: the claim in one statement, and plans that fit the table.
-- 1. _complete_and_claim, behind complete_and_claim and claim_chunks, completes,
--    picks, leases and collects the status moves in ONE statement (_claim took
--    about ten statements and four nested calls).
-- 2. The claim checks a job's pause once per statement, not per candidate chunk.
-- 3. "Has any lease expired?" is min(lease_expires_at): one index entry whatever
--    the statistics say, where EXISTS scanned the table on stale statistics.
-- 4. _apply_chunk_moves calls _settle_job only for the jobs it can move along.
-- 5. create_chunks analyzes the queue's tables when its job is large next to them.
-- 6. The trigger that checks inserted chunks' jobs reads them once, not twice.
-- Measurements: CHANGELOG.md (schema 7).
-- depends: 0006.fast-path

-- (3) in the reclaim itself, which reclaim_expired_chunks calls on its own.
CREATE OR REPLACE FUNCTION chunkq._reclaim_expired(p_limit integer) RETURNS SETOF chunkq._chunk_move
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
-- Takes back abandoned chunks and records each lapse; the caller books the moves.
DECLARE
    v_moves chunkq._chunk_move[];
    v_pending integer;
BEGIN
    -- Nearly always nothing has expired: find that out from the first index entry.
    IF NOT coalesce((SELECT min(c.lease_expires_at) FROM chunkq.job_chunks c) < now(), false) THEN
        RETURN;
    END IF;
    WITH expired AS (
        SELECT c.id, c.attempt, c.worker_id, c.lease_expires_at
          FROM chunkq.job_chunks c
         WHERE c.lease_expires_at < now()  -- only processing chunks have a lease
         ORDER BY c.lease_expires_at
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    ), reclaimed AS (
        UPDATE chunkq.job_chunks c
           SET status = CASE WHEN c.retry_count < j.max_retries THEN 'pending' ELSE 'failed' END::chunkq.chunk_status,
               retry_count = CASE WHEN c.retry_count < j.max_retries THEN c.retry_count + 1 ELSE c.retry_count END,
               error_message = format('lease expired at %s: worker %s stopped heartbeating during attempt %s',
                                      e.lease_expires_at, e.worker_id, e.attempt),
               lease_expires_at = NULL,
               available_at = now(),
               finished_at = CASE WHEN c.retry_count < j.max_retries THEN NULL ELSE now() END
          FROM expired e, chunkq.crawl_jobs j
         WHERE c.id = e.id AND j.id = c.job_id
        RETURNING c.id, c.job_id, c.chunk_index, c.status, c.error_message, e.attempt, e.worker_id
    ), logged AS (
        INSERT INTO chunkq.chunk_errors (chunk_id, job_id, attempt, worker_id, error, lease_expired, retried)
        SELECT r.id, r.job_id, r.attempt, r.worker_id, r.error_message, true, r.status = 'pending'
          FROM reclaimed r
    )
    SELECT coalesce(array_agg((r.job_id, r.chunk_index, 'processing', r.status)::chunkq._chunk_move), '{}')
      INTO v_moves
      FROM reclaimed r;

    v_pending := (SELECT count(*) FROM unnest(v_moves) m WHERE m.to_status = 'pending');
    IF v_pending > 0 THEN
        PERFORM chunkq._notify_claimable(NULL, v_pending);
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_moves);
END $$;

-- (4) The booking of 0006, except that a job is handed to _settle_job only when
-- one of its counter rows closed or reopened, or when this call claimed its
-- first chunks (the job is still pending). Any other job has nothing to settle.
CREATE OR REPLACE FUNCTION chunkq._apply_chunk_moves(p_moves chunkq._chunk_move[])
RETURNS TABLE (job bigint, job_status chunkq.job_status, finished boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_slots constant integer := chunkq._counter_slots();
    v_minute constant timestamptz := date_trunc('minute', now());
    v_job record;
BEGIN
    FOR v_job IN
        WITH moved AS (
            SELECT m.job_id, (m.chunk_index % v_slots)::smallint AS slot,
                   count(*) FILTER (WHERE m.to_status = 'pending') - count(*) FILTER (WHERE m.from_status = 'pending') AS d_pending,
                   count(*) FILTER (WHERE m.to_status = 'processing') - count(*) FILTER (WHERE m.from_status = 'processing') AS d_processing,
                   count(*) FILTER (WHERE m.to_status = 'completed') - count(*) FILTER (WHERE m.from_status = 'completed') AS d_completed,
                   count(*) FILTER (WHERE m.to_status = 'failed') - count(*) FILTER (WHERE m.from_status = 'failed') AS d_failed,
                   count(*) FILTER (WHERE m.to_status = 'cancelled') - count(*) FILTER (WHERE m.from_status = 'cancelled') AS d_cancelled,
                   bool_or(m.to_status = 'processing') AS claimed
              FROM unnest(p_moves) m
             GROUP BY 1, 2
        ), locked AS (
            SELECT k.job_id, k.slot
              FROM chunkq.job_chunk_counts k
             WHERE (k.job_id, k.slot) IN (SELECT d.job_id, d.slot FROM moved d)
             ORDER BY k.job_id, k.slot
               FOR UPDATE OF k
        ), counted AS (
            UPDATE chunkq.job_chunk_counts k
               SET pending = k.pending + d.d_pending,
                   processing = k.processing + d.d_processing,
                   completed = k.completed + d.d_completed,
                   failed = k.failed + d.d_failed,
                   cancelled = k.cancelled + d.d_cancelled,
                   -- Completions per minute, for job_overview's rate: this minute's and the last.
                   rate_minute = CASE WHEN d.d_completed > 0 THEN v_minute ELSE k.rate_minute END,
                   completed_this_minute = CASE
                       WHEN d.d_completed <= 0 THEN k.completed_this_minute
                       WHEN k.rate_minute = v_minute THEN k.completed_this_minute + d.d_completed
                       ELSE d.d_completed END,
                   completed_last_minute = CASE
                       WHEN d.d_completed <= 0 OR k.rate_minute = v_minute THEN k.completed_last_minute
                       WHEN k.rate_minute = v_minute - interval '1 minute' THEN k.completed_this_minute
                       ELSE 0 END
              FROM moved d JOIN locked l ON l.job_id = d.job_id AND l.slot = d.slot
             WHERE k.job_id = d.job_id AND k.slot = d.slot
            RETURNING k.job_id, k.pending + k.processing AS open_after, d.d_pending + d.d_processing AS d_open,
                      d.claimed
        ), by_job AS (
            SELECT c.job_id,
                   sum(CASE WHEN c.open_after = 0 AND c.d_open < 0 THEN -1  -- this row closed
                            WHEN c.open_after > 0 AND c.open_after = c.d_open THEN 1  -- it reopened
                            ELSE 0 END)::integer AS open_slots_delta,
                   bool_or(c.claimed) AS claimed
              FROM counted c
             GROUP BY c.job_id
        )
        SELECT b.job_id, b.open_slots_delta, b.claimed
          FROM by_job b
         WHERE b.open_slots_delta <> 0
            OR (b.claimed AND EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = b.job_id AND j.status = 'pending'))
         ORDER BY b.job_id
    LOOP
        RETURN QUERY SELECT * FROM chunkq._settle_job(v_job.job_id, v_job.open_slots_delta, v_job.claimed);
    END LOOP;
END $$;
COMMENT ON FUNCTION chunkq._apply_chunk_moves(chunkq._chunk_move[]) IS
    'Internal: books status changes of chunks into job_chunk_counts in one statement, locking the counter rows '
    'in (job, slot) order, and settles the jobs whose counts opened or closed or that were just started '
    '(_settle_job).';

-- (1) and (2). The statement's parts, in the order they take locks (chunk rows,
-- then counter rows in _apply_chunk_moves, then job rows in _settle_job):
--   done      the reported chunks, still processing at their attempt -> completed;
--   picked    up to p_limit claimable chunks, SKIP LOCKED (one of two: all jobs, or
--             p_job_id's; the other is switched off by its p_job_id test, so each
--             runs on its own claim index);
--   taken     those leased to the worker (_take_chunks);
-- and the result: the ids completed, the chunks taken, every status move.
-- A paused job's pending chunks wait with available_at = infinity, outside the
-- claim indexes; the NOT EXISTS also catches one that went back to pending since.
-- Chunks are found by id = ANY(array), which a generic plan takes for a few rows
-- whatever the statistics. Joined to picked instead, whose "LIMIT p_limit" it
-- guesses at 10 % of the table, the lease would hash the whole table; joined to
-- unnest(ids, attempts), the completion would scan the table whenever the
-- statistics were taken while nothing was processing, or, led by the ids, rescan
-- the pairs for every chunk (3 ms for 100). array_position finds each chunk's
-- attempt among the ids instead (duplicate ids are refused below).
CREATE FUNCTION chunkq._complete_and_claim(
    p_chunk_ids bigint[],
    p_attempts integer[],
    p_worker_id text,
    p_limit integer,
    p_job_id bigint,
    p_lease interval
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_reclaimed chunkq._chunk_move[] := '{}';
    v_done bigint[];
    v_taken chunkq.job_chunks[];
    v_moves chunkq._chunk_move[];
    v_refused record;
BEGIN
    -- Abandoned chunks first, so that they can be claimed again right away.
    IF (SELECT min(c.lease_expires_at) FROM chunkq.job_chunks c) < now() THEN
        v_reclaimed := ARRAY(SELECT m FROM chunkq._reclaim_expired(100) m);
    END IF;

    WITH done AS (
        UPDATE chunkq.job_chunks c
           SET status = 'completed', lease_expires_at = NULL, finished_at = now()
         WHERE c.id = ANY (p_chunk_ids) AND c.status = 'processing'
           AND c.attempt = p_attempts[array_position(p_chunk_ids, c.id)]
        RETURNING c.id, c.job_id, c.chunk_index
    ), picked AS (
        SELECT c.id FROM chunkq.job_chunks c
         WHERE p_job_id IS NULL
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
           AND NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = c.job_id AND j.paused_at IS NOT NULL)
         ORDER BY c.priority DESC, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), picked_of_job AS (
        SELECT c.id FROM chunkq.job_chunks c
         WHERE p_job_id IS NOT NULL AND c.job_id = p_job_id
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
           AND NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = p_job_id AND j.paused_at IS NOT NULL)
         ORDER BY c.priority DESC, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), taken AS (
        SELECT t AS chunk
          FROM chunkq._take_chunks(ARRAY(SELECT p.id FROM picked p UNION ALL SELECT p.id FROM picked_of_job p),
                                   p_worker_id, v_lease, NULL) t
    )
    SELECT (SELECT coalesce(array_agg(d.id), '{}') FROM done d),
           (SELECT coalesce(array_agg(t.chunk ORDER BY (t.chunk).priority DESC, (t.chunk).id), '{}') FROM taken t),
           v_reclaimed
           || ARRAY(SELECT (d.job_id, d.chunk_index, 'processing', 'completed')::chunkq._chunk_move FROM done d)
           || ARRAY(SELECT ((t.chunk).job_id, (t.chunk).chunk_index, 'pending', 'processing')::chunkq._chunk_move
                      FROM taken t)
      INTO v_done, v_taken, v_moves;

    -- All or nothing: raising undoes the statement above along with everything else.
    IF cardinality(v_done) < cardinality(p_chunk_ids) THEN
        IF (SELECT count(DISTINCT i) FROM unnest(p_chunk_ids) i) < cardinality(p_chunk_ids) THEN
            RAISE EXCEPTION 'a chunk is listed twice' USING ERRCODE = 'CQ001';
        END IF;
        SELECT r.id, r.attempt INTO v_refused
          FROM unnest(p_chunk_ids, p_attempts) WITH ORDINALITY AS r(id, attempt, n)
         WHERE r.id <> ALL (v_done)
         ORDER BY r.n
         LIMIT 1;
        PERFORM chunkq._refuse_report(v_refused.id, v_refused.attempt, 'complete');
    END IF;
    IF cardinality(v_taken) = 0 AND p_job_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_taken);
END $$;
COMMENT ON FUNCTION chunkq._complete_and_claim(bigint[], integer[], text, integer, bigint, interval) IS
    'Internal: the work of complete_and_claim and claim_chunks (arguments checked by them): reclaims expired '
    'leases, completes the listed chunks held at their attempts, leases up to p_limit claimable chunks (0: none) '
    'and books every move; raises the error of the first listed chunk that is no longer held.';
REVOKE ALL ON FUNCTION chunkq._complete_and_claim(bigint[], integer[], text, integer, bigint, interval) FROM PUBLIC;

CREATE OR REPLACE FUNCTION chunkq.claim_chunks(
    p_worker_id text DEFAULT NULL,
    p_limit integer DEFAULT 1,
    p_job_id bigint DEFAULT NULL,
    p_lease interval DEFAULT NULL
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'claim limit must be between 1 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT * FROM chunkq._complete_and_claim('{}', '{}', p_worker_id, p_limit, p_job_id, p_lease);
END $$;

CREATE OR REPLACE FUNCTION chunkq.complete_and_claim(
    p_chunk_ids bigint[],
    p_attempts integer[],
    p_worker_id text DEFAULT NULL,
    p_limit integer DEFAULT 1,
    p_job_id bigint DEFAULT NULL,
    p_lease interval DEFAULT NULL
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'claim limit must be between 0 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_chunk_ids IS NULL OR p_attempts IS NULL
       OR coalesce(cardinality(p_chunk_ids), 0) <> coalesce(cardinality(p_attempts), 0) THEN
        RAISE EXCEPTION 'chunk ids and attempts must be two arrays of the same length' USING ERRCODE = 'CQ001';
    END IF;
    IF array_position(p_chunk_ids, NULL) IS NOT NULL OR array_position(p_attempts, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'every completed chunk needs its id and the attempt its claim returned'
            USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT * FROM chunkq._complete_and_claim(p_chunk_ids, p_attempts, p_worker_id, p_limit,
                                                          p_job_id, p_lease);
END $$;

-- (6) The job reference of 0006 in one pass over the inserted chunks instead of two:
-- their distinct jobs are collected once, locked FOR KEY SHARE as a foreign key
-- would, and only when fewer are found is the missing one looked for.
CREATE OR REPLACE FUNCTION chunkq._check_chunk_jobs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_jobs bigint[] := ARRAY(SELECT DISTINCT n.job_id FROM new_chunks n ORDER BY 1);
    v_locked integer;
    v_missing bigint;
BEGIN
    PERFORM 1 FROM chunkq.crawl_jobs j WHERE j.id = ANY (v_jobs) ORDER BY j.id FOR KEY SHARE OF j;
    GET DIAGNOSTICS v_locked = ROW_COUNT;
    IF v_locked < cardinality(v_jobs) THEN
        SELECT m INTO v_missing FROM unnest(v_jobs) m
         WHERE NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = m)
         ORDER BY m
         LIMIT 1;
        RAISE EXCEPTION 'insert into chunkq.job_chunks refers to crawl job %, which does not exist', v_missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

-- (5) Statistics as fresh as the job just added. Every session plans a function's
-- statements once and keeps the plan; a plan made while job_chunks looked empty
-- (a worker polling before the first job, or statistics from before a large job)
-- reads the whole table to claim one chunk, measured at 12 ms of server CPU per
-- claim against about 1 ms, until the table is analyzed and the plans are made again.
-- Autovacuum analyzes after the same rule, but up to a minute later, or never if
-- it is off; so create_chunks analyzes at once when its job is that large.
CREATE FUNCTION chunkq._refresh_statistics(p_new_chunks integer) RETURNS boolean
LANGUAGE plpgsql SET lock_timeout = '100ms' AS $$
BEGIN
    -- Autovacuum's own rule: analyze once more rows changed than threshold + scale factor x rows.
    IF p_new_chunks <= current_setting('autovacuum_analyze_threshold')::integer
                       + current_setting('autovacuum_analyze_scale_factor')::double precision
                         * greatest((SELECT c.reltuples FROM pg_catalog.pg_class c
                                      WHERE c.oid = 'chunkq.job_chunks'::regclass), 0) THEN
        RETURN false;
    END IF;
    -- The columns the API's plans filter on (fewer columns, less work); it counts the
    -- rows this transaction inserted.
    ANALYZE chunkq.job_chunks (job_id, status, priority, available_at, lease_expires_at), chunkq.job_chunk_counts;
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;  -- a VACUUM or ANALYZE holds the table: it refreshes the statistics itself
END $$;
COMMENT ON FUNCTION chunkq._refresh_statistics(integer) IS
    'Internal: analyzes job_chunks and job_chunk_counts when p_new_chunks is more than autovacuum would let '
    'pass (autovacuum_analyze_threshold + autovacuum_analyze_scale_factor x rows), so that the plans sessions '
    'cache fit the table; gives up after 100 ms waiting for a running VACUUM or ANALYZE. True if it analyzed.';
REVOKE ALL ON FUNCTION chunkq._refresh_statistics(integer) FROM PUBLIC;

CREATE OR REPLACE FUNCTION chunkq.create_chunks(
    p_job_id bigint,
    p_max_images bigint DEFAULT NULL,
    p_priority integer DEFAULT NULL,
    p_chunk_size integer DEFAULT NULL
) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_job chunkq.crawl_jobs;
    v_chunk_size integer;
    v_priority integer;
    v_chunks integer;
    v_slots constant integer := chunkq._counter_slots();
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.chunked_at IS NOT NULL THEN
        RAISE EXCEPTION 'crawl job % already has its % chunks', p_job_id, v_job.total_chunks
            USING ERRCODE = 'CQ005', HINT = 'Each job is chunked once; read its chunks with list_chunks.';
    END IF;
    IF v_job.status = 'cancelled' THEN
        RAISE EXCEPTION 'crawl job % is cancelled', p_job_id USING ERRCODE = 'CQ004';
    END IF;
    IF p_max_images IS NOT NULL AND p_max_images <> v_job.max_images THEN
        RAISE EXCEPTION 'max_images % does not match crawl job %''s max_images %', p_max_images, p_job_id, v_job.max_images
            USING ERRCODE = 'CQ001';
    END IF;
    v_chunk_size := coalesce(p_chunk_size, v_job.chunk_size);
    v_priority := coalesce(p_priority, v_job.priority);
    v_chunks := chunkq._validate_shape(v_job.max_images, v_chunk_size);
    PERFORM chunkq._validate_priority(v_priority);

    INSERT INTO chunkq.job_chunks (job_id, chunk_index, image_start, image_end, priority)
    SELECT p_job_id, i, i::bigint * v_chunk_size, LEAST((i + 1)::bigint * v_chunk_size, v_job.max_images) - 1, v_priority
      FROM generate_series(0, v_chunks - 1) AS i;

    -- Slot s counts chunk indexes s, s+16, s+32, ...: ceil((n - s) / 16) of them.
    INSERT INTO chunkq.job_chunk_counts (job_id, slot, total, pending)
    SELECT p_job_id, s, (v_chunks - s + v_slots - 1) / v_slots, (v_chunks - s + v_slots - 1) / v_slots
      FROM generate_series(0, LEAST(v_chunks, v_slots) - 1) AS s;

    PERFORM chunkq._refresh_statistics(v_chunks);

    UPDATE chunkq.crawl_jobs
       SET chunk_size = v_chunk_size, priority = v_priority, total_chunks = v_chunks,
           open_slots = LEAST(v_chunks, v_slots), chunked_at = now()
     WHERE id = p_job_id
    RETURNING * INTO v_job;
    PERFORM chunkq._notify_claimable(p_job_id, v_chunks);
    RETURN v_job;
END $$;

DROP FUNCTION chunkq._claim(text, integer, bigint, interval, chunkq._chunk_move[]);
DROP FUNCTION chunkq._job_paused(bigint);

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 7';
