# chunkq in one image: the chunkq command (migrations, jobs, stats, the web dashboard) and the worker pool.
# Used by docker-compose.yml; CHUNKQ_DSN tells it where Postgres is.
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY chunkq chunkq
COPY workers workers
COPY migrations migrations
# [binary]: psycopg's own libpq (the slim image has none); [web]: the dashboard and /metrics (chunkq web) and the
# pool's --metrics-port. Not [embedded]: production has its own Postgres, and its binaries would add 41 MB.
RUN pip install --no-cache-dir ".[binary,web]" && useradd --create-home --uid 10001 chunkq
USER chunkq
# The supervisor runs as PID 1 and drains the pool on SIGTERM (docker stop).
ENTRYPOINT ["chunkq"]
CMD ["--help"]
