# chunkq in one image: the chunkq command (migrations, jobs, stats) and the worker pool.
# Used by docker-compose.yml; CHUNKQ_DSN tells it where Postgres is.
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY chunkq chunkq
COPY workers workers
COPY migrations migrations
# [binary]: psycopg's own libpq (the slim image has none). Not [embedded]: production has its own Postgres, and the
# embedded server's binaries would add 41 MB.
RUN pip install --no-cache-dir ".[binary]" && useradd --create-home --uid 10001 chunkq
USER chunkq
# The supervisor runs as PID 1 and drains the pool on SIGTERM (docker stop).
ENTRYPOINT ["chunkq"]
CMD ["--help"]
