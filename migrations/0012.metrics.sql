-- chunkq 0012: what a dashboard and Prometheus read. One call for every gauge a
-- scrape needs (metrics_snapshot, from the counter rows, never a count over
-- job_chunks); jobs found by status and name a page at a time; one job's
-- overview, its failures by kind, and the reasons it is not moving.
-- depends: 0011.checkpoints

-- ---------------------------------------------------------------------------
-- Metrics
-- ---------------------------------------------------------------------------

CREATE TYPE chunkq.metric_sample AS (metric text, labels jsonb, value double precision);
COMMENT ON TYPE chunkq.metric_sample IS
    'One sample of a gauge, as Prometheus exposes it: the metric name, its labels as a JSON object of '
    'strings, the value. See metrics_snapshot().';

CREATE FUNCTION chunkq.metrics_snapshot(p_top_jobs integer DEFAULT 20) RETURNS SETOF chunkq.metric_sample
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_minute constant timestamptz := date_trunc('minute', now());
    v_top bigint[];
BEGIN
    IF p_top_jobs IS NULL OR p_top_jobs NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'top_jobs must be between 0 and 1000, got %', coalesce(p_top_jobs::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    -- The jobs that get series of their own: unfinished ones, newest first, then
    -- the latest to finish. Everything else is summed under job="other", so the
    -- number of series stays bounded however many jobs the table keeps.
    v_top := ARRAY(SELECT j.id FROM chunkq.crawl_jobs j
                    ORDER BY j.finished_at IS NOT NULL, coalesce(j.finished_at, j.created_at) DESC, j.id DESC
                    LIMIT p_top_jobs);

    RETURN QUERY
    SELECT m.metric, m.labels, m.value
      FROM chunkq.job_overview o
     CROSS JOIN LATERAL (VALUES
        ('chunkq_job_info', jsonb_build_object('job', o.id::text, 'name', o.name, 'status', o.status::text), 1.0),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'pending'), o.pending_chunks::float8),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'processing'), o.processing_chunks::float8),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'completed'), o.completed_chunks::float8),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'failed'), o.failed_chunks::float8),
        ('chunkq_job_chunks', jsonb_build_object('job', o.id::text, 'state', 'cancelled'), o.cancelled_chunks::float8),
        ('chunkq_job_progress_ratio', jsonb_build_object('job', o.id::text),
         CASE WHEN o.total_chunks = 0 THEN 0.0 ELSE o.completed_chunks::float8 / o.total_chunks END),
        ('chunkq_job_chunks_completed_per_second', jsonb_build_object('job', o.id::text),
         coalesce(o.chunks_per_second, 0.0)),
        ('chunkq_job_eta_seconds', jsonb_build_object('job', o.id::text), extract(epoch FROM o.eta)::float8),
        ('chunkq_job_paused', jsonb_build_object('job', o.id::text), (o.paused_at IS NOT NULL)::integer::float8)
     ) m(metric, labels, value)
     WHERE o.id = ANY (v_top) AND m.value IS NOT NULL;

    -- One pass over the counter rows: totals, the jobs outside the top, the completion rate.
    RETURN QUERY
    WITH sums AS (
        SELECT coalesce(sum(k.pending), 0) AS pending, coalesce(sum(k.processing), 0) AS processing,
               coalesce(sum(k.completed), 0) AS completed, coalesce(sum(k.failed), 0) AS failed,
               coalesce(sum(k.cancelled), 0) AS cancelled,
               coalesce(sum(k.pending) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_pending,
               coalesce(sum(k.processing) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_processing,
               coalesce(sum(k.completed) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_completed,
               coalesce(sum(k.failed) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_failed,
               coalesce(sum(k.cancelled) FILTER (WHERE k.job_id <> ALL (v_top)), 0) AS other_cancelled,
               -- completions in the previous minute and this one so far, as job_overview counts them
               coalesce(sum(CASE WHEN k.rate_minute = v_minute THEN k.completed_this_minute + k.completed_last_minute
                                 WHEN k.rate_minute = v_minute - interval '1 minute' THEN k.completed_this_minute
                                 ELSE 0 END), 0) AS recent
          FROM chunkq.job_chunk_counts k
    )
    SELECT m.metric, m.labels, m.value
      FROM sums s
     CROSS JOIN LATERAL (VALUES
        ('chunkq_chunks', '{"state": "pending"}'::jsonb, s.pending::float8),
        ('chunkq_chunks', '{"state": "processing"}', s.processing::float8),
        ('chunkq_chunks', '{"state": "completed"}', s.completed::float8),
        ('chunkq_chunks', '{"state": "failed"}', s.failed::float8),
        ('chunkq_chunks', '{"state": "cancelled"}', s.cancelled::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "pending"}', s.other_pending::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "processing"}', s.other_processing::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "completed"}', s.other_completed::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "failed"}', s.other_failed::float8),
        ('chunkq_job_chunks', '{"job": "other", "state": "cancelled"}', s.other_cancelled::float8),
        ('chunkq_chunks_completed_per_second', '{}',
         round((s.recent / GREATEST(1.0, 60 + extract(epoch FROM now() - v_minute)))::numeric, 3)::float8),
        ('chunkq_failure_ratio', '{}',
         CASE WHEN s.completed + s.failed > 0 THEN s.failed::float8 / (s.completed + s.failed) END)
     ) m(metric, labels, value)
     WHERE m.value IS NOT NULL;

    -- Jobs by status, every status present (0 when none).
    RETURN QUERY
    SELECT 'chunkq_jobs', jsonb_build_object('status', st::text), count(j.id)::float8
      FROM unnest(enum_range(NULL::chunkq.job_status)) st
      LEFT JOIN chunkq.crawl_jobs j ON j.status = st
     GROUP BY st;

    -- The queue by priority, from the counters of unfinished jobs (a chunk that can
    -- still run has its job's priority): pending chunks, and the age of the oldest,
    -- which is its job's: create_chunks makes all of a job's chunks in one transaction.
    -- A paused job's chunks are left out of the age: a paused job is not a stuck queue.
    RETURN QUERY
    WITH waiting AS (
        SELECT j.priority, j.chunked_at, j.paused_at, sum(k.pending) AS pending
          FROM chunkq.crawl_jobs j JOIN chunkq.job_chunk_counts k ON k.job_id = j.id
         WHERE j.finished_at IS NULL
         GROUP BY j.id
        HAVING sum(k.pending) > 0
    ), by_priority AS (
        SELECT w.priority, sum(w.pending) AS pending,
               extract(epoch FROM now() - min(w.chunked_at) FILTER (WHERE w.paused_at IS NULL))::float8 AS oldest
          FROM waiting w
         GROUP BY w.priority
    )
    SELECT m.metric, m.labels, m.value
      FROM by_priority p
     CROSS JOIN LATERAL (VALUES
        ('chunkq_queue_pending_chunks', jsonb_build_object('priority', p.priority::text), p.pending::float8),
        ('chunkq_queue_oldest_pending_age_seconds', jsonb_build_object('priority', p.priority::text), p.oldest)
     ) m(metric, labels, value)
     WHERE m.value IS NOT NULL;

    -- Rate keys (0010): how many hold chunks back now, and for the keys in use (the
    -- ones holding back first, then by waiting chunks; at most 100, to bound the
    -- series) whether each does, its running and waiting chunks and its tokens.
    -- (The view is read once: a CTE named twice is computed once.)
    RETURN QUERY
    WITH keys AS (
        SELECT * FROM chunkq.rate_limit_state
    ), shown AS (
        SELECT k.* FROM keys k
         WHERE k.jobs > 0 OR k.held_back IS NOT NULL
         ORDER BY k.held_back IS NULL, k.pending_chunks DESC, k.key
         LIMIT 100
    )
    SELECT 'chunkq_rate_keys_throttled', '{}'::jsonb,
           (SELECT count(*) FROM keys k WHERE k.held_back IS NOT NULL)::float8
    UNION ALL
    SELECT m.metric, jsonb_build_object('key', k.key), m.value
      FROM shown k
     CROSS JOIN LATERAL (VALUES
        ('chunkq_rate_key_throttled', (k.held_back IS NOT NULL)::integer::float8),
        ('chunkq_rate_key_running_chunks', k.running_chunks::float8),
        ('chunkq_rate_key_pending_chunks', k.pending_chunks::float8),
        ('chunkq_rate_key_tokens', k.tokens)
     ) m(metric, value)
     WHERE m.value IS NOT NULL;

    RETURN QUERY
    SELECT v.metric, '{}'::jsonb, v.value
      FROM (VALUES
        ('chunkq_jobs_paused',
         (SELECT count(*) FROM chunkq.crawl_jobs j WHERE j.paused_at IS NOT NULL)::float8),
        ('chunkq_expired_leases',
         (SELECT count(*) FROM chunkq.job_chunks c WHERE c.lease_expires_at < now())::float8),
        ('chunkq_workers_connected', (SELECT count(*) FROM chunkq._connected_workers())::float8),
        -- A deferral (a handler's retry-after, 0010) is kept in chunk_errors too, but is no failure.
        ('chunkq_chunk_errors_per_second',
         (SELECT count(*) FROM chunkq.chunk_errors e
           WHERE e.failed_at > now() - interval '1 minute' AND NOT e.deferred)::float8 / 60),
        ('chunkq_chunk_deferrals_per_second',
         (SELECT count(*) FROM chunkq.chunk_errors e
           WHERE e.failed_at > now() - interval '1 minute' AND e.deferred)::float8 / 60),
        ('chunkq_chunk_errors_last_hour',
         (SELECT count(*) FROM chunkq.chunk_errors e
           WHERE e.failed_at > now() - interval '1 hour' AND NOT e.deferred)::float8),
        ('chunkq_dead_chunk_rows',
         (SELECT s.n_dead_tup FROM pg_stat_user_tables s WHERE s.relid = 'chunkq.job_chunks'::regclass)::float8),
        ('chunkq_last_vacuum_timestamp_seconds',
         (SELECT extract(epoch FROM greatest(s.last_autovacuum, s.last_vacuum)) FROM pg_stat_user_tables s
           WHERE s.relid = 'chunkq.job_chunks'::regclass)::float8),
        ('chunkq_autovacuum_enabled', current_setting('autovacuum')::boolean::integer::float8),
        ('chunkq_oldest_transaction_age_seconds',
         coalesce((SELECT extract(epoch FROM now() - a.xact_start) FROM pg_stat_activity a
                    WHERE a.datname = current_database() AND (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL)
                      AND a.pid <> pg_backend_pid()
                    ORDER BY a.xact_start LIMIT 1), 0)::float8)
      ) v(metric, value)
     WHERE v.value IS NOT NULL;
END $$;
COMMENT ON FUNCTION chunkq.metrics_snapshot(integer) IS
    'Every gauge a Prometheus scrape of chunkq needs, in one call that reads the counter rows and a few index '
    'probes, never a count over job_chunks: chunks by state (in total and for the p_top_jobs unfinished or '
    'latest jobs, the rest under job "other"), jobs by status, pending chunks and the oldest pending age by '
    'priority, completion rate, failure ratio, errors, expired leases, connected workers, rate keys that hold '
    'chunks back (and, for up to 100 keys in use, each key''s state), dead rows, vacuum and the oldest open '
    'transaction. docs/monitoring.md explains each. Example: '
    'SELECT * FROM chunkq.metrics_snapshot(5) ORDER BY metric;';

-- ---------------------------------------------------------------------------
-- What the dashboard asks that the API could not answer
-- ---------------------------------------------------------------------------

CREATE FUNCTION chunkq.search_jobs(
    p_status chunkq.job_status DEFAULT NULL,
    p_name text DEFAULT NULL,
    p_limit integer DEFAULT 50,
    p_offset integer DEFAULT 0
) RETURNS SETOF chunkq.job_overview
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'CQ001';
    END IF;
    IF p_offset IS NULL OR p_offset < 0 THEN
        RAISE EXCEPTION 'offset must not be negative, got %', coalesce(p_offset::text, 'NULL') USING ERRCODE = 'CQ001';
    END IF;
    -- strpos, not LIKE: a name typed with % or _ in it is looked for as written.
    RETURN QUERY SELECT * FROM chunkq.job_overview o
                  WHERE (p_status IS NULL OR o.status = p_status)
                    AND (p_name IS NULL OR strpos(lower(o.name), lower(p_name)) > 0)
                  ORDER BY o.id DESC
                  LIMIT p_limit OFFSET p_offset;
END $$;
COMMENT ON FUNCTION chunkq.search_jobs(chunkq.job_status, text, integer, integer) IS
    'A page of job_overview, newest first: optionally only one status, and only names containing p_name '
    '(case-insensitive, taken literally). count_jobs gives the number of matches. Example: '
    'SELECT * FROM chunkq.search_jobs(''running'', ''cats'', 50, 100);';

CREATE FUNCTION chunkq.count_jobs(p_status chunkq.job_status DEFAULT NULL, p_name text DEFAULT NULL)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM chunkq.crawl_jobs j
     WHERE (p_status IS NULL OR j.status = p_status)
       AND (p_name IS NULL OR strpos(lower(j.name), lower(p_name)) > 0);
$$;
COMMENT ON FUNCTION chunkq.count_jobs(chunkq.job_status, text) IS
    'How many jobs search_jobs would page through with the same status and name filter.';

CREATE FUNCTION chunkq.get_job_overview(p_job_id bigint) RETURNS SETOF chunkq.job_overview
LANGUAGE sql STABLE AS $$
    SELECT * FROM chunkq.job_overview o WHERE o.id = p_job_id;
$$;
COMMENT ON FUNCTION chunkq.get_job_overview(bigint) IS
    'One job''s row of job_overview (counts, rate, ETA); no row when there is no such job.';

CREATE FUNCTION chunkq.job_failure_summary(p_job_id bigint, p_limit integer DEFAULT 20)
RETURNS SETOF chunkq.failure_summary
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'limit must be positive, got %', coalesce(p_limit::text, 'NULL') USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY
    SELECT regexp_replace(CASE WHEN e.lease_expired THEN 'lease expired: the worker stopped heartbeating'
                               ELSE split_part(e.error, E'\n', 1) END, '[0-9]+', '#', 'g') AS error_kind,
           count(*), count(DISTINCT e.chunk_id), count(DISTINCT e.job_id),
           count(*) FILTER (WHERE NOT e.retried), min(e.failed_at), max(e.failed_at),
           (array_agg(e.chunk_id ORDER BY e.failed_at DESC))[1],
           (array_agg(e.error ORDER BY e.failed_at DESC))[1]
      FROM chunkq.chunk_errors e
     WHERE e.job_id = p_job_id
     GROUP BY 1
     ORDER BY 2 DESC, 1
     LIMIT p_limit;
END $$;
COMMENT ON FUNCTION chunkq.job_failure_summary(bigint, integer) IS
    'failure_summary for one job: its errors grouped by kind, most frequent first, at most p_limit kinds, '
    'each with the latest example.';

CREATE TYPE chunkq.job_blocker AS (reason text, detail text);
COMMENT ON TYPE chunkq.job_blocker IS
    'Why a job is not moving: a reason code (finished, not_chunked, paused, capped, rate_limited, '
    'waiting_for_retry, behind_higher_priority, no_workers) and a sentence about this job. See job_blockers().';

CREATE FUNCTION chunkq.job_blockers(p_job_id bigint) RETURNS SETOF chunkq.job_blocker
LANGUAGE plpgsql STABLE AS $$
-- Each reason is one block below: a test of the facts, and a row saying what
-- holds the job back. A new reason (a cap, a rate limit...) is one more block.
DECLARE
    v_job chunkq.crawl_jobs;
    v_progress chunkq.job_progress;
    v_waiting boolean;
    v_ahead smallint;
    v_key_held text;
BEGIN
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    -- The counts from the counter rows, and the chunks waiting out a retry (a small index).
    v_progress := chunkq.job_progress(p_job_id);
    -- Unpaused, only a chunk that was retried can wait: all pending ones waiting means none may be claimed.
    v_waiting := v_job.paused_at IS NULL AND v_progress.pending_chunks > 0
                 AND v_progress.retrying_chunks = v_progress.pending_chunks;

    IF v_job.finished_at IS NOT NULL THEN
        RETURN NEXT ('finished', format('the job is %s (since %s); retry_failed_chunks reopens a failed one',
                                        v_job.status, date_trunc('second', v_job.finished_at)))::chunkq.job_blocker;
        RETURN;
    END IF;
    IF v_job.total_chunks = 0 THEN
        RETURN NEXT ('not_chunked', 'nothing to claim yet: create_chunks has not split the job')::chunkq.job_blocker;
        RETURN;
    END IF;
    IF v_job.paused_at IS NOT NULL THEN  -- by an operator, or by its failure budget (0010), which says why
        RETURN NEXT ('paused', format('paused %s since %s: its %s pending chunks wait for resume_job(%s)',
                                      coalesce(v_job.paused_reason, 'by an operator'),
                                      date_trunc('second', v_job.paused_at), v_progress.pending_chunks,
                                      p_job_id))::chunkq.job_blocker;
    END IF;
    IF v_job.max_running IS NOT NULL AND v_progress.processing_chunks >= v_job.max_running
       AND v_progress.pending_chunks > 0 THEN
        RETURN NEXT ('capped', format('%s chunks running, its max_running %s: the others wait for one to finish',
                                      v_progress.processing_chunks, v_job.max_running))::chunkq.job_blocker;
    END IF;
    SELECT l.held_back INTO v_key_held FROM chunkq.rate_limit_state l WHERE l.key = v_job.rate_key;
    IF v_key_held IS NOT NULL AND v_progress.pending_chunks > 0 THEN
        RETURN NEXT ('rate_limited', format('its rate key %s is %s', v_job.rate_key, v_key_held))::chunkq.job_blocker;
    END IF;
    IF v_waiting THEN
        RETURN NEXT ('waiting_for_retry',
                     format('all %s pending chunks wait out a retry backoff; the first may be claimed again at %s',
                            v_progress.pending_chunks, date_trunc('second', v_progress.next_retry_at))
                    )::chunkq.job_blocker;
    END IF;
    IF v_progress.pending_chunks > 0 AND v_progress.processing_chunks = 0 AND v_job.paused_at IS NULL
       AND NOT v_waiting THEN
        -- The head of the claim index (unlimited chunks; limited ones are claimed apart).
        SELECT c.priority INTO v_ahead FROM chunkq.job_chunks c
         WHERE c.status = 'pending' AND c.available_at < 'infinity' AND NOT c.limited AND c.available_at <= now()
         ORDER BY c.priority DESC LIMIT 1;
        IF v_ahead > v_job.priority THEN
            RETURN NEXT ('behind_higher_priority',
                         format('claimable chunks of priority %s are taken before this job''s (priority %s)',
                                v_ahead, v_job.priority))::chunkq.job_blocker;
        END IF;
    END IF;
    IF v_progress.pending_chunks > 0 AND NOT EXISTS (SELECT 1 FROM chunkq._connected_workers()) THEN
        RETURN NEXT ('no_workers', 'no worker pool is connected to this database')::chunkq.job_blocker;
    END IF;
END $$;
COMMENT ON FUNCTION chunkq.job_blockers(bigint) IS
    'Why a job is not moving, one row per reason (none: it moves, or waits only for its running chunks): '
    'finished, not chunked, paused (by an operator or its failure budget), capped by max_running, its rate key '
    'blocked, capped or rate-limited, every pending chunk in retry backoff, queued behind claimable chunks of a '
    'higher priority, no worker connected. Example: SELECT * FROM chunkq.job_blockers(42);';

-- API functions run as their owner with a fixed search_path, like every other
-- (0005); nothing is PUBLIC; readers may call all of them.
ALTER FUNCTION chunkq.metrics_snapshot(integer) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION chunkq.search_jobs(chunkq.job_status, text, integer, integer)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION chunkq.count_jobs(chunkq.job_status, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION chunkq.get_job_overview(bigint) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION chunkq.job_failure_summary(bigint, integer) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION chunkq.job_blockers(bigint) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION
    chunkq.metrics_snapshot(integer), chunkq.search_jobs(chunkq.job_status, text, integer, integer),
    chunkq.count_jobs(chunkq.job_status, text), chunkq.get_job_overview(bigint),
    chunkq.job_failure_summary(bigint, integer), chunkq.job_blockers(bigint)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    chunkq.metrics_snapshot(integer), chunkq.search_jobs(chunkq.job_status, text, integer, integer),
    chunkq.count_jobs(chunkq.job_status, text), chunkq.get_job_overview(bigint),
    chunkq.job_failure_summary(bigint, integer), chunkq.job_blockers(bigint)
    TO chunkq_reader;

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 12';
