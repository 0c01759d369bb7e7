-- Rolls back 0003: the operations views and functions go; job_progress gets back its 0001 form.
DROP FUNCTION chunkq.list_chunks(bigint, chunkq.chunk_status, integer);
CREATE FUNCTION chunkq.list_chunks(p_job_id bigint, p_status chunkq.chunk_status DEFAULT NULL)
RETURNS SETOF chunkq.job_chunks
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chunkq.crawl_jobs WHERE id = p_job_id) THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    RETURN QUERY SELECT * FROM chunkq.job_chunks c
                  WHERE c.job_id = p_job_id AND (p_status IS NULL OR c.status = p_status)
                  ORDER BY c.chunk_index;
END $$;
COMMENT ON FUNCTION chunkq.list_chunks(bigint, chunkq.chunk_status) IS
    'A job''s chunks in chunk_index order, optionally only those in one status.';
DROP FUNCTION chunkq.delete_job(bigint);
DROP FUNCTION chunkq.retry_failed_chunks(bigint);
DROP FUNCTION chunkq.queue_stats();
DROP TYPE chunkq.queue_stats;
DROP FUNCTION chunkq.job_error_summary(bigint);
DROP TYPE chunkq.job_error_summary;
DROP INDEX chunkq.chunk_errors_by_job;
DROP INDEX chunkq.chunk_errors_by_time;
DROP VIEW chunkq.queue_depth;
DROP FUNCTION chunkq.list_jobs(chunkq.job_status, integer);
DROP VIEW chunkq.job_overview;
DROP FUNCTION chunkq._completed_images(chunkq.crawl_jobs, bigint);
ALTER TYPE chunkq.job_progress DROP ATTRIBUTE completed_images, DROP ATTRIBUTE max_images;
COMMENT ON TYPE chunkq.job_progress IS
    'Progress of one job. completion_percentage = completed / total * 100; is_complete = the job has chunks '
    'and none is pending or processing.';

CREATE OR REPLACE FUNCTION chunkq.job_progress(p_job_id bigint) RETURNS chunkq.job_progress
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_progress chunkq.job_progress;
BEGIN
    SELECT j.id, j.status, j.total_chunks,
           coalesce(sum(k.pending), 0), coalesce(sum(k.processing), 0), coalesce(sum(k.completed), 0),
           coalesce(sum(k.failed), 0), coalesce(sum(k.cancelled), 0),
           CASE WHEN j.total_chunks = 0 THEN 0.0
                ELSE round(100.0 * coalesce(sum(k.completed), 0) / j.total_chunks, 2)::double precision END,
           j.total_chunks > 0 AND coalesce(sum(k.pending) + sum(k.processing), 0) = 0
      INTO v_progress
      FROM chunkq.crawl_jobs j
      LEFT JOIN chunkq.job_chunk_counts k ON k.job_id = j.id
     WHERE j.id = p_job_id
     GROUP BY j.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'crawl job % does not exist', p_job_id USING ERRCODE = 'CQ002';
    END IF;
    RETURN v_progress;
END $$;

CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT 2';
