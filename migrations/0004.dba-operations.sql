-- chunkq 0004: running the queue from psql. Pause, resume and re-prioritise a job;
-- see every job's rate and ETA, expired leases, who is working, what fails; prune
-- old jobs in bounded batches; storage parameters for the hot tables.
-- depends: 0003.operations

-- ---------------------------------------------------------------------------
-- Pause and resume
-- ---------------------------------------------------------------------------

ALTER TABLE chunkq.crawl_jobs ADD COLUMN paused_at timestamptz;
ALTER TABLE chunkq.crawl_jobs ADD CONSTRAINT crawl_jobs_paused_only_while_open
    CHECK (paused_at IS NULL OR finished_at IS NULL);
COMMENT ON COLUMN chunkq.crawl_jobs.paused_at IS
    'When pause_job paused the job; NULL when it runs. Its pending chunks are not claimed while it is set.';
CREATE INDEX crawl_jobs_finished ON chunkq.crawl_jobs (finished_at) WHERE finished_at IS NOT NULL;
COMMENT ON INDEX chunkq.crawl_jobs_finished IS 'Finished jobs by age, for prune_finished_jobs.';

-- A paused job's pending chunks get available_at = infinity; leaving them out of
-- the claim indexes keeps a paused job, however large, from slowing claims.
DROP INDEX chunkq.job_chunks_claim_order;
CREATE INDEX job_chunks_claim_order ON chunkq.job_chunks (priority DESC, id)
    WHERE status = 'pending' AND available_at < 'infinity';
COMMENT ON INDEX chunkq.job_chunks_claim_order IS
    'Claim order over claimable chunks: priority, then age. Chunks of paused jobs (available_at = infinity) are left out.';
DROP INDEX chunkq.job_chunks_claim_order_by_job;
CREATE INDEX job_chunks_claim_order_by_job ON chunkq.job_chunks (job_id, priority DESC, id)
    WHERE status = 'pending' AND available_at < 'infinity';
COMMENT ON INDEX chunkq.job_chunks_claim_order_by_job IS 'Claim order within one job.';

CREATE FUNCTION chunkq._job_paused(p_job_id bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.id = p_job_id AND j.paused_at IS NOT NULL);
$$;
COMMENT ON FUNCTION chunkq._job_paused(bigint) IS 'Internal: whether the job is paused.';

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


CREATE FUNCTION chunkq.pause_job(p_job_id bigint) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql AS $$
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
    'Stops handing out a job''s chunks; chunks already being processed carry on. Pausing a paused job does '
    'nothing; a finished or cancelled job raises CQ004.';

CREATE FUNCTION chunkq.resume_job(p_job_id bigint) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql AS $$
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
    'Lets a paused job''s chunks be claimed again. Resuming a job that is not paused does nothing; a finished '
    'or cancelled job raises CQ004.';

CREATE FUNCTION chunkq.set_job_priority(p_job_id bigint, p_priority integer) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql AS $$
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
    'Gives a job and its unfinished chunks a new priority (in the settings range). A finished or cancelled '
    'job raises CQ004.';

-- ---------------------------------------------------------------------------
-- Rates: completions per minute, kept in the counter rows each completion updates anyway
-- ---------------------------------------------------------------------------

ALTER TABLE chunkq.job_chunk_counts
    ADD COLUMN rate_minute timestamptz,
    ADD COLUMN completed_this_minute integer NOT NULL DEFAULT 0,
    ADD COLUMN completed_last_minute integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT job_chunk_counts_rates_not_negative
        CHECK (completed_this_minute >= 0 AND completed_last_minute >= 0);
COMMENT ON COLUMN chunkq.job_chunk_counts.rate_minute IS 'The minute of this row''s latest completion.';
COMMENT ON COLUMN chunkq.job_chunk_counts.completed_this_minute IS 'Completions counted here during rate_minute.';
COMMENT ON COLUMN chunkq.job_chunk_counts.completed_last_minute IS 'Completions counted here the minute before rate_minute.';

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


-- ---------------------------------------------------------------------------
-- Views a DBA reaches for
-- ---------------------------------------------------------------------------

CREATE OR REPLACE VIEW chunkq.job_overview AS
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
       j.created_at, j.started_at, j.finished_at,
       j.paused_at,
       chunkq._completed_images(j, coalesce(k.completed, 0)) AS completed_images,
       r.chunks_per_second,
       CASE WHEN j.finished_at IS NULL AND r.chunks_per_second > 0
            THEN (coalesce(k.pending, 0) + coalesce(k.processing, 0)) / r.chunks_per_second * interval '1 second'
       END AS eta
  FROM chunkq.crawl_jobs j
  LEFT JOIN LATERAL (
        SELECT sum(c.pending)::integer AS pending, sum(c.processing)::integer AS processing,
               sum(c.completed)::integer AS completed, sum(c.failed)::integer AS failed,
               sum(c.cancelled)::integer AS cancelled,
               -- completions in the previous minute and this one so far
               sum(CASE WHEN c.rate_minute = date_trunc('minute', now())
                            THEN c.completed_this_minute + c.completed_last_minute
                        WHEN c.rate_minute = date_trunc('minute', now()) - interval '1 minute'
                            THEN c.completed_this_minute
                        ELSE 0 END) AS recent
          FROM chunkq.job_chunk_counts c WHERE c.job_id = j.id) k ON true
  LEFT JOIN LATERAL (
        SELECT round((coalesce(k.recent, 0) / GREATEST(1.0, LEAST(
                   60 + extract(epoch FROM now() - date_trunc('minute', now())),
                   extract(epoch FROM now() - j.started_at))))::numeric, 2)::double precision AS chunks_per_second
         WHERE j.started_at IS NOT NULL) r ON true;
COMMENT ON VIEW chunkq.job_overview IS
    'Every job with its chunk counts by status, completion percentage, images done, completion rate over '
    'the last one to two minutes and ETA (from job_chunk_counts: cheap per job). Example: '
    'SELECT * FROM chunkq.job_overview WHERE status = ''running'';';
COMMENT ON COLUMN chunkq.job_overview.paused_at IS 'When the job was paused, if it is.';
COMMENT ON COLUMN chunkq.job_overview.completed_images IS 'Images in completed chunks.';
COMMENT ON COLUMN chunkq.job_overview.chunks_per_second IS
    'Completions per second over the previous minute and this one so far (NULL before the job starts).';
COMMENT ON COLUMN chunkq.job_overview.eta IS 'Pending and processing chunks at that rate; NULL when nothing moves.';

CREATE VIEW chunkq.expired_leases AS
SELECT c.id AS chunk_id, c.job_id, c.chunk_index, c.worker_id, c.attempt, c.claimed_at, c.heartbeat_at,
       c.lease_expires_at, now() - c.lease_expires_at AS expired_for
  FROM chunkq.job_chunks c
 WHERE c.lease_expires_at < now();
COMMENT ON VIEW chunkq.expired_leases IS
    'Processing chunks whose worker stopped heartbeating and that no claim has taken back yet. They go back '
    'to pending at the next claim (or reclaim_expired_chunks); many here for long means no worker is claiming.';
COMMENT ON COLUMN chunkq.expired_leases.chunk_id IS 'The chunk.';
COMMENT ON COLUMN chunkq.expired_leases.job_id IS 'Its job.';
COMMENT ON COLUMN chunkq.expired_leases.chunk_index IS 'Its position in the job.';
COMMENT ON COLUMN chunkq.expired_leases.worker_id IS 'The worker that held it.';
COMMENT ON COLUMN chunkq.expired_leases.attempt IS 'The attempt that was abandoned.';
COMMENT ON COLUMN chunkq.expired_leases.claimed_at IS 'When that attempt was claimed.';
COMMENT ON COLUMN chunkq.expired_leases.heartbeat_at IS 'Its last heartbeat.';
COMMENT ON COLUMN chunkq.expired_leases.lease_expires_at IS 'When the lease ran out.';
COMMENT ON COLUMN chunkq.expired_leases.expired_for IS 'How long ago.';

CREATE VIEW chunkq.live_workers AS
WITH connected AS (
    SELECT substr(a.application_name, length('chunkq worker ') + 1) AS worker_id, a.pid, a.backend_start
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.application_name LIKE 'chunkq worker %'
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
COMMENT ON VIEW chunkq.live_workers IS
    'Workers: those connected (the pool names its connections "chunkq worker HOST:PID"), and whoever holds '
    'chunks. A row with chunks but no backend_pid is a worker that went away; its chunks come back when '
    'their leases expire.';
COMMENT ON COLUMN chunkq.live_workers.worker_id IS 'HOST:PID of the worker process.';
COMMENT ON COLUMN chunkq.live_workers.backend_pid IS 'Its Postgres backend, if it is connected.';
COMMENT ON COLUMN chunkq.live_workers.connected_since IS 'When it connected.';
COMMENT ON COLUMN chunkq.live_workers.chunks_held IS 'Chunks it is processing.';
COMMENT ON COLUMN chunkq.live_workers.oldest_claim IS 'When it claimed the oldest of them.';
COMMENT ON COLUMN chunkq.live_workers.heartbeat_age IS 'Time since its last heartbeat or claim.';
COMMENT ON COLUMN chunkq.live_workers.next_lease_expiry IS 'The earliest lease it must renew.';

CREATE VIEW chunkq.failure_summary AS
SELECT regexp_replace(CASE WHEN e.lease_expired THEN 'lease expired: the worker stopped heartbeating'
                           ELSE split_part(e.error, E'\n', 1) END, '[0-9]+', '#', 'g') AS error_kind,
       count(*) AS occurrences,
       count(DISTINCT e.chunk_id) AS chunks,
       count(DISTINCT e.job_id) AS jobs,
       count(*) FILTER (WHERE NOT e.retried) AS ended_failed,
       min(e.failed_at) AS first_seen,
       max(e.failed_at) AS last_seen,
       (array_agg(e.chunk_id ORDER BY e.failed_at DESC))[1] AS example_chunk_id,
       (array_agg(e.error ORDER BY e.failed_at DESC))[1] AS example_error
  FROM chunkq.chunk_errors e
 GROUP BY 1;
COMMENT ON VIEW chunkq.failure_summary IS
    'Errors grouped by kind (first line, numbers replaced by #), most frequent first when ordered by '
    'occurrences: how often, on how many chunks and jobs, how many ended a chunk for good, and the latest example.';
COMMENT ON COLUMN chunkq.failure_summary.error_kind IS 'The first line of the error with numbers as #.';
COMMENT ON COLUMN chunkq.failure_summary.occurrences IS 'Errors of this kind.';
COMMENT ON COLUMN chunkq.failure_summary.chunks IS 'Chunks that had one.';
COMMENT ON COLUMN chunkq.failure_summary.jobs IS 'Jobs those chunks belong to.';
COMMENT ON COLUMN chunkq.failure_summary.ended_failed IS 'Errors after which the chunk was failed for good.';
COMMENT ON COLUMN chunkq.failure_summary.first_seen IS 'The first one.';
COMMENT ON COLUMN chunkq.failure_summary.last_seen IS 'The latest one.';
COMMENT ON COLUMN chunkq.failure_summary.example_chunk_id IS 'The chunk of the latest one (see chunk_error_history).';
COMMENT ON COLUMN chunkq.failure_summary.example_error IS 'The latest error in full.';

-- queue_stats learns about vacuum and the xmin horizon: a long transaction anywhere
-- in this database keeps vacuum from removing dead chunk versions, and claims slow
-- down as they step over them.
ALTER TYPE chunkq.queue_stats
    ADD ATTRIBUTE dead_chunk_rows bigint,
    ADD ATTRIBUTE last_autovacuum timestamptz,
    ADD ATTRIBUTE autovacuum_on boolean,
    ADD ATTRIBUTE oldest_transaction_age interval,
    ADD ATTRIBUTE oldest_transaction_pid integer;
COMMENT ON TYPE chunkq.queue_stats IS
    'Health of the whole queue, see queue_stats(). failure_rate = failed / (completed + failed) chunks; '
    'expired_leases counts processing chunks whose worker stopped heartbeating and that no claim has '
    'reclaimed yet (non-zero for long means no worker is claiming); dead_chunk_rows and last_autovacuum '
    'show whether vacuum keeps up; oldest_transaction_age is the oldest open transaction in this database, '
    'which holds every dead row newer than it (alert when it exceeds minutes).';

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
           (SELECT max(d.oldest_pending_age) FROM chunkq.queue_depth d),
           (SELECT s.n_dead_tup FROM pg_stat_user_tables s WHERE s.relid = 'chunkq.job_chunks'::regclass),
           (SELECT greatest(s.last_autovacuum, s.last_vacuum) FROM pg_stat_user_tables s
             WHERE s.relid = 'chunkq.job_chunks'::regclass),
           current_setting('autovacuum')::boolean,
           (SELECT now() - a.xact_start FROM pg_stat_activity a
             WHERE a.datname = current_database() AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
               AND a.pid <> pg_backend_pid()
             ORDER BY a.xact_start LIMIT 1),
           (SELECT a.pid FROM pg_stat_activity a
             WHERE a.datname = current_database() AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
               AND a.pid <> pg_backend_pid()
             ORDER BY a.xact_start LIMIT 1)
      FROM chunkq.job_chunk_counts k;
$$;
COMMENT ON FUNCTION chunkq.queue_stats() IS
    'One row about the whole queue: jobs pending and running, chunks by state (from the counters), expired '
    'leases, failure rate, errors in the last hour, age of the oldest pending chunk, dead chunk rows and the '
    'last vacuum, and the oldest open transaction (the xmin horizon).';

-- ---------------------------------------------------------------------------
-- Retention
-- ---------------------------------------------------------------------------

CREATE TYPE chunkq.prune_result AS (jobs_deleted integer, chunks_deleted integer, done boolean);
COMMENT ON TYPE chunkq.prune_result IS
    'What one prune_finished_jobs call deleted, and done = true when nothing old enough is left.';

CREATE FUNCTION chunkq.prune_finished_jobs(p_older_than interval, p_max_chunks integer DEFAULT 10000)
RETURNS chunkq.prune_result
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff timestamptz;
    v_budget integer := p_max_chunks;
    v_job_id bigint;
    v_deleted integer;
    v_result chunkq.prune_result := (0, 0, false);
BEGIN
    IF p_older_than IS NULL OR p_older_than < '0'::interval THEN
        RAISE EXCEPTION 'older_than must not be negative, got %', coalesce(p_older_than::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_max_chunks IS NULL OR p_max_chunks NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'max_chunks must be between 1 and 1000000, got %', coalesce(p_max_chunks::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    v_cutoff := now() - p_older_than;
    FOR v_job_id IN
        SELECT j.id FROM chunkq.crawl_jobs j WHERE j.finished_at < v_cutoff ORDER BY j.finished_at, j.id
    LOOP
        EXIT WHEN v_budget = 0;
        -- The job lock keeps a concurrent retry_chunk from reopening the job under us.
        PERFORM chunkq._lock_job(v_job_id);
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j
                                   WHERE j.id = v_job_id AND j.finished_at < v_cutoff);
        DELETE FROM chunkq.job_chunks
         WHERE id IN (SELECT c.id FROM chunkq.job_chunks c WHERE c.job_id = v_job_id LIMIT v_budget);
        GET DIAGNOSTICS v_deleted = ROW_COUNT;
        v_budget := v_budget - v_deleted;
        v_result.chunks_deleted := v_result.chunks_deleted + v_deleted;
        IF NOT EXISTS (SELECT 1 FROM chunkq.job_chunks c WHERE c.job_id = v_job_id) THEN
            DELETE FROM chunkq.crawl_jobs WHERE id = v_job_id;
            v_result.jobs_deleted := v_result.jobs_deleted + 1;
        END IF;
    END LOOP;
    v_result.done := NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs j WHERE j.finished_at < v_cutoff);
    RETURN v_result;
END $$;
COMMENT ON FUNCTION chunkq.prune_finished_jobs(interval, integer) IS
    'Deletes jobs that finished more than p_older_than ago, oldest first, with their chunks and errors, but '
    'at most p_max_chunks chunks per call so that no call holds locks for long: call it again until done. '
    'In psql: SELECT * FROM chunkq.prune_finished_jobs(''30 days''); \watch 1 (until done is true). '
    'A job being pruned keeps its counts until its last chunk goes.';

-- ---------------------------------------------------------------------------
-- Storage parameters, chosen by measurement (bench/bloat.py; the figures are in
-- CHANGELOG.md and docs/dba.md). job_chunks: vacuum after 2 % of the table died
-- rather than 20 %, without pausing. No fillfactor: every update changes status,
-- which the partial indexes name, so no update is HOT and free room on a page is
-- only wasted. The counter rows are updated on every status change, all HOT, on a
-- tiny table: room on each page for their new versions, and vacuum every 1,000.
-- ---------------------------------------------------------------------------

ALTER TABLE chunkq.job_chunks SET (autovacuum_vacuum_scale_factor = 0.02,
                                   autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
ALTER TABLE chunkq.job_chunk_counts SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
                                         autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 4';
