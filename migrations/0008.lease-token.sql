-- chunkq 0008: the lease token. A report on a chunk must carry something only
-- its claimer has. The attempt fences off a stale worker, but it is a small
-- counter that any chunkq_worker login can guess. Every claim now also draws a
-- random lease token (a uuid) that heartbeat, complete, fail and release must
-- present with the attempt; without it, or with another one, a report is refused
-- like a stale one (CQ006). chunkq_app, a superuser or the schema's owner may
-- still report without it. Readers never see a token.
--
-- Upgrading: stop the worker pools before applying this migration (they hand
-- their chunks back). A worker from before it cannot report on chunks it claims
-- afterwards (it does not send the token): they are refused, and re-run once
-- their lease expires. Chunks still processing when it is applied get a token
-- nobody holds, so the same happens to them.
-- depends: 0007.one-statement-claim

ALTER TABLE chunkq.job_chunks ADD COLUMN lease_token uuid;
UPDATE chunkq.job_chunks SET lease_token = gen_random_uuid() WHERE status = 'processing';
ALTER TABLE chunkq.job_chunks ADD CONSTRAINT job_chunks_processing_has_lease_token
    CHECK (status <> 'processing' OR lease_token IS NOT NULL);
COMMENT ON COLUMN chunkq.job_chunks.lease_token IS
    'Random token drawn by each claim and returned only to the claimer: heartbeat, complete, fail and release '
    'must present it with the attempt, so a worker cannot report on a chunk another worker holds. The read '
    'functions (get_chunk, list_chunks, failed_chunks) return it as NULL.';

UPDATE chunkq.error_codes
   SET meaning = 'The caller no longer holds the chunk: its lease expired and the chunk was reclaimed, '
                 'or another attempt now holds it, or the report did not carry the lease token of the claim. '
                 'The holder''s attempt is left untouched.'
 WHERE sqlstate = 'CQ006';

-- Who may report without the lease token or the attempt: an operator by hand.
CREATE FUNCTION chunkq._may_override() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pg_has_role(session_user, 'chunkq_app', 'USAGE')
        OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = session_user)
        OR pg_has_role(session_user, (SELECT n.nspowner FROM pg_catalog.pg_namespace n
                                       WHERE n.nspname = 'chunkq'), 'USAGE');
$$;
COMMENT ON FUNCTION chunkq._may_override() IS
    'Internal: true when the session''s user may report on a chunk without the attempt or lease token its '
    'claim returned: chunkq_app, a superuser, the schema''s owner.';
REVOKE ALL ON FUNCTION chunkq._may_override() FROM PUBLIC;

CREATE OR REPLACE FUNCTION chunkq._check_override(p_attempt integer) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_attempt IS NULL AND NOT chunkq._may_override() THEN
        RAISE EXCEPTION 'only chunkq_app may report on a chunk without its attempt'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Pass the attempt and the lease token the claim returned.';
    END IF;
END $$;

-- Every claim goes through here: the token is drawn with the lease.
CREATE OR REPLACE FUNCTION chunkq._take_chunks(p_ids bigint[], p_worker_id text, p_lease interval, p_task_id text)
RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
-- Turns locked pending chunks into processing ones leased to p_worker_id. The
-- caller books the moves (pending -> processing) with its other moves.
DECLARE
    v_worker text := coalesce(nullif(btrim(p_worker_id), ''), session_user || '@backend-' || pg_backend_pid());
BEGIN
    RETURN QUERY
    UPDATE chunkq.job_chunks c
       SET status = 'processing',
           attempt = c.attempt + 1,
           lease_token = gen_random_uuid(),
           worker_id = v_worker,
           task_id = p_task_id,
           lease_expires_at = now() + p_lease,
           claimed_at = now(),
           heartbeat_at = now()
     WHERE c.id = ANY (p_ids)
    RETURNING c.*;
END $$;
COMMENT ON FUNCTION chunkq._take_chunks(bigint[], text, interval, text) IS
    'Internal: leases the given locked pending chunks to a worker for p_lease (attempt + 1, a new lease token); '
    'the caller books it.';

DROP FUNCTION chunkq._refuse_report(bigint, integer, text);
CREATE FUNCTION chunkq._refuse_report(p_chunk_id bigint, p_attempt integer, p_action text, p_lease_token uuid)
RETURNS void
LANGUAGE plpgsql STABLE AS $$
-- Called when heartbeat/complete/fail/release matched no row: say precisely why.
DECLARE
    v_chunk chunkq.job_chunks;
BEGIN
    SELECT * INTO v_chunk FROM chunkq.job_chunks WHERE id = p_chunk_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chunk % does not exist', p_chunk_id USING ERRCODE = 'CQ003';
    END IF;
    IF v_chunk.status = 'cancelled' THEN
        RAISE EXCEPTION 'cannot % chunk %: it was cancelled with job %', p_action, p_chunk_id, v_chunk.job_id
            USING ERRCODE = 'CQ007';
    END IF;
    -- A stale attempt: a newer attempt exists, or this attempt's lease lapsed and
    -- reclaim_expired_chunks took the chunk back.
    IF p_attempt IS NOT NULL AND (
           v_chunk.attempt <> p_attempt
           OR EXISTS (SELECT 1 FROM chunkq.chunk_errors e
                       WHERE e.chunk_id = p_chunk_id AND e.attempt = p_attempt AND e.lease_expired)) THEN
        RAISE EXCEPTION 'cannot % chunk % as attempt %: its lease expired and the chunk was reclaimed',
            p_action, p_chunk_id, p_attempt
            USING ERRCODE = 'CQ006',
                  DETAIL = format('The chunk is now %s at attempt %s (worker %s).', v_chunk.status,
                                  v_chunk.attempt, coalesce(v_chunk.worker_id, '-'));
    END IF;
    -- The right attempt of a processing chunk, so the token was missing or wrong:
    -- the caller is not the worker that claimed it (a guessed attempt).
    IF v_chunk.status = 'processing' THEN
        RAISE EXCEPTION 'cannot % chunk % as attempt %: the report does not carry the lease token of that claim',
            p_action, p_chunk_id, coalesce(p_attempt::text, 'NULL')
            USING ERRCODE = 'CQ006',
                  DETAIL = format('The chunk is held by worker %s.', v_chunk.worker_id),
                  HINT = 'Only the worker that claimed a chunk may report on it, with the lease_token its claim '
                         'returned.';
    END IF;
    RAISE EXCEPTION 'cannot % chunk %: it is %, not processing', p_action, p_chunk_id, v_chunk.status
        USING ERRCODE = 'CQ004';
END $$;
COMMENT ON FUNCTION chunkq._refuse_report(bigint, integer, text, uuid) IS
    'Internal: raises the precise error for a heartbeat, complete, fail or release that matched no chunk: CQ003 '
    'unknown chunk, CQ007 cancelled, CQ006 lease lost (stale attempt, or not the claim''s lease token), CQ004 '
    'not processing.';
REVOKE ALL ON FUNCTION chunkq._refuse_report(bigint, integer, text, uuid) FROM PUBLIC;

-- The reports. Each matches the chunk by id, status, attempt and lease token; the
-- token check is waived only when no token is passed by a caller who may
-- override (v_waived, which looks up roles only then).

DROP FUNCTION chunkq.complete_chunk(bigint, integer);
CREATE FUNCTION chunkq.complete_chunk(p_chunk_id bigint, p_attempt integer DEFAULT NULL, p_lease_token uuid DEFAULT NULL)
RETURNS chunkq.chunk_outcome
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    UPDATE chunkq.job_chunks c
       SET status = 'completed', lease_expires_at = NULL, finished_at = now()
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'complete', p_lease_token);
    END IF;
    RETURN chunkq._outcome(v_chunk, 'processing');
END $$;
COMMENT ON FUNCTION chunkq.complete_chunk(bigint, integer, uuid) IS
    'Marks a processing chunk completed. p_attempt and p_lease_token are what the claim returned: a stale '
    'attempt or another token raises CQ006 and leaves the holder''s attempt alone (chunkq_app may pass NULLs: '
    'operator use). job_finished is true for the one call that finished the job.';

DROP FUNCTION chunkq.heartbeat_chunk(bigint, integer, interval, text);
CREATE FUNCTION chunkq.heartbeat_chunk(
    p_chunk_id bigint,
    p_attempt integer,
    p_lease interval DEFAULT NULL,
    p_task_id text DEFAULT NULL,
    p_lease_token uuid DEFAULT NULL
) RETURNS chunkq.job_chunks
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_lease interval := chunkq._lease(p_lease);
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    UPDATE chunkq.job_chunks c
       SET lease_expires_at = now() + v_lease,
           heartbeat_at = now(),
           task_id = coalesce(p_task_id, c.task_id)
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'heartbeat', p_lease_token);
    END IF;
    RETURN v_chunk;
END $$;
COMMENT ON FUNCTION chunkq.heartbeat_chunk(bigint, integer, interval, text, uuid) IS
    'Extends the lease of a chunk the caller holds (p_attempt and p_lease_token from its claim) to now + '
    'p_lease. Raises CQ006 if the lease was lost or the token is not the claim''s, CQ007 if the job was '
    'cancelled. chunkq_app may pass NULLs (operator use).';

DROP FUNCTION chunkq.heartbeat_chunks(bigint[], integer[], interval);
CREATE FUNCTION chunkq.heartbeat_chunks(
    p_chunk_ids bigint[],
    p_attempts integer[],
    p_lease interval DEFAULT NULL,
    p_lease_tokens uuid[] DEFAULT NULL
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
    'Extends the leases of several chunks at once (parallel arrays of chunk ids and the attempts and lease '
    'tokens the caller''s claims returned). Never raises for a lost chunk: it answers held = false for it, so '
    'one lost chunk does not stop the heartbeat of the others.';

DROP FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean, integer);
CREATE FUNCTION chunkq.fail_chunk(
    p_chunk_id bigint,
    p_attempt integer,
    p_error text,
    p_retry boolean DEFAULT false,
    p_max_retries integer DEFAULT NULL,
    p_lease_token uuid DEFAULT NULL
) RETURNS chunkq.chunk_outcome
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_error text := chunkq._clip_error(p_error);
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
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
       AND (c.lease_token = p_lease_token OR v_waived)
       FOR UPDATE OF c;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'fail', p_lease_token);
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
COMMENT ON FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean, integer, uuid) IS
    'Records an error for a processing chunk (p_attempt and p_lease_token as for complete_chunk). With p_retry '
    'true and retries left (retry_count < p_max_retries, default the job''s max_retries) the chunk goes back to '
    'pending after a backoff (see _retry_delay) with retry_count + 1; otherwise it is failed. Every error is '
    'kept in chunk_errors.';

DROP FUNCTION chunkq.release_chunk(bigint, integer);
CREATE FUNCTION chunkq.release_chunk(p_chunk_id bigint, p_attempt integer, p_lease_token uuid DEFAULT NULL)
RETURNS chunkq.job_chunks
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_chunk chunkq.job_chunks;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    UPDATE chunkq.job_chunks c
       SET status = 'pending', lease_expires_at = NULL, available_at = now()
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'release', p_lease_token);
    END IF;
    PERFORM chunkq._apply_chunk_moves(
        ARRAY[(v_chunk.job_id, v_chunk.chunk_index, 'processing', 'pending')::chunkq._chunk_move]);
    PERFORM chunkq._notify_claimable(v_chunk.job_id, 1);
    RETURN v_chunk;
END $$;
COMMENT ON FUNCTION chunkq.release_chunk(bigint, integer, uuid) IS
    'Hands a processing chunk the caller holds (p_attempt and p_lease_token from its claim) back to pending at '
    'once, without counting a retry: for a worker shutting down before it could finish. The next claim gets '
    'attempt + 1 and a new token, so the releasing worker can never report on the chunk again. Raises like '
    'complete_chunk.';

-- 0007's statement, with the completed chunks matched on their lease tokens too.
DROP FUNCTION chunkq._complete_and_claim(bigint[], integer[], text, integer, bigint, interval);
CREATE FUNCTION chunkq._complete_and_claim(
    p_chunk_ids bigint[],
    p_attempts integer[],
    p_worker_id text,
    p_limit integer,
    p_job_id bigint,
    p_lease interval,
    p_lease_tokens uuid[] DEFAULT NULL
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
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
    'leases, completes the listed chunks held at their attempts and lease tokens, leases up to p_limit '
    'claimable chunks (0: none) and books every move; raises the error of the first listed chunk that is no '
    'longer held.';
REVOKE ALL ON FUNCTION chunkq._complete_and_claim(bigint[], integer[], text, integer, bigint, interval, uuid[])
    FROM PUBLIC;

DROP FUNCTION chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval);
CREATE FUNCTION chunkq.complete_and_claim(
    p_chunk_ids bigint[],
    p_attempts integer[],
    p_worker_id text DEFAULT NULL,
    p_limit integer DEFAULT 1,
    p_job_id bigint DEFAULT NULL,
    p_lease interval DEFAULT NULL,
    p_lease_tokens uuid[] DEFAULT NULL
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'claim limit must be between 0 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_chunk_ids IS NULL OR p_attempts IS NULL
       OR coalesce(cardinality(p_chunk_ids), 0) <> coalesce(cardinality(p_attempts), 0)
       OR coalesce(cardinality(p_lease_tokens), cardinality(p_chunk_ids), 0) <> coalesce(cardinality(p_chunk_ids), 0)
    THEN
        RAISE EXCEPTION 'chunk ids, attempts and lease tokens must be arrays of the same length'
            USING ERRCODE = 'CQ001';
    END IF;
    IF array_position(p_chunk_ids, NULL) IS NOT NULL OR array_position(p_attempts, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'every completed chunk needs its id and the attempt its claim returned'
            USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT * FROM chunkq._complete_and_claim(p_chunk_ids, p_attempts, p_worker_id, p_limit,
                                                          p_job_id, p_lease, p_lease_tokens);
END $$;
COMMENT ON FUNCTION chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval, uuid[]) IS
    'The worker''s fast path: completes the chunks it holds (ids with the attempts and lease tokens their claims '
    'returned) and claims up to p_limit more (0: none), as claim_chunks does, in one transaction. All or '
    'nothing: a chunk no longer held raises its error (CQ006 lease lost, CQ007 cancelled, CQ004 not processing) '
    'and nothing changes. Example: SELECT * FROM chunkq.complete_and_claim(''{17,18}'', ''{1,1}'', '
    '''crawler-1:4242'', 2, p_lease_tokens => ''{…,…}'');';

-- Readers see every column but the token: it is only its claimer's.
-- jsonb_populate_record(c, ...) is c with lease_token replaced by NULL.
-- (CREATE OR REPLACE resets SECURITY DEFINER and the search_path: they are restated.)
CREATE OR REPLACE FUNCTION chunkq.get_chunk(p_chunk_id bigint) RETURNS SETOF chunkq.job_chunks
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT r.* FROM chunkq.job_chunks c, jsonb_populate_record(c, '{"lease_token": null}') r
     WHERE c.id = p_chunk_id;
$$;

CREATE OR REPLACE FUNCTION chunkq.list_chunks(
    p_job_id bigint,
    p_status chunkq.chunk_status DEFAULT NULL,
    p_limit integer DEFAULT NULL
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF p_limit < 1 THEN
        RAISE EXCEPTION 'limit must be positive, got %', p_limit USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT r.* FROM chunkq.job_chunks c, jsonb_populate_record(c, '{"lease_token": null}') r
                  WHERE c.job_id = p_job_id AND (p_status IS NULL OR c.status = p_status)
                  ORDER BY c.chunk_index
                  LIMIT p_limit;
END $$;

CREATE OR REPLACE FUNCTION chunkq.failed_chunks(p_job_id bigint) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    RETURN QUERY SELECT r.* FROM chunkq.job_chunks c, jsonb_populate_record(c, '{"lease_token": null}') r
                  WHERE c.job_id = p_job_id AND c.status = 'failed'
                  ORDER BY c.chunk_index;
END $$;

-- What CREATE FUNCTION above does not carry over from the functions it replaced.
REVOKE ALL ON FUNCTION
    chunkq.complete_chunk(bigint, integer, uuid),
    chunkq.heartbeat_chunk(bigint, integer, interval, text, uuid),
    chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[]),
    chunkq.fail_chunk(bigint, integer, text, boolean, integer, uuid),
    chunkq.release_chunk(bigint, integer, uuid),
    chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval, uuid[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    chunkq.complete_chunk(bigint, integer, uuid),
    chunkq.heartbeat_chunk(bigint, integer, interval, text, uuid),
    chunkq.heartbeat_chunks(bigint[], integer[], interval, uuid[]),
    chunkq.fail_chunk(bigint, integer, text, boolean, integer, uuid),
    chunkq.release_chunk(bigint, integer, uuid),
    chunkq.complete_and_claim(bigint[], integer[], text, integer, bigint, interval, uuid[])
    TO chunkq_worker;

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 8';
