-- Rolls back 0010: the scheduler (fair order, limits, defer_chunk, failure budget).

DROP VIEW chunkq.job_overview CASCADE;  -- list_jobs returns its rows: recreated below
DROP VIEW chunkq.rate_limit_state;
DROP FUNCTION chunkq.claimable_in(bigint);
DROP FUNCTION chunkq.defer_chunk(bigint, integer, interval, text, boolean, uuid);
DROP FUNCTION chunkq.set_job_limits(bigint, jsonb);
DROP FUNCTION chunkq._validate_limits(integer, text, double precision, double precision, integer, integer);
DROP FUNCTION chunkq.set_rate_limit(text, double precision, integer, integer);
DROP FUNCTION chunkq.delete_rate_limit(text);
DROP FUNCTION chunkq._check_failure_budget(bigint);
DROP FUNCTION chunkq._claim_allowances(integer, bigint);
DROP FUNCTION chunkq._spend_tokens(chunkq.job_chunks[]);
DROP FUNCTION chunkq._set_limited(bigint, boolean);
DROP FUNCTION chunkq._requeue_job(bigint, real);
DROP FUNCTION chunkq._queue_front(integer);
DROP FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval,
                                integer, text, double precision, double precision, integer, integer);
DELETE FROM chunkq.error_codes WHERE sqlstate IN ('CQ008', 'CQ009');
DROP TABLE chunkq.rate_limits;

CREATE OR REPLACE FUNCTION chunkq._complete_and_claim(p_chunk_ids bigint[], p_attempts integer[], p_worker_id text, p_limit integer, p_job_id bigint, p_lease interval, p_lease_tokens uuid[] DEFAULT NULL::uuid[])
 RETURNS SETOF chunkq.job_chunks
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_waived constant boolean := CASE WHEN cardinality(p_chunk_ids) > 0
                                           AND (p_lease_tokens IS NULL OR array_position(p_lease_tokens, NULL) IS NOT NULL)
                                      THEN chunkq._may_override() ELSE false END;
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
           AND (c.lease_token = p_lease_tokens[array_position(p_chunk_ids, c.id)] OR v_waived)
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
        SELECT r.id, r.attempt, r.lease_token INTO v_refused
          FROM unnest(p_chunk_ids, p_attempts, p_lease_tokens) WITH ORDINALITY AS r(id, attempt, lease_token, n)
         WHERE r.id <> ALL (v_done)
         ORDER BY r.n
         LIMIT 1;
        PERFORM chunkq._refuse_report(v_refused.id, v_refused.attempt, 'complete', v_refused.lease_token);
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
COMMENT ON FUNCTION chunkq._complete_and_claim(bigint[], integer[], text, integer, bigint, interval, uuid[]) IS
    'Internal: the work of complete_and_claim and claim_chunks (arguments checked by them): reclaims expired '
    'leases, completes the listed chunks held at their attempts and lease tokens, leases up to p_limit claimable '
    'chunks (0: none) and books every move; raises the error of the first listed chunk that is no longer held.';

CREATE OR REPLACE FUNCTION chunkq._apply_chunk_moves(p_moves chunkq._chunk_move[])
 RETURNS TABLE(job bigint, job_status chunkq.job_status, finished boolean)
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_generic_plan'
AS $$
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
    'Internal: books status changes of chunks into job_chunk_counts in one statement, locking the counter rows in '
    '(job, slot) order, and settles the jobs whose counts opened or closed or that were just started (_settle_job).';

CREATE OR REPLACE FUNCTION chunkq.fail_chunk(p_chunk_id bigint, p_attempt integer, p_error text, p_retry boolean DEFAULT false, p_max_retries integer DEFAULT NULL::integer, p_lease_token uuid DEFAULT NULL::uuid)
 RETURNS chunkq.chunk_outcome
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    v_error text := chunkq._clip_error(p_error);
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_retries_done integer;
    v_max_retries integer;
    v_base_delay interval;
    v_retry boolean;
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    IF p_max_retries < 0 THEN
        RAISE EXCEPTION 'max_retries must not be negative, got %', p_max_retries USING ERRCODE = 'CQ001';
    END IF;
    SELECT c.retry_count, j.max_retries, j.retry_base_delay INTO v_retries_done, v_max_retries, v_base_delay
      FROM chunkq.job_chunks c JOIN chunkq.crawl_jobs j ON j.id = c.job_id
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
       FOR UPDATE OF c;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'fail', p_lease_token);
    END IF;
    v_retry := coalesce(p_retry, false) AND v_retries_done < coalesce(p_max_retries, v_max_retries);
    UPDATE chunkq.job_chunks c
       SET status = CASE WHEN v_retry THEN 'pending' ELSE 'failed' END::chunkq.chunk_status,
           retry_count = c.retry_count + v_retry::integer,
           available_at = CASE WHEN v_retry THEN now() + chunkq._retry_delay(c.retry_count, v_base_delay)
                               ELSE c.available_at END,
           finished_at = CASE WHEN v_retry THEN NULL ELSE now() END,
           error_message = v_error,
           lease_expires_at = NULL
     WHERE c.id = p_chunk_id
    RETURNING c.* INTO v_chunk;
    INSERT INTO chunkq.chunk_errors (chunk_id, job_id, attempt, worker_id, error, retried)
    VALUES (v_chunk.id, v_chunk.job_id, v_chunk.attempt, v_chunk.worker_id, v_error, v_chunk.status = 'pending');
    RETURN chunkq._outcome(v_chunk, 'processing');
END $$;
COMMENT ON FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean, integer, uuid) IS
    'Records an error for a processing chunk (p_attempt and p_lease_token as for complete_chunk). With p_retry '
    'true and retries left (retry_count < p_max_retries, default the job''s max_retries) the chunk goes back to '
    'pending after a backoff (see _retry_delay) with retry_count + 1; otherwise it is failed. Every error is kept '
    'in chunk_errors.';

CREATE OR REPLACE FUNCTION chunkq.create_chunks(p_job_id bigint, p_max_images bigint DEFAULT NULL::bigint, p_priority integer DEFAULT NULL::integer, p_chunk_size integer DEFAULT NULL::integer)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
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
COMMENT ON FUNCTION chunkq.create_chunks(bigint, bigint, integer, integer) IS
    'Splits a job into chunks of chunk_size images: inclusive ranges 0..499, 500..999, ... (the last one shorter). '
    'NULL arguments take the job''s values; p_max_images, when given, must equal the job''s. Returns the job. Raises '
    'CQ005 if the job already has chunks (it never duplicates them).';

CREATE OR REPLACE FUNCTION chunkq.pause_job(p_job_id bigint)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    v_job chunkq.crawl_jobs;
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'cannot pause crawl job %: it is %', p_job_id, v_job.status USING ERRCODE = 'CQ004';
    END IF;
    IF v_job.paused_at IS NOT NULL THEN
        RETURN v_job;  -- already paused
    END IF;
    -- Chunks first, the job row last (the lock order every function keeps).
    UPDATE chunkq.job_chunks SET available_at = 'infinity' WHERE job_id = p_job_id AND status = 'pending';
    UPDATE chunkq.crawl_jobs SET paused_at = now() WHERE id = p_job_id RETURNING * INTO v_job;
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.pause_job(bigint) IS
    'Stops handing out a job''s chunks; chunks already being processed carry on. Pausing a paused job does nothing; '
    'a finished or cancelled job raises CQ004.';

CREATE OR REPLACE FUNCTION chunkq.resume_job(p_job_id bigint)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    v_job chunkq.crawl_jobs;
    v_released integer;
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'cannot resume crawl job %: it is %', p_job_id, v_job.status USING ERRCODE = 'CQ004';
    END IF;
    IF v_job.paused_at IS NULL THEN
        RETURN v_job;  -- not paused
    END IF;
    UPDATE chunkq.job_chunks SET available_at = now()
     WHERE job_id = p_job_id AND status = 'pending' AND available_at = 'infinity';
    GET DIAGNOSTICS v_released = ROW_COUNT;
    UPDATE chunkq.crawl_jobs SET paused_at = NULL WHERE id = p_job_id RETURNING * INTO v_job;
    PERFORM chunkq._notify_claimable(p_job_id, v_released);
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.resume_job(bigint) IS
    'Lets a paused job''s chunks be claimed again. Resuming a job that is not paused does nothing; a finished or '
    'cancelled job raises CQ004.';

CREATE OR REPLACE FUNCTION chunkq.set_job_priority(p_job_id bigint, p_priority integer)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    v_job chunkq.crawl_jobs;
BEGIN
    PERFORM chunkq._validate_priority(p_priority);
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'cannot change the priority of crawl job %: it is %', p_job_id, v_job.status
            USING ERRCODE = 'CQ004';
    END IF;
    UPDATE chunkq.job_chunks SET priority = p_priority
     WHERE job_id = p_job_id AND status IN ('pending', 'processing') AND priority <> p_priority;
    UPDATE chunkq.crawl_jobs SET priority = p_priority WHERE id = p_job_id RETURNING * INTO v_job;
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.set_job_priority(bigint, integer) IS
    'Gives a job and its unfinished chunks a new priority (in the settings range). A finished or cancelled job '
    'raises CQ004.';

CREATE OR REPLACE FUNCTION chunkq.claim_chunk(p_chunk_id bigint, p_worker_id text DEFAULT NULL::text, p_lease interval DEFAULT NULL::interval, p_task_id text DEFAULT NULL::text)
 RETURNS chunkq.job_chunks
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET plan_cache_mode TO 'force_generic_plan'
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_chunk chunkq.job_chunks;
BEGIN
    -- Waits for a concurrent claim of the same chunk, then sees it processing.
    SELECT * INTO v_chunk FROM chunkq.job_chunks WHERE id = p_chunk_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunk % does not exist', p_chunk_id USING ERRCODE = 'CQ003';
    END IF;
    IF v_chunk.status <> 'pending' THEN
        RAISE EXCEPTION 'cannot claim chunk %: it is % (attempt %, worker %)', p_chunk_id, v_chunk.status,
            v_chunk.attempt, coalesce(v_chunk.worker_id, '-')
            USING ERRCODE = 'CQ004';
    END IF;
    SELECT * INTO v_chunk FROM chunkq._take_chunks(ARRAY[p_chunk_id], p_worker_id, v_lease, p_task_id);
    PERFORM chunkq._apply_chunk_moves(
        ARRAY[(v_chunk.job_id, v_chunk.chunk_index, 'pending', 'processing')::chunkq._chunk_move]);
    RETURN v_chunk;
END $$;
COMMENT ON FUNCTION chunkq.claim_chunk(bigint, text, interval, text) IS
    'Claims one given pending chunk (even one waiting out a retry backoff). Raises CQ004 if it is not pending, for '
    'instance because another worker holds it.';

CREATE OR REPLACE FUNCTION chunkq.create_job(p_project_id bigint, p_name text, p_keywords jsonb, p_max_images bigint, p_priority integer DEFAULT NULL::integer, p_max_retries integer DEFAULT NULL::integer, p_chunk_size integer DEFAULT NULL::integer, p_id bigint DEFAULT NULL::bigint, p_retry_base_delay interval DEFAULT NULL::interval)
 RETURNS chunkq.crawl_jobs
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    v_settings chunkq.settings;
    v_job chunkq.crawl_jobs;
BEGIN
    SELECT * INTO v_settings FROM chunkq.settings;
    IF p_project_id IS NULL THEN
        RAISE EXCEPTION 'project_id is required' USING ERRCODE = 'CQ001';
    END IF;
    IF p_name IS NULL OR btrim(p_name) = '' OR length(p_name) > 500 THEN
        RAISE EXCEPTION 'name must be 1 to 500 characters and not blank' USING ERRCODE = 'CQ001';
    END IF;
    PERFORM chunkq._validate_shape(p_max_images, coalesce(p_chunk_size, v_settings.chunk_size));
    PERFORM chunkq._validate_priority(coalesce(p_priority, v_settings.default_priority));
    IF coalesce(p_max_retries, 0) NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'max_retries must be between 0 and 1000, got %', p_max_retries USING ERRCODE = 'CQ001';
    END IF;
    IF p_retry_base_delay < interval '0' THEN
        RAISE EXCEPTION 'retry_base_delay must not be negative, got %', p_retry_base_delay USING ERRCODE = 'CQ001';
    END IF;
    IF p_id IS NOT NULL THEN
        IF p_id < 1 THEN
            RAISE EXCEPTION 'a job id must be positive, got %', p_id USING ERRCODE = 'CQ001';
        END IF;
        IF EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_id) THEN
            RAISE EXCEPTION 'crawl job % exists already', p_id USING ERRCODE = 'CQ001';
        END IF;
    END IF;

    BEGIN
        INSERT INTO chunkq.crawl_jobs (id, project_id, name, keywords, max_images, chunk_size, priority, max_retries,
                                       retry_base_delay)
        OVERRIDING SYSTEM VALUE
        VALUES (coalesce(p_id, nextval(pg_get_serial_sequence('chunkq.crawl_jobs', 'id'))), p_project_id, p_name,
                coalesce(p_keywords, '[]'::jsonb), p_max_images,
                coalesce(p_chunk_size, v_settings.chunk_size),
                coalesce(p_priority, v_settings.default_priority),
                coalesce(p_max_retries, v_settings.default_max_retries),
                p_retry_base_delay)
        RETURNING * INTO v_job;
    EXCEPTION WHEN unique_violation THEN  -- the same id, created by a concurrent call since the check above
        RAISE EXCEPTION 'crawl job % exists already', p_id USING ERRCODE = 'CQ001';
    END;
    -- A given id is taken from the ids the table would hand out, so that a job created
    -- later without one can never collide with it.
    IF p_id IS NOT NULL THEN
        PERFORM setval(pg_get_serial_sequence('chunkq.crawl_jobs', 'id'), greatest(p_id, s.last_value))
           FROM chunkq.crawl_jobs_id_seq s;
    END IF;
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval) IS
    'Creates a crawl job (no chunks yet; see create_chunks). NULL priority, max_retries, chunk_size and '
    'retry_base_delay take the defaults in chunkq.settings. p_id gives the job an id of your own (e.g. your '
    'application''s job id); ids chunkq hands out afterwards skip past it. Raises CQ001 for a blank name, '
    'max_images <= 0, more chunks than settings.max_chunks_per_job, or an id in use.';
REVOKE ALL ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval) TO chunkq_app;

CREATE VIEW chunkq.job_overview AS
 SELECT j.id,
    j.project_id,
    j.name,
    j.status,
    j.priority,
    j.total_chunks,
    COALESCE(k.pending, 0) AS pending_chunks,
    COALESCE(k.processing, 0) AS processing_chunks,
    COALESCE(k.completed, 0) AS completed_chunks,
    COALESCE(k.failed, 0) AS failed_chunks,
    COALESCE(k.cancelled, 0) AS cancelled_chunks,
        CASE
            WHEN j.total_chunks = 0 THEN 0.0::double precision
            ELSE round(100.0 * COALESCE(k.completed, 0)::numeric / j.total_chunks::numeric, 2)::double precision
        END AS completion_percentage,
    j.max_images,
    j.created_at,
    j.started_at,
    j.finished_at,
    j.paused_at,
    chunkq._completed_images(j.*, COALESCE(k.completed, 0)::bigint) AS completed_images,
    r.chunks_per_second,
        CASE
            WHEN j.finished_at IS NULL AND r.chunks_per_second > 0::double precision THEN (COALESCE(k.pending, 0) + COALESCE(k.processing, 0))::double precision / r.chunks_per_second * '00:00:01'::interval
            ELSE NULL::interval
        END AS eta
   FROM chunkq.crawl_jobs j
     LEFT JOIN LATERAL ( SELECT sum(c.pending)::integer AS pending,
            sum(c.processing)::integer AS processing,
            sum(c.completed)::integer AS completed,
            sum(c.failed)::integer AS failed,
            sum(c.cancelled)::integer AS cancelled,
            sum(
                CASE
                    WHEN c.rate_minute = date_trunc('minute'::text, now()) THEN c.completed_this_minute + c.completed_last_minute
                    WHEN c.rate_minute = (date_trunc('minute'::text, now()) - '00:01:00'::interval) THEN c.completed_this_minute
                    ELSE 0
                END) AS recent
           FROM chunkq.job_chunk_counts c
          WHERE c.job_id = j.id) k ON true
     LEFT JOIN LATERAL ( SELECT round(COALESCE(k.recent, 0::bigint)::numeric / GREATEST(1.0, LEAST(60::numeric + EXTRACT(epoch FROM now() - date_trunc('minute'::text, now())), EXTRACT(epoch FROM now() - j.started_at))), 2)::double precision AS chunks_per_second
          WHERE j.started_at IS NOT NULL) r ON true;
COMMENT ON VIEW chunkq.job_overview IS
    'Every job with its chunk counts by status, completion percentage, images done, completion rate over the last '
    'one to two minutes and ETA (from job_chunk_counts: cheap per job). Example: SELECT * FROM chunkq.job_overview '
    'WHERE status = ''running'';';
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
COMMENT ON COLUMN chunkq.job_overview.paused_at IS 'When the job was paused, if it is.';
COMMENT ON COLUMN chunkq.job_overview.completed_images IS 'Images in completed chunks.';
COMMENT ON COLUMN chunkq.job_overview.chunks_per_second IS
    'Completions per second over the previous minute and this one so far (NULL before the job starts).';
COMMENT ON COLUMN chunkq.job_overview.eta IS 'Pending and processing chunks at that rate; NULL when nothing moves.';
GRANT SELECT ON TABLE chunkq.job_overview TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.list_jobs(p_status chunkq.job_status DEFAULT NULL::chunkq.job_status, p_limit integer DEFAULT 50)
 RETURNS SETOF chunkq.job_overview
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
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
REVOKE ALL ON FUNCTION chunkq.list_jobs(chunkq.job_status, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.list_jobs(chunkq.job_status, integer) TO chunkq_reader;

DROP VIEW chunkq.queue_depth;
CREATE VIEW chunkq.queue_depth AS
SELECT c.priority,
       count(*) AS pending_chunks,
       count(*) FILTER (WHERE c.available_at <= now()) AS claimable_chunks,
       now() - min(c.created_at) AS oldest_pending_age
  FROM chunkq.job_chunks c
 WHERE c.status = 'pending'
 GROUP BY c.priority;
COMMENT ON VIEW chunkq.queue_depth IS
    'Pending chunks by priority: how many, how many may be claimed now (the rest wait out a retry backoff), '
    'and how long the oldest has waited. Reads every pending chunk (the claim index).';
COMMENT ON COLUMN chunkq.queue_depth.priority IS 'Chunk priority; higher is claimed first.';
COMMENT ON COLUMN chunkq.queue_depth.pending_chunks IS 'Pending chunks of this priority.';
COMMENT ON COLUMN chunkq.queue_depth.claimable_chunks IS 'Of those, how many a claim may take now.';
COMMENT ON COLUMN chunkq.queue_depth.oldest_pending_age IS 'Age of the oldest pending chunk of this priority.';
GRANT SELECT ON chunkq.queue_depth TO chunkq_reader;

DROP INDEX chunkq.job_chunks_claim_order;
CREATE INDEX job_chunks_claim_order ON chunkq.job_chunks USING btree (priority DESC, id) WHERE ((status = 'pending'::chunkq.chunk_status) AND (available_at < 'infinity'::timestamp with time zone));
COMMENT ON INDEX chunkq.job_chunks_claim_order IS
    'Claim order over claimable chunks: priority, then age. Chunks of paused jobs (available_at = infinity) are '
    'left out.';

DROP INDEX chunkq.job_chunks_claim_order_limited;
DROP INDEX chunkq.crawl_jobs_limited;
DROP INDEX chunkq.crawl_jobs_by_rate_key;
ALTER TABLE chunkq.chunk_errors DROP COLUMN deferred;
ALTER TABLE chunkq.job_chunk_counts DROP COLUMN last_completed_at;
ALTER TABLE chunkq.job_chunks DROP COLUMN vpos, DROP COLUMN limited;
ALTER TABLE chunkq.crawl_jobs
    DROP COLUMN weight, DROP COLUMN max_running, DROP COLUMN rate_key, DROP COLUMN max_failed_ratio,
    DROP COLUMN max_failed_chunks, DROP COLUMN max_consecutive_failures, DROP COLUMN limited,
    DROP COLUMN paused_reason, DROP COLUMN budget_reset_at;

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 9';
