-- chunkq 0003: what the chunkq CLI (and an operator in psql) needs to see and steer the queue:
-- every job's progress, the queue's depth and health, and whole-job retry and delete.
-- depends: 0002.worker-pool

-- Progress learns how many images are done: completed chunks are full chunks,
-- except the last one, which is shorter when chunk_size does not divide max_images.
ALTER TYPE chunkq.job_progress ADD ATTRIBUTE max_images bigint, ADD ATTRIBUTE completed_images bigint;
COMMENT ON TYPE chunkq.job_progress IS
    'Progress of one job. completion_percentage = completed / total * 100; is_complete = the job has chunks '
    'and none is pending or processing; completed_images counts the images of completed chunks.';

CREATE FUNCTION chunkq._completed_images(p_job chunkq.crawl_jobs, p_completed bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT p_completed * p_job.chunk_size
           - CASE WHEN EXISTS (SELECT 1 FROM chunkq.job_chunks c
                                WHERE c.job_id = p_job.id AND c.chunk_index = p_job.total_chunks - 1
                                  AND c.status = 'completed')
                  THEN p_job.total_chunks::bigint * p_job.chunk_size - p_job.max_images
                  ELSE 0 END;
$$;
COMMENT ON FUNCTION chunkq._completed_images(chunkq.crawl_jobs, bigint) IS
    'Internal: images in a job''s p_completed completed chunks (one key lookup for the shorter last chunk).';

CREATE OR REPLACE FUNCTION chunkq.job_progress(p_job_id bigint) RETURNS chunkq.job_progress
LANGUAGE plpgsql STABLE AS $$
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
    RETURN v_progress;
END $$;
COMMENT ON FUNCTION chunkq.job_progress(bigint) IS
    'Chunk counts by status for one job, from job_chunk_counts: at most 16 rows read, however large the job.';

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

CREATE INDEX chunk_errors_by_time ON chunkq.chunk_errors (failed_at);
COMMENT ON INDEX chunkq.chunk_errors_by_time IS 'Recent errors, for queue_stats.';
CREATE INDEX chunk_errors_by_job ON chunkq.chunk_errors (job_id, failed_at);
COMMENT ON INDEX chunkq.chunk_errors_by_job IS 'A job''s errors, for job_error_summary.';

CREATE TYPE chunkq.job_error_summary AS (
    job_id bigint,
    errors bigint,
    retried bigint,
    lease_expired bigint,
    last_error text,
    last_failed_at timestamptz
);
COMMENT ON TYPE chunkq.job_error_summary IS
    'The errors recorded for one job''s chunks: how many, how many were retried, how many were abandoned '
    'attempts (lease expired), and the latest.';

CREATE FUNCTION chunkq.job_error_summary(p_job_id bigint) RETURNS chunkq.job_error_summary
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_summary chunkq.job_error_summary;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    SELECT p_job_id, count(*), count(*) FILTER (WHERE e.retried), count(*) FILTER (WHERE e.lease_expired),
           (SELECT l.error FROM chunkq.chunk_errors l WHERE l.job_id = p_job_id ORDER BY l.failed_at DESC LIMIT 1),
           max(e.failed_at)
      INTO v_summary
      FROM chunkq.chunk_errors e
     WHERE e.job_id = p_job_id;
    RETURN v_summary;
END $$;
COMMENT ON FUNCTION chunkq.job_error_summary(bigint) IS
    'Counts of the errors recorded for a job''s chunks, and the latest one.';

CREATE TYPE chunkq.queue_stats AS (
    jobs_pending bigint,
    jobs_running bigint,
    pending_chunks bigint,
    processing_chunks bigint,
    expired_leases bigint,
    completed_chunks bigint,
    failed_chunks bigint,
    failure_rate double precision,
    errors_last_hour bigint,
    oldest_pending_age interval
);
COMMENT ON TYPE chunkq.queue_stats IS
    'Health of the whole queue, see queue_stats(). failure_rate = failed / (completed + failed) chunks; '
    'expired_leases counts processing chunks whose worker stopped heartbeating and that no claim has '
    'reclaimed yet (non-zero for long means no worker is claiming).';

CREATE FUNCTION chunkq.queue_stats() RETURNS chunkq.queue_stats
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

CREATE FUNCTION chunkq.retry_failed_chunks(p_job_id bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_status chunkq.job_status;
    v_moves chunkq._chunk_move[];
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT status INTO v_status FROM chunkq.crawl_jobs WHERE id = p_job_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_status = 'cancelled' THEN
        RAISE EXCEPTION 'cannot retry chunks of job %: it is cancelled', p_job_id USING ERRCODE = 'CQ004';
    END IF;
    WITH retried AS (
        UPDATE chunkq.job_chunks c
           SET status = 'pending', retry_count = c.retry_count + 1, available_at = now(),
               finished_at = NULL, task_id = NULL
         WHERE c.job_id = p_job_id AND c.status = 'failed'
        RETURNING (c.job_id, c.chunk_index, 'failed', 'pending')::chunkq._chunk_move AS move
    )
    SELECT coalesce(array_agg(move), '{}') INTO v_moves FROM retried;
    IF cardinality(v_moves) > 0 THEN
        PERFORM chunkq._apply_chunk_moves(v_moves);
        PERFORM chunkq._notify_claimable(p_job_id, cardinality(v_moves));
    END IF;
    RETURN cardinality(v_moves);
END $$;
COMMENT ON FUNCTION chunkq.retry_failed_chunks(bigint) IS
    'retry_chunk for every failed chunk of a job at once; returns how many (0 when none: safe to repeat). '
    'A finished job becomes running again. Raises CQ004 for a cancelled job.';

CREATE FUNCTION chunkq.delete_job(p_job_id bigint) RETURNS chunkq.crawl_jobs
LANGUAGE plpgsql AS $$
DECLARE
    v_job chunkq.crawl_jobs;
BEGIN
    PERFORM chunkq._lock_job(p_job_id);
    SELECT * INTO v_job FROM chunkq.crawl_jobs WHERE id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF v_job.status = 'running' THEN
        RAISE EXCEPTION 'crawl job % is running: cancel it first (chunkq.cancel_job)', p_job_id
            USING ERRCODE = 'CQ004';
    END IF;
    DELETE FROM chunkq.crawl_jobs WHERE id = p_job_id;
    RETURN v_job;
END $$;
COMMENT ON FUNCTION chunkq.delete_job(bigint) IS
    'Deletes a job that is not running, with its chunks, counters and error history; returns the deleted row. '
    'A running job must be cancelled first (CQ004), so no worker is left holding a chunk that vanished.';

DROP FUNCTION chunkq.list_chunks(bigint, chunkq.chunk_status);
CREATE FUNCTION chunkq.list_chunks(
    p_job_id bigint,
    p_status chunkq.chunk_status DEFAULT NULL,
    p_limit integer DEFAULT NULL
) RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    IF p_limit < 1 THEN
        RAISE EXCEPTION 'limit must be positive, got %', p_limit USING ERRCODE = 'CQ001';
    END IF;
    RETURN QUERY SELECT * FROM chunkq.job_chunks c
                  WHERE c.job_id = p_job_id AND (p_status IS NULL OR c.status = p_status)
                  ORDER BY c.chunk_index
                  LIMIT p_limit;
END $$;
COMMENT ON FUNCTION chunkq.list_chunks(bigint, chunkq.chunk_status, integer) IS
    'A job''s chunks in chunk_index order, optionally only those in one status, at most p_limit (NULL: all).';

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 3';
