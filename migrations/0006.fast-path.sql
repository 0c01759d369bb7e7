-- chunkq 0006: the fast path.
-- 1. complete_and_claim reports the chunks a worker has finished and claims its
--    next ones in one call: one round trip and one commit per batch instead of one
--    per chunk and per claim. The single-chunk calls stay as they were.
-- 2. _apply_chunk_moves books a whole batch in one statement instead of one per
--    counter row.
-- 3. job_chunks.job_id is checked by triggers once per statement instead of by a
--    foreign key once per row, because create_chunks inserts many rows at a time.
--    Same rule, same locks. Measurements: CHANGELOG.md.
-- depends: 0005.roles

-- (3) The job reference, statement by statement. Inserting chunks locks their jobs
-- FOR KEY SHARE, as the foreign key did, so a concurrent delete of the job waits
-- for the insert to commit and then takes the new chunks with it.
ALTER TABLE chunkq.job_chunks DROP CONSTRAINT job_chunks_job_id_fkey;

CREATE FUNCTION chunkq._check_chunk_jobs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_missing bigint;
BEGIN
    PERFORM 1 FROM chunkq.crawl_jobs j
     WHERE j.id IN (SELECT DISTINCT n.job_id FROM new_chunks n)
     ORDER BY j.id
       FOR KEY SHARE OF j;
    SELECT n.job_id INTO v_missing
      FROM new_chunks n
     WHERE NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = n.job_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into chunkq.job_chunks refers to crawl job %, which does not exist', v_missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
COMMENT ON FUNCTION chunkq._check_chunk_jobs() IS
    'Internal (trigger): every inserted chunk''s job exists; locks those jobs FOR KEY SHARE, as a foreign key would.';
CREATE TRIGGER job_chunks_job_exists AFTER INSERT ON chunkq.job_chunks
    REFERENCING NEW TABLE AS new_chunks FOR EACH STATEMENT EXECUTE FUNCTION chunkq._check_chunk_jobs();
COMMENT ON TRIGGER job_chunks_job_exists ON chunkq.job_chunks IS
    'job_chunks.job_id refers to crawl_jobs.id: checked once per INSERT statement (a foreign key checks each row).';

CREATE FUNCTION chunkq._refuse_job_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a chunk cannot move to another job, nor a job change its id (table %)', TG_TABLE_NAME
        USING ERRCODE = 'foreign_key_violation';
END $$;
COMMENT ON FUNCTION chunkq._refuse_job_change() IS 'Internal (trigger): job ids of jobs and chunks never change.';
CREATE TRIGGER job_chunks_job_id_fixed BEFORE UPDATE OF job_id ON chunkq.job_chunks
    FOR EACH ROW WHEN (new.job_id IS DISTINCT FROM old.job_id) EXECUTE FUNCTION chunkq._refuse_job_change();
COMMENT ON TRIGGER job_chunks_job_id_fixed ON chunkq.job_chunks IS 'A chunk belongs to its job for good.';
CREATE TRIGGER crawl_jobs_id_fixed BEFORE UPDATE OF id ON chunkq.crawl_jobs
    FOR EACH ROW WHEN (new.id IS DISTINCT FROM old.id) EXECUTE FUNCTION chunkq._refuse_job_change();
COMMENT ON TRIGGER crawl_jobs_id_fixed ON chunkq.crawl_jobs IS 'Chunks refer to their job by id: it never changes.';

CREATE FUNCTION chunkq._delete_chunks_of_jobs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM chunkq.job_chunks c USING deleted_jobs d WHERE c.job_id = d.id;
    RETURN NULL;
END $$;
COMMENT ON FUNCTION chunkq._delete_chunks_of_jobs() IS
    'Internal (trigger): deleting jobs deletes their chunks, as ON DELETE CASCADE did.';
CREATE TRIGGER crawl_jobs_delete_chunks AFTER DELETE ON chunkq.crawl_jobs
    REFERENCING OLD TABLE AS deleted_jobs FOR EACH STATEMENT EXECUTE FUNCTION chunkq._delete_chunks_of_jobs();
COMMENT ON TRIGGER crawl_jobs_delete_chunks ON chunkq.crawl_jobs IS
    'Deleting a job deletes its chunks (and with them their errors). TRUNCATE is not covered: truncate '
    'crawl_jobs together with job_chunks, job_chunk_counts and chunk_errors.';
COMMENT ON COLUMN chunkq.job_chunks.job_id IS
    'The crawl job (crawl_jobs.id). Enforced by triggers rather than a foreign key, to keep bulk inserts '
    'cheap: inserts must name an existing job, a chunk never changes job, deleting a job deletes its chunks.';
REVOKE ALL ON FUNCTION chunkq._check_chunk_jobs(), chunkq._refuse_job_change(), chunkq._delete_chunks_of_jobs()
    FROM PUBLIC;

-- Booking in one statement: the loop of 0004 sent one UPDATE per counter row, up to
-- 32 for a batch (a batch of consecutive chunks touches every slot of its job).
-- The guarantees are the same: rows are locked in (job, slot) order first (ORDER BY
-- is applied before FOR UPDATE locks), so calls that move several rows queue
-- instead of deadlocking; each row's UPDATE applies on top of any earlier one, so
-- exactly one call sees a row's open count reach 0, and _settle_job finishes a job
-- exactly once.
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
        )
        SELECT c.job_id,
               sum(CASE WHEN c.open_after = 0 AND c.d_open < 0 THEN -1  -- this row closed
                        WHEN c.open_after > 0 AND c.open_after = c.d_open THEN 1  -- it reopened
                        ELSE 0 END)::integer AS open_slots_delta,
               bool_or(c.claimed) AS claimed
          FROM counted c
         GROUP BY c.job_id
         ORDER BY c.job_id
    LOOP
        RETURN QUERY SELECT * FROM chunkq._settle_job(v_job.job_id, v_job.open_slots_delta, v_job.claimed);
    END LOOP;
END $$;

-- The claim itself, shared by claim_chunks and complete_and_claim. p_moves are the
-- caller's other status changes, booked together with the claim's in one ordered
-- pass over the counter rows (so a fused call cannot deadlock with another).
CREATE FUNCTION chunkq._claim(
    p_worker_id text,
    p_limit integer,
    p_job_id bigint,
    p_lease interval,
    p_moves chunkq._chunk_move[]
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_moves chunkq._chunk_move[];
    v_ids bigint[] := '{}';
    v_taken chunkq.job_chunks[] := '{}';
BEGIN
    -- Abandoned chunks first, so that they can be claimed again right away.
    v_moves := p_moves || ARRAY(SELECT m FROM chunkq._reclaim_expired(100) m);

    -- SKIP LOCKED: chunks another claim is taking right now are passed over, not
    -- waited for, so concurrent claims never hand out the same chunk and never queue.
    -- A paused job's pending chunks wait with available_at = infinity, outside the
    -- claim index; _job_paused also catches one that went back to pending since.
    IF p_limit > 0 AND p_job_id IS NULL THEN
        v_ids := ARRAY(SELECT c.id FROM chunkq.job_chunks c
                        WHERE c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
                          AND NOT chunkq._job_paused(c.job_id)
                        ORDER BY c.priority DESC, c.id
                        LIMIT p_limit
                          FOR UPDATE OF c SKIP LOCKED);
    ELSIF p_limit > 0 THEN
        v_ids := ARRAY(SELECT c.id FROM chunkq.job_chunks c
                        WHERE c.job_id = p_job_id AND c.status = 'pending' AND c.available_at < 'infinity'
                          AND c.available_at <= now() AND NOT chunkq._job_paused(c.job_id)
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
    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_taken) t ORDER BY t.priority DESC, t.id;
END $$;
COMMENT ON FUNCTION chunkq._claim(text, integer, bigint, interval, chunkq._chunk_move[]) IS
    'Internal: reclaims expired leases, leases up to p_limit claimable chunks (0: none) to a worker and books '
    'those moves together with the caller''s p_moves.';

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
    RETURN QUERY SELECT * FROM chunkq._claim(p_worker_id, p_limit, p_job_id, p_lease, '{}');
END $$;

CREATE FUNCTION chunkq.complete_and_claim(
    p_chunk_ids bigint[],
    p_attempts integer[],
    p_worker_id text DEFAULT NULL,
    p_limit integer DEFAULT 1,
    p_job_id bigint DEFAULT NULL,
    p_lease interval DEFAULT NULL
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS $$
-- All or nothing: if any listed chunk is no longer held at its attempt (lease lost,
-- cancelled, already reported), the call raises that chunk's error as complete_chunk
-- would and nothing is completed or claimed; the caller then reports one by one.
DECLARE
    v_done bigint[];
    v_moves chunkq._chunk_move[];
    v_refused record;
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
    IF (SELECT count(DISTINCT i) FROM unnest(p_chunk_ids) i) <> cardinality(p_chunk_ids) THEN
        RAISE EXCEPTION 'a chunk is listed twice' USING ERRCODE = 'CQ001';
    END IF;

    WITH done AS (
        UPDATE chunkq.job_chunks c
           SET status = 'completed', lease_expires_at = NULL, finished_at = now()
          FROM unnest(p_chunk_ids, p_attempts) AS r(id, attempt)
         WHERE c.id = r.id AND c.attempt = r.attempt AND c.status = 'processing'
        RETURNING c.id, c.job_id, c.chunk_index
    )
    SELECT coalesce(array_agg(d.id), '{}'),
           coalesce(array_agg((d.job_id, d.chunk_index, 'processing', 'completed')::chunkq._chunk_move), '{}')
      INTO v_done, v_moves
      FROM done d;
    IF cardinality(v_done) < cardinality(p_chunk_ids) THEN
        SELECT r.id, r.attempt INTO v_refused
          FROM unnest(p_chunk_ids, p_attempts) WITH ORDINALITY AS r(id, attempt, n)
         WHERE r.id <> ALL (v_done)
         ORDER BY r.n
         LIMIT 1;
        PERFORM chunkq._refuse_report(v_refused.id, v_refused.attempt, 'complete');
    END IF;
    RETURN QUERY SELECT * FROM chunkq._claim(p_worker_id, p_limit, p_job_id, p_lease, v_moves);
END $$;
COMMENT ON FUNCTION chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval) IS
    'The worker''s fast path: completes the chunks it holds (ids with the attempts their claims returned) and '
    'claims up to p_limit more (0: none), as claim_chunks does, in one transaction. All or nothing: a chunk no '
    'longer held raises its error (CQ006 lease lost, CQ007 cancelled, CQ004 not processing) and nothing changes. '
    'Example: SELECT * FROM chunkq.complete_and_claim(''{17,18}'', ''{1,1}'', ''crawler-1:4242'', 2);';

REVOKE ALL ON FUNCTION chunkq._claim(text, integer, bigint, interval, chunkq._chunk_move[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval)
    TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 6';
