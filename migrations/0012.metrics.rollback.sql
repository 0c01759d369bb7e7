-- Rolls back 0012: no metrics snapshot, job search, job overview by id, per-job failure kinds or blockers.
CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 11';

DROP FUNCTION chunkq.job_blockers(bigint);
DROP TYPE chunkq.job_blocker;
DROP FUNCTION chunkq.job_failure_summary(bigint, integer);
DROP FUNCTION chunkq.get_job_overview(bigint);
DROP FUNCTION chunkq.count_jobs(chunkq.job_status, text);
DROP FUNCTION chunkq.search_jobs(chunkq.job_status, text, integer, integer);
DROP FUNCTION chunkq.metrics_snapshot(integer);
DROP TYPE chunkq.metric_sample;
