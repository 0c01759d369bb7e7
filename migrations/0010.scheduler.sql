-- chunkq 0010: a crawler's scheduler, in the claim.
-- 1. Fair share. Every chunk carries a virtual position, vpos = the job's start
--    + chunk_index / weight, and claims take the lowest (priority first, strictly).
--    A job starts at the front of the queue of its priority as it stands when it is
--    chunked, so jobs that have work take turns, a job of weight 2 twice as often,
--    with nothing shared to update per claim (start-time fair queuing with the tags
--    computed once, at create_chunks). Resuming a job or changing its priority or
--    weight places its pending chunks at the front again.
-- 2. Limits. A job may cap its running chunks (max_running) and name a rate_key (a
--    site, an API, a tenant); chunkq.rate_limits gives a key a token bucket (rate,
--    burst) and a cap on running chunks across all its jobs. Chunks of limited jobs
--    (limited = true) are claimed apart: one claimer at a time per job and per key
--    (transaction advisory locks, taken with try-lock so claims never wait), which
--    counts what is running and takes what the limits allow. Unlimited chunks are
--    claimed exactly as before, from one index that holds no limited chunk: a key
--    or job without limits costs nothing.
-- 3. defer_chunk: a handler's "retry after N seconds" (HTTP 429/503) puts the chunk
--    back without spending a retry, and may block its key for as long.
-- 4. A failure budget per job (max_failed_ratio, max_failed_chunks,
--    max_consecutive_failures): past it the job pauses itself, says why and sends
--    NOTIFY chunkq_job_paused; resume_job clears it.
-- 5. job_overview says what holds a job back (held_back); the view rate_limit_state
--    shows each key's bucket, running chunks and what blocks it.
-- depends: 0009.operator-safety

-- ---------------------------------------------------------------------------
-- Columns
-- ---------------------------------------------------------------------------

ALTER TABLE chunkq.crawl_jobs
    ADD COLUMN weight real NOT NULL DEFAULT 1,
    ADD COLUMN max_running integer,
    ADD COLUMN rate_key text,
    ADD COLUMN max_failed_ratio real,
    ADD COLUMN max_failed_chunks integer,
    ADD COLUMN max_consecutive_failures integer,
    ADD COLUMN limited boolean NOT NULL DEFAULT false,
    ADD COLUMN paused_reason text,
    ADD COLUMN budget_reset_at timestamptz,
    ADD CONSTRAINT crawl_jobs_weight_in_range CHECK (weight > 0 AND weight <= 1000),
    ADD CONSTRAINT crawl_jobs_max_running_positive CHECK (max_running >= 1),
    ADD CONSTRAINT crawl_jobs_rate_key_valid CHECK (btrim(rate_key) <> '' AND length(rate_key) <= 200),
    ADD CONSTRAINT crawl_jobs_max_failed_ratio_in_range CHECK (max_failed_ratio > 0 AND max_failed_ratio <= 1),
    ADD CONSTRAINT crawl_jobs_max_failed_chunks_positive CHECK (max_failed_chunks >= 1),
    ADD CONSTRAINT crawl_jobs_max_consecutive_failures_positive CHECK (max_consecutive_failures >= 1),
    ADD CONSTRAINT crawl_jobs_paused_reason_only_when_paused CHECK (paused_reason IS NULL OR paused_at IS NOT NULL);
COMMENT ON COLUMN chunkq.crawl_jobs.weight IS
    'Share of claims among the jobs of its priority that have work: a job of weight 2 gets twice the claims of a '
    'job of weight 1.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_running IS 'At most this many of the job''s chunks are processing at once; NULL: no cap.';
COMMENT ON COLUMN chunkq.crawl_jobs.rate_key IS
    'The site, API or tenant the job''s chunks hit; the limits of chunkq.rate_limits for this key hold across every '
    'job that names it.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_failed_ratio IS
    'Failure budget: once more than this share of the job''s chunks failed for good, the job pauses itself.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_failed_chunks IS
    'Failure budget: once more than this many of the job''s chunks failed for good, the job pauses itself.';
COMMENT ON COLUMN chunkq.crawl_jobs.max_consecutive_failures IS
    'Failure budget: once this many attempts failed in a row with no chunk completed in between, the job pauses '
    'itself (a dead site).';
COMMENT ON COLUMN chunkq.crawl_jobs.limited IS
    'Internal: the job has a cap or a rate_key with limits, so its chunks are claimed through the limited path.';
COMMENT ON COLUMN chunkq.crawl_jobs.paused_reason IS
    'Why the job is paused: by an operator, or its failure budget (what tripped it).';
COMMENT ON COLUMN chunkq.crawl_jobs.budget_reset_at IS
    'When the job was last resumed: consecutive failures count from here (or the last completion, if later).';

ALTER TABLE chunkq.job_chunks
    ADD COLUMN vpos double precision NOT NULL DEFAULT 0,
    ADD COLUMN limited boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN chunkq.job_chunks.vpos IS
    'Virtual position for fair share: the job''s start + chunk_index / weight. Claims take the lowest within a '
    'priority, so jobs with work take turns.';
COMMENT ON COLUMN chunkq.job_chunks.limited IS
    'Internal: the chunk''s job is limited (a cap or a limited rate_key): it is claimed apart, under the limits.';

-- Until now claims went by id: the same order, as positions.
UPDATE chunkq.job_chunks SET vpos = id WHERE status IN ('pending', 'processing', 'failed');

ALTER TABLE chunkq.job_chunk_counts ADD COLUMN last_completed_at timestamptz;
COMMENT ON COLUMN chunkq.job_chunk_counts.last_completed_at IS
    'When the last chunk this row counts was completed (for the failure budget''s failures in a row).';

ALTER TABLE chunkq.chunk_errors ADD COLUMN deferred boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN chunkq.chunk_errors.deferred IS
    'True when the attempt was put back on purpose (defer_chunk: "retry after", e.g. HTTP 429), which spends no '
    'retry and is no failure.';

-- The claim order: priority, then virtual position. Limited chunks have an index
-- of their own, so the claim of unlimited chunks never steps over them.
DROP INDEX chunkq.job_chunks_claim_order;
CREATE INDEX job_chunks_claim_order ON chunkq.job_chunks (priority DESC, vpos, id)
    WHERE status = 'pending' AND available_at < 'infinity' AND NOT limited;
COMMENT ON INDEX chunkq.job_chunks_claim_order IS
    'Claim order over claimable chunks of unlimited jobs: priority, then fair-share position.';
CREATE INDEX job_chunks_claim_order_limited ON chunkq.job_chunks (priority DESC, vpos)
    WHERE status = 'pending' AND available_at < 'infinity' AND limited;
COMMENT ON INDEX chunkq.job_chunks_claim_order_limited IS
    'The front of each priority among claimable chunks of limited jobs (they are claimed job by job).';

CREATE INDEX crawl_jobs_limited ON chunkq.crawl_jobs (priority DESC, id)
    WHERE limited AND finished_at IS NULL AND paused_at IS NULL;
COMMENT ON INDEX chunkq.crawl_jobs_limited IS 'The limited jobs a claim may take chunks of.';
CREATE INDEX crawl_jobs_by_rate_key ON chunkq.crawl_jobs (rate_key) WHERE rate_key IS NOT NULL AND finished_at IS NULL;
COMMENT ON INDEX chunkq.crawl_jobs_by_rate_key IS 'The unfinished jobs of a rate key.';

-- ---------------------------------------------------------------------------
-- Rate limits by key
-- ---------------------------------------------------------------------------

CREATE TABLE chunkq.rate_limits (
    key text PRIMARY KEY,
    rate double precision,
    burst integer,
    max_running integer,
    tokens double precision NOT NULL,
    refilled_at timestamptz NOT NULL DEFAULT now(),
    blocked_until timestamptz,
    blocked_reason text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rate_limits_key_valid CHECK (btrim(key) <> '' AND length(key) <= 200),
    CONSTRAINT rate_limits_rate_positive CHECK (rate > 0 AND rate <= 1000000),
    CONSTRAINT rate_limits_burst_positive CHECK (burst >= 1 AND burst <= 1000000),
    CONSTRAINT rate_limits_burst_needs_rate CHECK (burst IS NULL OR rate IS NOT NULL),
    CONSTRAINT rate_limits_max_running_positive CHECK (max_running >= 1)
);
COMMENT ON TABLE chunkq.rate_limits IS
    'Limits of a rate key, across every job that names it: a token bucket (at most rate chunks per second, in bursts '
    'of at most burst) and a cap on running chunks. Change them with set_rate_limit / delete_rate_limit.';
COMMENT ON COLUMN chunkq.rate_limits.key IS 'The key jobs name in crawl_jobs.rate_key.';
COMMENT ON COLUMN chunkq.rate_limits.rate IS 'Chunks claimed per second at most, on average; NULL: no rate limit.';
COMMENT ON COLUMN chunkq.rate_limits.burst IS 'Chunks that may be claimed at once after a quiet spell (bucket size).';
COMMENT ON COLUMN chunkq.rate_limits.max_running IS 'Chunks of the key processing at once at most; NULL: no cap.';
COMMENT ON COLUMN chunkq.rate_limits.tokens IS 'Tokens in the bucket at refilled_at (claims take one per chunk).';
COMMENT ON COLUMN chunkq.rate_limits.refilled_at IS 'When tokens was last brought up to date.';
COMMENT ON COLUMN chunkq.rate_limits.blocked_until IS 'No chunk of the key is claimed before this (a handler''s "retry after").';
COMMENT ON COLUMN chunkq.rate_limits.blocked_reason IS 'Why the key is blocked, as the handler said.';
COMMENT ON COLUMN chunkq.rate_limits.updated_at IS 'When the limits were last set.';

-- ---------------------------------------------------------------------------
-- Helpers
-- ---------------------------------------------------------------------------

-- The front of a priority's queue: where a job starts (or restarts) so as to take
-- turns with the jobs already there instead of going before or after them all.
CREATE FUNCTION chunkq._queue_front(p_priority integer) RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT coalesce(least(
        (SELECT c.vpos FROM chunkq.job_chunks c
          WHERE c.status = 'pending' AND c.available_at < 'infinity' AND NOT c.limited AND c.priority = p_priority
          ORDER BY c.priority DESC, c.vpos LIMIT 1),
        (SELECT c.vpos FROM chunkq.job_chunks c
          WHERE c.status = 'pending' AND c.available_at < 'infinity' AND c.limited AND c.priority = p_priority
          ORDER BY c.priority DESC, c.vpos LIMIT 1)), 0);
$$;
COMMENT ON FUNCTION chunkq._queue_front(integer) IS
    'Internal: the lowest virtual position among claimable chunks of a priority (0 when there are none).';
REVOKE ALL ON FUNCTION chunkq._queue_front(integer) FROM PUBLIC;

-- Places a job's pending chunks at the front of their priority's queue, in order,
-- spaced by 1 / weight. For resume, a priority change and a weight change.
CREATE FUNCTION chunkq._requeue_job(p_job_id bigint, p_weight real) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_priority integer;
    v_front double precision;
    v_first integer;
BEGIN
    SELECT c.priority, min(c.chunk_index) INTO v_priority, v_first
      FROM chunkq.job_chunks c WHERE c.job_id = p_job_id AND c.status = 'pending'
     GROUP BY c.priority ORDER BY c.priority DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- The front without this job's own chunks, which are about to move.
    v_front := coalesce((SELECT min(c.vpos) FROM chunkq.job_chunks c
                          WHERE c.status = 'pending' AND c.available_at < 'infinity' AND c.priority = v_priority
                            AND c.job_id <> p_job_id), chunkq._queue_front(v_priority));
    UPDATE chunkq.job_chunks c SET vpos = v_front + (c.chunk_index - v_first) / p_weight
     WHERE c.job_id = p_job_id AND c.status = 'pending';
END $$;
COMMENT ON FUNCTION chunkq._requeue_job(bigint, real) IS
    'Internal: gives a job''s pending chunks new virtual positions from the front of their priority''s queue, '
    'spaced by 1 / p_weight.';
REVOKE ALL ON FUNCTION chunkq._requeue_job(bigint, real) FROM PUBLIC;

-- Moves a job's chunks to the limited path or back: its open chunks first, then
-- its row (the lock order every function keeps). A job is limited when it has a
-- cap or a rate_key with limits; the callers know which.
CREATE FUNCTION chunkq._set_limited(p_job_id bigint, p_limited boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE chunkq.job_chunks c SET limited = p_limited
     WHERE c.job_id = p_job_id AND c.status IN ('pending', 'processing', 'failed') AND c.limited <> p_limited;
    UPDATE chunkq.crawl_jobs j SET limited = p_limited WHERE j.id = p_job_id AND j.limited <> p_limited;
END $$;
COMMENT ON FUNCTION chunkq._set_limited(bigint, boolean) IS
    'Internal: marks a job and its open chunks limited (claimed under limits, apart) or not.';
REVOKE ALL ON FUNCTION chunkq._set_limited(bigint, boolean) FROM PUBLIC;

-- How many chunks of each limited job this claim may take, under their limits,
-- for a claim of p_limit chunks (of p_job_id only, when given). Each job and each
-- key is claimed by one claimer at a time: a try-lock that fails gives nothing
-- (another claimer is taking that job's or key's chunks right now), so claims
-- never wait. The running chunks are counted in statements that start after the
-- locks are held, so they include every claim committed before: a cap can never
-- be exceeded. The bucket is refilled here; the caller takes the tokens.
CREATE FUNCTION chunkq._claim_allowances(p_limit integer, p_job_id bigint)
RETURNS TABLE (job_id bigint, allowance integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_job record;
    v_key chunkq.rate_limits;
    v_allow integer;
    v_running integer;
    v_key_left jsonb := '{}';  -- what the keys seen so far still allow: {"key": n}
BEGIN
    FOR v_job IN
        SELECT j.id, j.max_running, j.rate_key FROM chunkq.crawl_jobs j
         WHERE j.limited AND j.finished_at IS NULL AND j.paused_at IS NULL
           AND (p_job_id IS NULL OR j.id = p_job_id)
         ORDER BY j.priority DESC, j.id
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext('chunkq.claim'), (v_job.id & 2147483647)::integer);
        v_allow := p_limit;
        IF v_job.max_running IS NOT NULL THEN
            SELECT coalesce(sum(k.processing), 0) INTO v_running FROM chunkq.job_chunk_counts k WHERE k.job_id = v_job.id;
            v_allow := least(v_allow, v_job.max_running - v_running);
        END IF;
        IF v_job.rate_key IS NOT NULL AND v_allow > 0 THEN
            IF NOT v_key_left ? v_job.rate_key THEN
                IF NOT pg_try_advisory_xact_lock(hashtext('chunkq.rate_key'), hashtext(v_job.rate_key)) THEN
                    v_key_left := v_key_left || jsonb_build_object(v_job.rate_key, 0);
                ELSE
                    SELECT * INTO v_key FROM chunkq.rate_limits r WHERE r.key = v_job.rate_key;
                    IF NOT FOUND THEN
                        v_key_left := v_key_left || jsonb_build_object(v_job.rate_key, p_limit);
                    ELSIF v_key.blocked_until > clock_timestamp() THEN
                        v_key_left := v_key_left || jsonb_build_object(v_job.rate_key, 0);
                    ELSE
                        v_running := p_limit;
                        IF v_key.max_running IS NOT NULL THEN
                            SELECT v_key.max_running - coalesce(sum(k.processing), 0) INTO v_running
                              FROM chunkq.crawl_jobs j JOIN chunkq.job_chunk_counts k ON k.job_id = j.id
                             WHERE j.rate_key = v_job.rate_key AND j.finished_at IS NULL;
                        END IF;
                        IF v_key.rate IS NOT NULL THEN
                            v_running := least(v_running, floor(least(
                                v_key.burst,
                                v_key.tokens + v_key.rate * extract(epoch FROM clock_timestamp() - v_key.refilled_at)
                            ))::integer);
                        END IF;
                        v_key_left := v_key_left || jsonb_build_object(v_job.rate_key, greatest(v_running, 0));
                    END IF;
                END IF;
            END IF;
            v_allow := least(v_allow, (v_key_left ->> v_job.rate_key)::integer);
        END IF;
        CONTINUE WHEN v_allow <= 0;
        job_id := v_job.id;
        allowance := v_allow;
        RETURN NEXT;
        IF v_job.rate_key IS NOT NULL THEN  -- what this job may take, the next job of the key may not
            v_key_left := v_key_left
                || jsonb_build_object(v_job.rate_key, (v_key_left ->> v_job.rate_key)::integer - v_allow);
        END IF;
    END LOOP;
END $$;
COMMENT ON FUNCTION chunkq._claim_allowances(integer, bigint) IS
    'Internal: for a claim of p_limit chunks, how many chunks of each limited job it may take under the job''s cap '
    'and its key''s bucket, cap and block, holding (try-locked) the job and key so no other claim counts them at '
    'the same time.';
REVOKE ALL ON FUNCTION chunkq._claim_allowances(integer, bigint) FROM PUBLIC;

-- Takes the tokens the claimed chunks of rate-limited keys used.
CREATE FUNCTION chunkq._spend_tokens(p_taken chunkq.job_chunks[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE chunkq.rate_limits r
       SET tokens = least(r.burst, r.tokens + r.rate * extract(epoch FROM clock_timestamp() - r.refilled_at)) - t.n,
           refilled_at = clock_timestamp()
      FROM (SELECT j.rate_key, count(*) AS n
              FROM unnest(p_taken) c JOIN chunkq.crawl_jobs j ON j.id = c.job_id
             WHERE c.limited AND j.rate_key IS NOT NULL
             GROUP BY j.rate_key) t
     WHERE r.key = t.rate_key AND r.rate IS NOT NULL;
$$;
COMMENT ON FUNCTION chunkq._spend_tokens(chunkq.job_chunks[]) IS
    'Internal: takes one token per claimed chunk from the buckets of the rate keys of their jobs.';
REVOKE ALL ON FUNCTION chunkq._spend_tokens(chunkq.job_chunks[]) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- The claim
-- ---------------------------------------------------------------------------

-- 0008's statement with the fair order and the limited chunks. Unlimited chunks
-- come from job_chunks_claim_order as before (now by vpos); limited ones, when any
-- limited job is open, from each such job's own index, as many as its allowance;
-- the best p_limit of both by (priority, vpos) are taken. Candidates not taken stay
-- pending (their row locks end with the transaction).
CREATE OR REPLACE FUNCTION chunkq._complete_and_claim(
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
    v_limited_jobs bigint[] := '{}';
    v_job_limited boolean := false;
    v_allowances integer[] := '{}';
    v_done bigint[];
    v_taken chunkq.job_chunks[];
    v_moves chunkq._chunk_move[];
    v_refused record;
BEGIN
    -- Abandoned chunks first, so that they can be claimed again right away.
    IF (SELECT min(c.lease_expires_at) FROM chunkq.job_chunks c) < now() THEN
        v_reclaimed := ARRAY(SELECT m FROM chunkq._reclaim_expired(100) m);
    END IF;
    -- Limited jobs, if any is open (one probe of a small partial index otherwise).
    IF p_job_id IS NOT NULL THEN
        v_job_limited := coalesce((SELECT j.limited FROM chunkq.crawl_jobs j WHERE j.id = p_job_id), false);
    END IF;
    IF p_limit > 0 AND (v_job_limited  -- (a --job claim needs no other probe)
                        OR p_job_id IS NULL AND EXISTS (SELECT 1 FROM chunkq.crawl_jobs j
                                                         WHERE j.limited AND j.finished_at IS NULL
                                                           AND j.paused_at IS NULL)) THEN
        SELECT coalesce(array_agg(a.job_id), '{}'), coalesce(array_agg(a.allowance), '{}')
          INTO v_limited_jobs, v_allowances
          FROM chunkq._claim_allowances(p_limit, p_job_id) a;
    END IF;

    IF cardinality(v_limited_jobs) = 0 THEN
    -- The common claim (no limited job to take from): the statement below without
    -- picked_limited and chosen, which would be empty or change nothing here
    -- (picked and picked_of_job exclude each other, and each takes p_limit at most).
    -- Its generic plan has fewer nodes to start and stop on every call: measurably
    -- less time in this function at one chunk per claim.
    WITH done AS (
        UPDATE chunkq.job_chunks c
           SET status = 'completed', lease_expires_at = NULL, finished_at = now()
         WHERE c.id = ANY (p_chunk_ids) AND c.status = 'processing'
           AND c.attempt = p_attempts[array_position(p_chunk_ids, c.id)]
           AND (c.lease_token = p_lease_tokens[array_position(p_chunk_ids, c.id)] OR v_waived)
        RETURNING c.id, c.job_id, c.chunk_index
    ), picked AS (
        SELECT c.id, c.job_id FROM chunkq.job_chunks c
         WHERE p_job_id IS NULL AND NOT c.limited
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
         ORDER BY c.priority DESC, c.vpos, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), parked AS (
        UPDATE chunkq.job_chunks c SET available_at = 'infinity'
         WHERE c.id = ANY (ARRAY(SELECT p.id FROM picked p JOIN chunkq.crawl_jobs j ON j.id = p.job_id
                                  WHERE j.paused_at IS NOT NULL))
        RETURNING c.id
    ), picked_of_job AS (
        SELECT c.id FROM chunkq.job_chunks c
         WHERE p_job_id IS NOT NULL AND NOT v_job_limited AND c.job_id = p_job_id
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
           AND NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = p_job_id AND j.paused_at IS NOT NULL)
         ORDER BY c.priority DESC, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), taken AS (
        SELECT t AS chunk
          FROM chunkq._take_chunks(ARRAY(SELECT p.id FROM picked p WHERE p.id NOT IN (SELECT k.id FROM parked k)
                                         UNION ALL SELECT p.id FROM picked_of_job p),
                                   p_worker_id, v_lease, NULL) t
    )
    SELECT (SELECT coalesce(array_agg(d.id), '{}') FROM done d),
           (SELECT coalesce(array_agg(t.chunk ORDER BY (t.chunk).priority DESC, (t.chunk).vpos, (t.chunk).id), '{}')
              FROM taken t),
           v_reclaimed
           || ARRAY(SELECT (d.job_id, d.chunk_index, 'processing', 'completed')::chunkq._chunk_move FROM done d)
           || ARRAY(SELECT ((t.chunk).job_id, (t.chunk).chunk_index, 'pending', 'processing')::chunkq._chunk_move
                      FROM taken t)
      INTO v_done, v_taken, v_moves;
    ELSE
    WITH done AS (
        UPDATE chunkq.job_chunks c
           SET status = 'completed', lease_expires_at = NULL, finished_at = now()
         WHERE c.id = ANY (p_chunk_ids) AND c.status = 'processing'
           AND c.attempt = p_attempts[array_position(p_chunk_ids, c.id)]
           AND (c.lease_token = p_lease_tokens[array_position(p_chunk_ids, c.id)] OR v_waived)
        RETURNING c.id, c.job_id, c.chunk_index
    ), picked AS (
        -- By the claim index alone, whatever the statistics say (no join to plan around).
        SELECT c.id, c.job_id, c.priority, c.vpos FROM chunkq.job_chunks c
         WHERE p_job_id IS NULL AND NOT c.limited
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
         ORDER BY c.priority DESC, c.vpos, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), parked AS (
        -- A paused job's pending chunks wait outside the claim indexes (available_at =
        -- infinity); one that came back since (released, retried, reclaimed) is parked
        -- there now, and not taken. (By id from an array, so that no plan, even one made
        -- on an empty table, joins the whole table to find them.)
        UPDATE chunkq.job_chunks c SET available_at = 'infinity'
         WHERE c.id = ANY (ARRAY(SELECT p.id FROM picked p JOIN chunkq.crawl_jobs j ON j.id = p.job_id
                                  WHERE j.paused_at IS NOT NULL))
        RETURNING c.id
    ), picked_of_job AS (
        -- (A limited job's chunks come from picked_limited, under its limits.)
        SELECT c.id, c.priority, c.vpos FROM chunkq.job_chunks c
         WHERE p_job_id IS NOT NULL AND NOT v_job_limited AND c.job_id = p_job_id
           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
           AND NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = p_job_id AND j.paused_at IS NOT NULL)
         ORDER BY c.priority DESC, c.id
         LIMIT p_limit
           FOR UPDATE OF c SKIP LOCKED
    ), picked_limited AS (
        SELECT l.id, l.priority, l.vpos
          FROM unnest(v_limited_jobs, v_allowances) AS a(job_id, allowance),
               LATERAL (SELECT c.id, c.priority, c.vpos FROM chunkq.job_chunks c
                         WHERE c.job_id = a.job_id
                           AND c.status = 'pending' AND c.available_at < 'infinity' AND c.available_at <= now()
                         ORDER BY c.priority DESC, c.id
                         LIMIT a.allowance
                           FOR UPDATE OF c SKIP LOCKED) l
    ), chosen AS (
        SELECT p.id FROM (SELECT p.id, p.priority, p.vpos FROM picked p WHERE p.id NOT IN (SELECT k.id FROM parked k)
                          UNION ALL SELECT * FROM picked_of_job
                          UNION ALL SELECT * FROM picked_limited) p
         ORDER BY p.priority DESC, p.vpos, p.id
         LIMIT p_limit
    ), taken AS (
        SELECT t AS chunk FROM chunkq._take_chunks(ARRAY(SELECT h.id FROM chosen h), p_worker_id, v_lease, NULL) t
    )
    SELECT (SELECT coalesce(array_agg(d.id), '{}') FROM done d),
           (SELECT coalesce(array_agg(t.chunk ORDER BY (t.chunk).priority DESC, (t.chunk).vpos, (t.chunk).id), '{}')
              FROM taken t),
           v_reclaimed
           || ARRAY(SELECT (d.job_id, d.chunk_index, 'processing', 'completed')::chunkq._chunk_move FROM done d)
           || ARRAY(SELECT ((t.chunk).job_id, (t.chunk).chunk_index, 'pending', 'processing')::chunkq._chunk_move
                      FROM taken t)
      INTO v_done, v_taken, v_moves;
    END IF;

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
    IF cardinality(v_limited_jobs) > 0 THEN
        PERFORM chunkq._spend_tokens(v_taken);
    END IF;
    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_taken);
END $$;
COMMENT ON FUNCTION chunkq._complete_and_claim(bigint[], integer[], text, integer, bigint, interval, uuid[]) IS
    'Internal: the work of complete_and_claim and claim_chunks (arguments checked by them): reclaims expired '
    'leases, completes the listed chunks held at their attempts and lease tokens, leases up to p_limit claimable '
    'chunks (0: none) in fair order under the jobs'' and keys'' limits, and books every move; raises the error of '
    'the first listed chunk that is no longer held.';

-- Counters also say when a row's chunks last completed (the failure budget's "in a row").
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
                       ELSE 0 END,
                   last_completed_at = CASE WHEN d.d_completed > 0 THEN now() ELSE k.last_completed_at END
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

-- ---------------------------------------------------------------------------
-- The failure budget
-- ---------------------------------------------------------------------------

-- Checked after a failure is recorded, for jobs that set a budget. A tripped job
-- is paused: its row says so and why (claims stop at once: they skip paused jobs),
-- and its pending chunks leave the claim indexes as for pause_job, except those
-- locked right now by a claim (SKIP LOCKED: this runs after the counters are
-- locked, so it must not wait for chunk rows); a claim that takes one of those is
-- like a chunk that was running when the job paused.
CREATE FUNCTION chunkq._check_failure_budget(p_job_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_job chunkq.crawl_jobs;
    v_failed integer;
    v_in_a_row integer;
    v_reason text;
BEGIN
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF v_job.paused_at IS NOT NULL OR v_job.finished_at IS NOT NULL
       OR (v_job.max_failed_ratio IS NULL AND v_job.max_failed_chunks IS NULL
           AND v_job.max_consecutive_failures IS NULL) THEN
        RETURN;
    END IF;
    SELECT coalesce(sum(k.failed), 0) INTO v_failed FROM chunkq.job_chunk_counts k WHERE k.job_id = p_job_id;
    IF v_job.max_failed_chunks IS NOT NULL AND v_failed > v_job.max_failed_chunks THEN
        v_reason := format('failure budget: %s chunks failed, more than max_failed_chunks %s',
                           v_failed, v_job.max_failed_chunks);
    ELSIF v_job.max_failed_ratio IS NOT NULL AND v_failed > v_job.max_failed_ratio * v_job.total_chunks THEN
        v_reason := format('failure budget: %s of %s chunks failed, more than max_failed_ratio %s',
                           v_failed, v_job.total_chunks, v_job.max_failed_ratio);
    ELSIF v_job.max_consecutive_failures IS NOT NULL THEN
        SELECT count(*) INTO v_in_a_row
          FROM chunkq.chunk_errors e
         WHERE e.job_id = p_job_id AND NOT e.deferred AND NOT e.lease_expired
           AND e.failed_at > greatest((SELECT max(k.last_completed_at) FROM chunkq.job_chunk_counts k
                                        WHERE k.job_id = p_job_id),
                                      v_job.budget_reset_at, '-infinity');
        IF v_in_a_row >= v_job.max_consecutive_failures THEN
            v_reason := format('failure budget: %s attempts failed in a row with none completed', v_in_a_row);
        END IF;
    END IF;
    IF v_reason IS NULL THEN
        RETURN;
    END IF;
    UPDATE chunkq.job_chunks c SET available_at = 'infinity'
     WHERE c.id IN (SELECT p.id FROM chunkq.job_chunks p WHERE p.job_id = p_job_id AND p.status = 'pending'
                       FOR UPDATE SKIP LOCKED);
    UPDATE chunkq.crawl_jobs SET paused_at = now(), paused_reason = v_reason WHERE id = p_job_id;
    PERFORM pg_notify('chunkq_job_paused', json_build_object('job_id', p_job_id, 'reason', v_reason)::text);
END $$;
COMMENT ON FUNCTION chunkq._check_failure_budget(bigint) IS
    'Internal: pauses a job whose failures passed its budget (max_failed_chunks, max_failed_ratio, '
    'max_consecutive_failures), records why in paused_reason and sends NOTIFY chunkq_job_paused with {"job_id": '
    '..., "reason": ...}.';
REVOKE ALL ON FUNCTION chunkq._check_failure_budget(bigint) FROM PUBLIC;

-- 0009's fail_chunk, then the budget.
CREATE OR REPLACE FUNCTION chunkq.fail_chunk(
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
    v_base_delay interval;
    v_retry boolean;
    v_chunk chunkq.job_chunks;
    v_outcome chunkq.chunk_outcome;
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
    v_outcome := chunkq._outcome(v_chunk, 'processing');
    PERFORM chunkq._check_failure_budget(v_chunk.job_id);
    RETURN v_outcome;
END $$;
COMMENT ON FUNCTION chunkq.fail_chunk(bigint, integer, text, boolean, integer, uuid) IS
    'Records an error for a processing chunk (p_attempt and p_lease_token as for complete_chunk). With p_retry true '
    'and retries left (retry_count < p_max_retries, default the job''s max_retries) the chunk goes back to pending '
    'after a backoff (see _retry_delay) with retry_count + 1; otherwise it is failed. Every error is kept in '
    'chunk_errors. A job past its failure budget pauses itself (see _check_failure_budget).';

-- ---------------------------------------------------------------------------
-- Retry after
-- ---------------------------------------------------------------------------

CREATE FUNCTION chunkq.defer_chunk(
    p_chunk_id bigint,
    p_attempt integer,
    p_delay interval,
    p_reason text DEFAULT NULL,
    p_block_key boolean DEFAULT false,
    p_lease_token uuid DEFAULT NULL
) RETURNS chunkq.chunk_outcome
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_waived constant boolean := CASE WHEN p_lease_token IS NULL THEN chunkq._may_override() ELSE false END;
    v_reason text;
    v_chunk chunkq.job_chunks;
    v_key text;
BEGIN
    PERFORM chunkq._check_override(p_attempt);
    IF p_delay IS NULL OR p_delay <= interval '0' OR p_delay > interval '7 days' THEN
        RAISE EXCEPTION 'a retry-after delay must be more than 0 and at most 7 days, got %',
            coalesce(p_delay::text, 'NULL') USING ERRCODE = 'CQ001';
    END IF;
    v_reason := chunkq._clip_error(format('retry after %s: %s', p_delay, coalesce(nullif(p_reason, ''), 'deferred')));
    UPDATE chunkq.job_chunks c
       SET status = 'pending', available_at = now() + p_delay, lease_expires_at = NULL, error_message = v_reason
     WHERE c.id = p_chunk_id AND c.status = 'processing' AND (p_attempt IS NULL OR c.attempt = p_attempt)
       AND (c.lease_token = p_lease_token OR v_waived)
    RETURNING c.* INTO v_chunk;
    IF NOT FOUND THEN
        PERFORM chunkq._refuse_report(p_chunk_id, p_attempt, 'defer', p_lease_token);
    END IF;
    INSERT INTO chunkq.chunk_errors (chunk_id, job_id, attempt, worker_id, error, retried, deferred)
    VALUES (v_chunk.id, v_chunk.job_id, v_chunk.attempt, v_chunk.worker_id, v_reason, true, true);
    IF p_block_key THEN
        SELECT j.rate_key INTO v_key FROM chunkq.crawl_jobs j WHERE j.id = v_chunk.job_id;
        -- Only a key with limits can be blocked (it is the key's row that says so);
        -- chunkq limit set KEY registers one.
        UPDATE chunkq.rate_limits r
           SET blocked_until = greatest(r.blocked_until, now() + p_delay), blocked_reason = v_reason
         WHERE r.key = v_key;
    END IF;
    RETURN chunkq._outcome(v_chunk, 'processing');
END $$;
COMMENT ON FUNCTION chunkq.defer_chunk(bigint, integer, interval, text, boolean, uuid) IS
    'A handler''s "retry after" (HTTP 429 or 503): puts a processing chunk the caller holds back to pending, not '
    'claimable before p_delay has passed, without spending a retry; the reason is kept in chunk_errors (deferred). '
    'With p_block_key, no chunk of the job''s rate key (if it has limits) is claimed before then either.';
REVOKE ALL ON FUNCTION chunkq.defer_chunk(bigint, integer, interval, text, boolean, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.defer_chunk(bigint, integer, interval, text, boolean, uuid) TO chunkq_worker;

-- When something now held back by a limit may be claimed, for an idle worker to
-- wait until then rather than its whole poll interval.
-- What it waits for: a blocked key's block to end; an empty bucket's next token; or,
-- when a limited job below its caps has a claimable chunk (the claim found it taken
-- by another claimer at that moment), nothing: try again at once. A job at its cap
-- waits for a completion, which the completing worker claims after itself.
-- (An interval, not a time: the worker's clock need not agree with the server's.)
-- PL/pgSQL rather than SQL for its plan cache: idle workers call this after every
-- empty claim, and a SQL function with SET is planned again on every call.
CREATE FUNCTION chunkq.claimable_in(p_job_id bigint DEFAULT NULL) RETURNS interval
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (
    WITH jobs AS (
        SELECT j.id, j.rate_key, r.blocked_until, r.rate, r.max_running AS key_max_running,
               least(r.burst, r.tokens + r.rate * extract(epoch FROM clock_timestamp() - r.refilled_at)) AS tokens,
               r.refilled_at, r.tokens AS tokens_then,
               (j.max_running IS NULL OR (SELECT sum(k.processing) FROM chunkq.job_chunk_counts k
                                           WHERE k.job_id = j.id) < j.max_running) AS below_cap,
               EXISTS (SELECT 1 FROM chunkq.job_chunks c
                        WHERE c.job_id = j.id AND c.limited AND c.status = 'pending'
                          AND c.available_at < 'infinity' AND c.available_at <= now()) AS has_work
          FROM chunkq.crawl_jobs j LEFT JOIN chunkq.rate_limits r ON r.key = j.rate_key
         WHERE j.limited AND j.finished_at IS NULL AND j.paused_at IS NULL AND (p_job_id IS NULL OR j.id = p_job_id)
    )
    -- (greatest() skips a NULL: a NULL "when" must stay NULL, not become 0.)
    SELECT CASE WHEN m.at IS NOT NULL THEN greatest(interval '0', m.at - clock_timestamp()) END
      FROM (SELECT min(CASE
               WHEN NOT (has_work AND below_cap) THEN NULL
               WHEN blocked_until > clock_timestamp() THEN blocked_until
               WHEN key_max_running <= (SELECT sum(k.processing) FROM chunkq.crawl_jobs o
                                          JOIN chunkq.job_chunk_counts k ON k.job_id = o.id
                                         WHERE o.rate_key = jobs.rate_key AND o.finished_at IS NULL) THEN NULL
               WHEN tokens < 1 THEN refilled_at + make_interval(secs => (1 - tokens_then) / rate)
               ELSE clock_timestamp() END) AS at
              FROM jobs) m);
END
$$;
COMMENT ON FUNCTION chunkq.claimable_in(bigint) IS
    'How long until a chunk held back by a limit may be claimed (a blocked key, an empty bucket, or 0 when one '
    'may be claimed now); NULL when nothing limited can be claimed before a running chunk finishes. An idle worker '
    'waits that long instead of its whole poll interval.';
REVOKE ALL ON FUNCTION chunkq.claimable_in(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.claimable_in(bigint) TO chunkq_worker, chunkq_reader;

-- ---------------------------------------------------------------------------
-- Setting limits
-- ---------------------------------------------------------------------------

CREATE FUNCTION chunkq.set_rate_limit(
    p_key text,
    p_rate double precision DEFAULT NULL,
    p_burst integer DEFAULT NULL,
    p_max_running integer DEFAULT NULL
) RETURNS chunkq.rate_limits
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit chunkq.rate_limits;
    v_burst integer;
    v_job bigint;
BEGIN
    IF p_key IS NULL OR btrim(p_key) = '' OR length(p_key) > 200 THEN
        RAISE EXCEPTION 'a rate key must be 1 to 200 characters and not blank' USING ERRCODE = 'CQ001';
    END IF;
    IF p_rate IS NOT NULL AND NOT (p_rate > 0 AND p_rate <= 1000000) THEN
        RAISE EXCEPTION 'rate must be more than 0 and at most 1000000 chunks per second, got %', p_rate
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_burst IS NOT NULL AND (p_burst NOT BETWEEN 1 AND 1000000 OR p_rate IS NULL) THEN
        RAISE EXCEPTION 'burst must be between 1 and 1000000 chunks, and needs a rate; got %', p_burst
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_max_running IS NOT NULL AND p_max_running < 1 THEN
        RAISE EXCEPTION 'max_running must be at least 1, got %', p_max_running USING ERRCODE = 'CQ001';
    END IF;
    v_burst := CASE WHEN p_rate IS NULL THEN NULL ELSE coalesce(p_burst, greatest(1, ceil(p_rate)::integer)) END;
    -- The key's jobs' chunks first, then the key's row: a claim locks them in that order.
    FOR v_job IN SELECT j.id FROM chunkq.crawl_jobs j WHERE j.rate_key = p_key AND j.finished_at IS NULL ORDER BY j.id
    LOOP
        PERFORM chunkq._set_limited(v_job, true);
    END LOOP;
    INSERT INTO chunkq.rate_limits AS r (key, rate, burst, max_running, tokens)
    VALUES (p_key, p_rate, v_burst, p_max_running, coalesce(v_burst, 0))
    ON CONFLICT (key) DO UPDATE
       SET rate = excluded.rate, burst = excluded.burst, max_running = excluded.max_running,
           tokens = least(coalesce(excluded.burst, 0), r.tokens), refilled_at = now(), updated_at = now()
    RETURNING * INTO v_limit;
    PERFORM chunkq._notify_claimable(NULL, 1);
    RETURN v_limit;
END $$;
COMMENT ON FUNCTION chunkq.set_rate_limit(text, double precision, integer, integer) IS
    'Sets the limits of a rate key across all its jobs: p_rate chunks per second (token bucket, bursts of p_burst, '
    'default the rate rounded up), p_max_running chunks processing at once; NULL: no such limit. Example: SELECT * '
    'FROM chunkq.set_rate_limit(''images.example.com'', 5, 10, 8);';
REVOKE ALL ON FUNCTION chunkq.set_rate_limit(text, double precision, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.set_rate_limit(text, double precision, integer, integer) TO chunkq_app;

CREATE FUNCTION chunkq.delete_rate_limit(p_key text) RETURNS chunkq.rate_limits
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit chunkq.rate_limits;
    v_job bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.rate_limits WHERE key = p_key) THEN
        RAISE EXCEPTION 'rate key % has no limits', coalesce(p_key, 'NULL') USING ERRCODE = 'CQ008';
    END IF;
    -- Chunks first, then the key's row (see set_rate_limit).
    FOR v_job IN SELECT j.id FROM chunkq.crawl_jobs j WHERE j.rate_key = p_key AND j.finished_at IS NULL ORDER BY j.id
    LOOP
        PERFORM chunkq._set_limited(v_job, (SELECT j.max_running IS NOT NULL FROM chunkq.crawl_jobs j WHERE j.id = v_job));
    END LOOP;
    DELETE FROM chunkq.rate_limits WHERE key = p_key RETURNING * INTO v_limit;
    PERFORM chunkq._notify_claimable(NULL, 1);
    RETURN v_limit;
END $$;
COMMENT ON FUNCTION chunkq.delete_rate_limit(text) IS
    'Removes the limits of a rate key; its jobs are claimed without them from then on. Raises CQ008 for a key '
    'without limits.';
REVOKE ALL ON FUNCTION chunkq.delete_rate_limit(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.delete_rate_limit(text) TO chunkq_app;

INSERT INTO chunkq.error_codes (sqlstate, name, meaning) VALUES
    ('CQ008', 'RateKeyNotFound', 'No limits are set for that rate key.'),
    ('CQ009', 'Throttled', 'The chunk''s job or rate key allows no claim now (its cap, bucket or block); try later.');

-- The seed's claim of one given chunk, under the limits of its job and key.
CREATE OR REPLACE FUNCTION chunkq.claim_chunk(
    p_chunk_id bigint,
    p_worker_id text DEFAULT NULL,
    p_lease interval DEFAULT NULL,
    p_task_id text DEFAULT NULL
) RETURNS chunkq.job_chunks
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
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
    IF v_chunk.limited AND NOT EXISTS (SELECT 1 FROM chunkq._claim_allowances(1, v_chunk.job_id)) THEN
        RAISE EXCEPTION 'cannot claim chunk % now: the limits of job % allow no claim (see chunkq.job_overview)',
            p_chunk_id, v_chunk.job_id
            USING ERRCODE = 'CQ009', HINT = 'Try again later: its cap, its rate key''s bucket or block hold it back.';
    END IF;
    SELECT * INTO v_chunk FROM chunkq._take_chunks(ARRAY[p_chunk_id], p_worker_id, v_lease, p_task_id);
    IF v_chunk.limited THEN
        PERFORM chunkq._spend_tokens(ARRAY[v_chunk]);
    END IF;
    PERFORM chunkq._apply_chunk_moves(
        ARRAY[(v_chunk.job_id, v_chunk.chunk_index, 'pending', 'processing')::chunkq._chunk_move]);
    RETURN v_chunk;
END $$;
COMMENT ON FUNCTION chunkq.claim_chunk(bigint, text, interval, text) IS
    'Claims one given pending chunk (even one waiting out a retry backoff). Raises CQ004 if it is not pending, for '
    'instance because another worker holds it, and CQ009 if the limits of its job or rate key allow no claim now.';

-- A job's limits, changed while it runs. p_limits is a JSON object of the settings
-- to change (others stay): max_running, rate_key, weight, max_failed_ratio,
-- max_failed_chunks, max_consecutive_failures; null removes a limit.
CREATE FUNCTION chunkq.set_job_limits(p_job_id bigint, p_limits jsonb) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_job chunkq.crawl_jobs;
    v_unknown text;
    v_old_weight real;
BEGIN
    IF p_limits IS NULL OR jsonb_typeof(p_limits) <> 'object' THEN
        RAISE EXCEPTION 'limits must be a JSON object' USING ERRCODE = 'CQ001';
    END IF;
    SELECT k INTO v_unknown FROM jsonb_object_keys(p_limits) k
     WHERE k NOT IN ('max_running', 'rate_key', 'weight', 'max_failed_ratio', 'max_failed_chunks',
                     'max_consecutive_failures')
     LIMIT 1;
    IF v_unknown IS NOT NULL THEN
        RAISE EXCEPTION 'unknown job limit %', v_unknown USING ERRCODE = 'CQ001',
            HINT = 'One of max_running, rate_key, weight, max_failed_ratio, max_failed_chunks, max_consecutive_failures.';
    END IF;
    IF p_limits ? 'weight' AND jsonb_typeof(p_limits -> 'weight') = 'null' THEN
        RAISE EXCEPTION 'a job''s weight cannot be removed, only changed' USING ERRCODE = 'CQ001';
    END IF;
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'cannot change the limits of crawl job %: it is %', p_job_id, v_job.status
            USING ERRCODE = 'CQ004';
    END IF;
    v_old_weight := v_job.weight;
    BEGIN
        v_job := jsonb_populate_record(v_job, p_limits);
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'bad job limits %: %', p_limits, SQLERRM USING ERRCODE = 'CQ001';
    END;
    PERFORM chunkq._validate_limits(v_job.max_running, v_job.rate_key, v_job.weight, v_job.max_failed_ratio,
                                    v_job.max_failed_chunks, v_job.max_consecutive_failures);
    -- Chunks first, the job row last (the lock order every function keeps).
    PERFORM chunkq._set_limited(p_job_id, v_job.max_running IS NOT NULL
                                          OR EXISTS (SELECT 1 FROM chunkq.rate_limits r WHERE r.key = v_job.rate_key));
    IF v_job.weight <> v_old_weight THEN
        PERFORM chunkq._requeue_job(p_job_id, v_job.weight);
    END IF;
    UPDATE chunkq.crawl_jobs j
       SET max_running = v_job.max_running, rate_key = v_job.rate_key, weight = v_job.weight,
           max_failed_ratio = v_job.max_failed_ratio, max_failed_chunks = v_job.max_failed_chunks,
           max_consecutive_failures = v_job.max_consecutive_failures
     WHERE j.id = p_job_id;
    PERFORM chunkq._notify_claimable(p_job_id, 1);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.set_job_limits(bigint, jsonb) IS
    'Changes a job''s limits while it runs: a JSON object with any of max_running, rate_key, weight, '
    'max_failed_ratio, max_failed_chunks, max_consecutive_failures (null removes one; others stay). Example: '
    'SELECT * FROM chunkq.set_job_limits(42, ''{"max_running": 8, "rate_key": "images.example.com"}'');';
REVOKE ALL ON FUNCTION chunkq.set_job_limits(bigint, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.set_job_limits(bigint, jsonb) TO chunkq_app;

CREATE FUNCTION chunkq._validate_limits(
    p_max_running integer,
    p_rate_key text,
    p_weight double precision,
    p_max_failed_ratio double precision,
    p_max_failed_chunks integer,
    p_max_consecutive_failures integer
) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_max_running < 1 THEN
        RAISE EXCEPTION 'max_running must be at least 1, got %', p_max_running USING ERRCODE = 'CQ001';
    END IF;
    IF btrim(p_rate_key) = '' OR length(p_rate_key) > 200 THEN
        RAISE EXCEPTION 'a rate key must be 1 to 200 characters and not blank' USING ERRCODE = 'CQ001';
    END IF;
    IF NOT (p_weight > 0 AND p_weight <= 1000) THEN
        RAISE EXCEPTION 'weight must be more than 0 and at most 1000, got %', p_weight USING ERRCODE = 'CQ001';
    END IF;
    IF NOT (p_max_failed_ratio > 0 AND p_max_failed_ratio <= 1) THEN
        RAISE EXCEPTION 'max_failed_ratio must be more than 0 and at most 1, got %', p_max_failed_ratio
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_max_failed_chunks < 1 THEN
        RAISE EXCEPTION 'max_failed_chunks must be at least 1, got %', p_max_failed_chunks USING ERRCODE = 'CQ001';
    END IF;
    IF p_max_consecutive_failures < 1 THEN
        RAISE EXCEPTION 'max_consecutive_failures must be at least 1, got %', p_max_consecutive_failures
            USING ERRCODE = 'CQ001';
    END IF;
END $$;
COMMENT ON FUNCTION chunkq._validate_limits(integer, text, double precision, double precision, integer, integer) IS
    'Internal: raises CQ001 for a job limit out of range (NULL is no limit, except for weight).';
REVOKE ALL ON FUNCTION chunkq._validate_limits(integer, text, double precision, double precision, integer, integer) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Jobs: create, chunk, pause, resume, priority
-- ---------------------------------------------------------------------------

DROP FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval);
CREATE FUNCTION chunkq.create_job(
    p_project_id bigint,
    p_name text,
    p_keywords jsonb,
    p_max_images bigint,
    p_priority integer DEFAULT NULL,
    p_max_retries integer DEFAULT NULL,
    p_chunk_size integer DEFAULT NULL,
    p_id bigint DEFAULT NULL,
    p_retry_base_delay interval DEFAULT NULL,
    p_max_running integer DEFAULT NULL,
    p_rate_key text DEFAULT NULL,
    p_weight double precision DEFAULT 1,
    p_max_failed_ratio double precision DEFAULT NULL,
    p_max_failed_chunks integer DEFAULT NULL,
    p_max_consecutive_failures integer DEFAULT NULL
) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    PERFORM chunkq._validate_limits(p_max_running, p_rate_key, coalesce(p_weight, 1), p_max_failed_ratio,
                                    p_max_failed_chunks, p_max_consecutive_failures);
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
                                       retry_base_delay, max_running, rate_key, weight, max_failed_ratio,
                                       max_failed_chunks, max_consecutive_failures, limited)
        OVERRIDING SYSTEM VALUE
        VALUES (coalesce(p_id, nextval(pg_get_serial_sequence('chunkq.crawl_jobs', 'id'))), p_project_id, p_name,
                coalesce(p_keywords, '[]'::jsonb), p_max_images,
                coalesce(p_chunk_size, v_settings.chunk_size),
                coalesce(p_priority, v_settings.default_priority),
                coalesce(p_max_retries, v_settings.default_max_retries),
                p_retry_base_delay, p_max_running, p_rate_key, coalesce(p_weight, 1), p_max_failed_ratio,
                p_max_failed_chunks, p_max_consecutive_failures,
                p_max_running IS NOT NULL OR EXISTS (SELECT 1 FROM chunkq.rate_limits r WHERE r.key = p_rate_key))
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
COMMENT ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval,
                                      integer, text, double precision, double precision, integer, integer) IS
    'Creates a crawl job (no chunks yet; see create_chunks). NULL priority, max_retries, chunk_size and '
    'retry_base_delay take the defaults in chunkq.settings. p_id gives the job an id of your own (e.g. your '
    'application''s job id); ids chunkq hands out afterwards skip past it. The scheduling options: p_max_running '
    '(cap on running chunks), p_rate_key (whose chunkq.rate_limits apply), p_weight (share of claims), and the '
    'failure budget p_max_failed_ratio, p_max_failed_chunks, p_max_consecutive_failures. Raises CQ001 for a blank '
    'name, max_images <= 0, more chunks than settings.max_chunks_per_job, an id in use or a limit out of range.';
REVOKE ALL ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval,
                                         integer, text, double precision, double precision, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chunkq.create_job(bigint, text, jsonb, bigint, integer, integer, integer, bigint, interval,
                                            integer, text, double precision, double precision, integer, integer) TO chunkq_app;

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
    v_front double precision;
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
    -- The job starts at the front of its priority's queue: it takes turns with the
    -- jobs already waiting there (fair share), one of its chunks per 1 / weight.
    v_front := chunkq._queue_front(v_priority);

    INSERT INTO chunkq.job_chunks (job_id, chunk_index, image_start, image_end, priority, vpos, limited)
    SELECT p_job_id, i, i::bigint * v_chunk_size, LEAST((i + 1)::bigint * v_chunk_size, v_job.max_images) - 1, v_priority,
           v_front + i / v_job.weight, v_job.limited
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

CREATE OR REPLACE FUNCTION chunkq.pause_job(p_job_id bigint) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    UPDATE chunkq.crawl_jobs SET paused_at = now(), paused_reason = 'by an operator' WHERE id = p_job_id
    RETURNING * INTO v_job;
    RETURN v_job;
END $$;

CREATE OR REPLACE FUNCTION chunkq.resume_job(p_job_id bigint) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    -- Pending chunks (also any a failure budget's pause could not reach) are claimable
    -- again, from the front of the queue: a resumed job takes turns, it does not go first.
    UPDATE chunkq.job_chunks SET available_at = now()
     WHERE job_id = p_job_id AND status = 'pending' AND available_at = 'infinity';
    GET DIAGNOSTICS v_released = ROW_COUNT;
    PERFORM chunkq._requeue_job(p_job_id, v_job.weight);
    UPDATE chunkq.crawl_jobs SET paused_at = NULL, paused_reason = NULL, budget_reset_at = now() WHERE id = p_job_id
    RETURNING * INTO v_job;
    PERFORM chunkq._notify_claimable(p_job_id, v_released);
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.resume_job(bigint) IS
    'Lets a paused job''s chunks be claimed again (taking turns with the jobs waiting, from the front of the queue), '
    'and clears a tripped failure budget. Resuming a job that is not paused does nothing; a finished or cancelled '
    'job raises CQ004.';

CREATE OR REPLACE FUNCTION chunkq.set_job_priority(p_job_id bigint, p_priority integer) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    -- Its chunks join the new priority's queue at the front, taking turns there.
    PERFORM chunkq._requeue_job(p_job_id, v_job.weight);
    UPDATE chunkq.crawl_jobs SET priority = p_priority WHERE id = p_job_id RETURNING * INTO v_job;
    RETURN v_job;
END $$;

-- ---------------------------------------------------------------------------
-- What holds chunks back
-- ---------------------------------------------------------------------------

CREATE VIEW chunkq.rate_limit_state AS
SELECT r.key,
       r.rate,
       r.burst,
       CASE WHEN r.rate IS NULL THEN NULL
            ELSE least(r.burst, r.tokens + r.rate * extract(epoch FROM clock_timestamp() - r.refilled_at)) END AS tokens,
       r.max_running,
       coalesce(k.running, 0)::integer AS running_chunks,
       coalesce(k.pending, 0)::integer AS pending_chunks,
       coalesce(k.jobs, 0)::integer AS jobs,
       r.blocked_until,
       r.blocked_reason,
       CASE WHEN r.blocked_until > clock_timestamp() THEN 'blocked: ' || r.blocked_reason
            WHEN r.max_running IS NOT NULL AND coalesce(k.running, 0) >= r.max_running
                THEN format('capped: %s of %s running', k.running, r.max_running)
            WHEN r.rate IS NOT NULL AND coalesce(k.pending, 0) > 0
                 AND r.tokens + r.rate * extract(epoch FROM clock_timestamp() - r.refilled_at) < 1
                THEN format('rate-limited: %s chunks/s', r.rate)
       END AS held_back
  FROM chunkq.rate_limits r
  LEFT JOIN LATERAL (SELECT sum(c.processing) AS running, sum(c.pending) AS pending, count(DISTINCT j.id) AS jobs
                       FROM chunkq.crawl_jobs j JOIN chunkq.job_chunk_counts c ON c.job_id = j.id
                      WHERE j.rate_key = r.key AND j.finished_at IS NULL) k ON true;
COMMENT ON VIEW chunkq.rate_limit_state IS
    'Each rate key with limits: its bucket now, its running and pending chunks across its unfinished jobs, and '
    'what holds them back (held_back: blocked, capped or rate-limited; NULL: nothing). Example: SELECT * FROM '
    'chunkq.rate_limit_state WHERE held_back IS NOT NULL;';
COMMENT ON COLUMN chunkq.rate_limit_state.key IS 'The rate key.';
COMMENT ON COLUMN chunkq.rate_limit_state.rate IS 'Chunks per second at most (NULL: no rate limit).';
COMMENT ON COLUMN chunkq.rate_limit_state.burst IS 'Bucket size.';
COMMENT ON COLUMN chunkq.rate_limit_state.tokens IS 'Tokens in the bucket now: chunks that may be claimed at once.';
COMMENT ON COLUMN chunkq.rate_limit_state.max_running IS 'Cap on the key''s running chunks (NULL: none).';
COMMENT ON COLUMN chunkq.rate_limit_state.running_chunks IS 'Chunks of the key processing now.';
COMMENT ON COLUMN chunkq.rate_limit_state.pending_chunks IS 'Chunks of the key waiting.';
COMMENT ON COLUMN chunkq.rate_limit_state.jobs IS 'Unfinished jobs naming the key.';
COMMENT ON COLUMN chunkq.rate_limit_state.blocked_until IS 'No chunk of the key is claimed before this.';
COMMENT ON COLUMN chunkq.rate_limit_state.blocked_reason IS 'Why it is blocked.';
COMMENT ON COLUMN chunkq.rate_limit_state.held_back IS 'What holds the key''s chunks back now, if anything.';

-- The columns of 0004's view, then the new ones (so CREATE OR REPLACE keeps list_jobs, which returns its rows).
CREATE OR REPLACE VIEW chunkq.job_overview AS
SELECT j.id,
       j.project_id,
       j.name,
       j.status,
       j.priority,
       j.total_chunks,
       coalesce(k.pending, 0) AS pending_chunks,
       coalesce(k.processing, 0) AS processing_chunks,
       coalesce(k.completed, 0) AS completed_chunks,
       coalesce(k.failed, 0) AS failed_chunks,
       coalesce(k.cancelled, 0) AS cancelled_chunks,
       CASE WHEN j.total_chunks = 0 THEN 0.0
            ELSE round(100.0 * coalesce(k.completed, 0) / j.total_chunks, 2)::double precision END
           AS completion_percentage,
       j.max_images,
       j.created_at,
       j.started_at,
       j.finished_at,
       j.paused_at,
       chunkq._completed_images(j, coalesce(k.completed, 0)) AS completed_images,
       r.chunks_per_second,
       CASE WHEN j.finished_at IS NULL AND r.chunks_per_second > 0
            THEN (coalesce(k.pending, 0) + coalesce(k.processing, 0)) / r.chunks_per_second * interval '1 second'
       END AS eta,
       j.weight,
       j.max_running,
       j.rate_key,
       j.paused_reason,
       w.retrying AS retrying_chunks,
       CASE WHEN j.finished_at IS NOT NULL OR coalesce(k.pending, 0) = 0 THEN NULL
            WHEN j.paused_at IS NOT NULL THEN 'paused: ' || coalesce(j.paused_reason, 'by an operator')
            WHEN j.max_running IS NOT NULL AND coalesce(k.processing, 0) >= j.max_running
                THEN format('capped: %s of max_running %s', k.processing, j.max_running)
            WHEN l.held_back IS NOT NULL THEN format('rate key %s %s', j.rate_key, l.held_back)
            WHEN w.retrying >= coalesce(k.pending, 0)
                THEN format('waiting to retry: %s chunks, next at %s', w.retrying, w.next_at)
       END AS held_back
  FROM chunkq.crawl_jobs j
  LEFT JOIN LATERAL (SELECT sum(c.pending)::integer AS pending,
                            sum(c.processing)::integer AS processing,
                            sum(c.completed)::integer AS completed,
                            sum(c.failed)::integer AS failed,
                            sum(c.cancelled)::integer AS cancelled,
                            sum(CASE WHEN c.rate_minute = date_trunc('minute', now())
                                         THEN c.completed_this_minute + c.completed_last_minute
                                     WHEN c.rate_minute = date_trunc('minute', now()) - interval '1 minute'
                                         THEN c.completed_this_minute
                                     ELSE 0 END) AS recent
                       FROM chunkq.job_chunk_counts c WHERE c.job_id = j.id) k ON true
  LEFT JOIN LATERAL (SELECT round(coalesce(k.recent, 0)
                                  / greatest(1.0, least(60 + extract(epoch FROM now() - date_trunc('minute', now())),
                                                        extract(epoch FROM now() - j.started_at))), 2)::double precision
                                AS chunks_per_second
                      WHERE j.started_at IS NOT NULL) r ON true
  -- Chunks waiting out a retry back-off (job_chunks_retry_wait: retried chunks only).
  LEFT JOIN LATERAL (SELECT count(*)::integer AS retrying, min(c.available_at) AS next_at
                       FROM chunkq.job_chunks c
                      WHERE c.job_id = j.id AND c.status = 'pending' AND c.retry_count > 0
                        AND c.available_at > now() AND c.available_at < 'infinity'
                        AND j.finished_at IS NULL) w ON true
  LEFT JOIN chunkq.rate_limit_state l ON l.key = j.rate_key AND j.finished_at IS NULL;
COMMENT ON VIEW chunkq.job_overview IS
    'Every job with its chunk counts by status, completion percentage, images done, completion rate over the last '
    'one to two minutes, ETA, its scheduling options, and what holds it back (held_back) when it has chunks waiting '
    'but none is claimable: paused (and why), capped, its rate key, or every pending chunk waiting out a retry. From '
    'job_chunk_counts: cheap per job. Example: SELECT id, held_back FROM chunkq.job_overview WHERE id = 42;';
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
COMMENT ON COLUMN chunkq.job_overview.weight IS 'The job''s share of claims among the jobs of its priority.';
COMMENT ON COLUMN chunkq.job_overview.max_running IS 'Cap on the job''s running chunks (NULL: none).';
COMMENT ON COLUMN chunkq.job_overview.rate_key IS 'The rate key whose limits apply (NULL: none).';
COMMENT ON COLUMN chunkq.job_overview.paused_reason IS 'Why the job is paused, if it is.';
COMMENT ON COLUMN chunkq.job_overview.retrying_chunks IS 'Pending chunks waiting out a retry back-off.';
COMMENT ON COLUMN chunkq.job_overview.held_back IS
    'Why the job''s waiting chunks are not being claimed, if something holds them all back: paused (why), capped, '
    'rate key blocked / capped / rate-limited, waiting to retry. NULL: nothing does.';
GRANT SELECT ON chunkq.job_overview, chunkq.rate_limit_state TO chunkq_reader;

-- queue_depth says what keeps a priority's pending chunks from being claimed: a
-- paused job, a retry back-off or deferral, or the limits of their job or key
-- (limited chunks are claimable only as the limits allow; job_overview.held_back
-- and rate_limit_state say whether they do now). claimable_chunks leaves paused
-- jobs' chunks out now.
CREATE OR REPLACE VIEW chunkq.queue_depth AS
SELECT c.priority,
       count(*) AS pending_chunks,
       count(*) FILTER (WHERE c.available_at <= now() AND j.paused_at IS NULL) AS claimable_chunks,
       now() - min(c.created_at) AS oldest_pending_age,
       count(*) FILTER (WHERE j.paused_at IS NOT NULL) AS paused_chunks,
       count(*) FILTER (WHERE c.available_at > now() AND j.paused_at IS NULL) AS retrying_chunks,
       count(*) FILTER (WHERE c.limited AND c.available_at <= now() AND j.paused_at IS NULL) AS limited_chunks
  FROM chunkq.job_chunks c
  JOIN chunkq.crawl_jobs j ON j.id = c.job_id
 WHERE c.status = 'pending'
 GROUP BY c.priority;
COMMENT ON VIEW chunkq.queue_depth IS
    'Pending chunks by priority: how many, how many may be claimed now, how long the oldest has waited, and what '
    'holds the others back (a paused job, a retry back-off or deferral); limited_chunks are claimable only as their '
    'job''s or key''s limits allow. Reads every pending chunk. Example: SELECT * FROM chunkq.queue_depth;';
COMMENT ON COLUMN chunkq.queue_depth.claimable_chunks IS
    'Of those, how many a claim may take now (limited_chunks among them, as their limits allow).';
COMMENT ON COLUMN chunkq.queue_depth.paused_chunks IS 'Pending chunks of paused jobs.';
COMMENT ON COLUMN chunkq.queue_depth.retrying_chunks IS
    'Pending chunks waiting out a retry back-off or a handler''s retry-after (not of paused jobs).';
COMMENT ON COLUMN chunkq.queue_depth.limited_chunks IS
    'Claimable chunks of jobs with a cap or a limited rate key: taken only as those limits allow '
    '(job_overview.held_back, rate_limit_state).';

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 10';
