"""chunkq through PgBouncer in transaction pooling mode (Debian's pgbouncer, started here on a free port):
the pool, the chunkq command and the client, with the server connections counted in pg_stat_activity."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from chunkq import CrawlJobRepository, JobChunkingService, JobChunkRepository, ValidationError
from chunkq.testing import Bouncer, TestServer, other_connections, pgbouncer, pgbouncer_binary
from tests.cli.conftest import cli_env
from tests.helpers.db import assert_counters_consistent, new_job, statuses
from tests.helpers.pool import ROOT, wait_until

POOL_SIZE = 10  # PgBouncer's default_pool_size: server connections per database


@pytest.fixture(scope="module")
def bouncer(pg_server: TestServer) -> Iterator[Bouncer]:
    if pgbouncer_binary() is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer; .ci/run installs it)")
    with pgbouncer(pg_server.dsn, pool_size=POOL_SIZE) as running:
        yield running


@pytest.fixture
def bouncer_dsn(bouncer: Bouncer, dsn: str) -> str:
    """The test database, through PgBouncer."""
    return bouncer.dsn(str(conninfo_to_dict(dsn)["dbname"]))


class ServerConnections(threading.Thread):
    """Samples, every 20 ms, how many server connections the test database has besides the test's own direct
    ones: through PgBouncer, those are the bouncer's."""

    def __init__(self, dsn: str, *direct: psycopg.Connection) -> None:
        super().__init__(daemon=True)
        self.dsn, self.direct = dsn, [c.info.backend_pid for c in direct]
        self.most = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.wait(0.02):
                self.most = max(self.most, len(other_connections(conn, self.direct)))

    def __enter__(self) -> ServerConnections:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


class Contention:
    """More busy clients than PgBouncer has server connections: each call of a client under test then waits
    for whichever server connection frees first, not the one its last call ran on (alone, it would mostly get
    the same one back, and a statement prepared there would seem to work)."""

    def __init__(self, dsn: str, clients: int = POOL_SIZE + 2) -> None:
        self.dsn, self.clients = dsn, clients
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.busy, daemon=True) for _ in range(clients)]
        self.calls = 0

    def busy(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None) as conn:
            while not self.stop.is_set():
                conn.execute("SELECT pg_sleep(0.002)")
                self.calls += 1

    def __enter__(self) -> Contention:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def run_chunkq(dsn: str, *args: object) -> tuple[int, str, str]:
    """``python -m chunkq ARGS`` on ``dsn``: exit code, stdout, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "chunkq", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(CHUNKQ_DSN=dsn),
    )
    return done.returncode, done.stdout, done.stderr


def chunkq_json(dsn: str, *args: object) -> object:
    code, out, err = run_chunkq(dsn, *args, "--json")
    assert code == 0, f"chunkq {' '.join(map(str, args))}: exit {code}: {err}"
    return json.loads(out)


@pytest.mark.slow
def test_eight_processes_of_fifty_drain_a_job_exactly_once_on_at_most_ten_server_connections(
    dsn, conn, bouncer, bouncer_dsn, start_pool
):
    chunks = 4_000
    job_id = new_job(conn, chunks, chunk=False, chunk_size=1)
    with ServerConnections(dsn, conn) as sampled:
        pool = start_pool(
            "--handler",
            "chunkq.workers.sample:io_wait",
            "--processes",
            "8",
            "--concurrency",
            "50",
            "--no-listen",  # no LISTEN through a transaction pooler, and no prepared statements
            "--poll",
            "0.2",
            "--log-level",
            "warning",
            env={"CHUNKQ_SAMPLE_SECONDS": "0.02"},
            on=bouncer_dsn,
        )
        dbname = conninfo_to_dict(dsn)["dbname"]
        wait_until(lambda: bouncer.clients(dbname) >= 8, 30, "the eight workers to connect through PgBouncer")
        conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
        # The live progress of the chunkq command follows it through PgBouncer too: one statement many times
        # over, which psycopg would prepare on whichever server connection PgBouncer lent it.
        watch = subprocess.Popen(
            [sys.executable, "-m", "chunkq", "job", "progress", str(job_id), "--watch", "--interval", "0.1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(CHUNKQ_DSN=bouncer_dsn),
        )
        wait_until(lambda: statuses(conn, job_id) == {"completed": chunks}, 60, "the job to be drained")
        out, err = watch.communicate(timeout=30)
        assert pool.stop() == 0
    assert watch.returncode == 0, err
    assert f"{chunks}/{chunks} completed" in out
    assert conn.execute(
        "SELECT min(attempt), max(attempt), max(retry_count) FROM chunkq.job_chunks WHERE job_id = %s", (job_id,)
    ).fetchone() == (1, 1, 0)  # every chunk claimed once, completed by its first attempt
    assert conn.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)
    assert_counters_consistent(conn)
    assert 1 <= sampled.most <= POOL_SIZE


@pytest.mark.slow
def test_the_chunkq_command_through_pgbouncer(dsn, conn, bouncer_dsn):
    with ServerConnections(dsn, conn) as sampled, Contention(bouncer_dsn):
        job = chunkq_json(bouncer_dsn, "job", "create", "--name", "cats", "-k", "cat", "--max-images", "20000")
        job_id = job["id"]
        assert job["total_chunks"] == 40
        assert [j["id"] for j in chunkq_json(bouncer_dsn, "job", "list")] == [job_id]
        assert chunkq_json(bouncer_dsn, "job", "show", job_id)["progress"]["pending_chunks"] == 40
        assert chunkq_json(bouncer_dsn, "job", "progress", job_id)["total_chunks"] == 40
        assert len(chunkq_json(bouncer_dsn, "chunk", "list", "--job", job_id, "--limit", "100")) == 40
        assert chunkq_json(bouncer_dsn, "stats")["stats"]["pending_chunks"] == 40
        assert chunkq_json(bouncer_dsn, "workers") == []
        assert chunkq_json(bouncer_dsn, "failures") == []
        assert chunkq_json(bouncer_dsn, "job", "pause", job_id)["paused_at"] is not None
        assert chunkq_json(bouncer_dsn, "job", "resume", job_id)["paused_at"] is None
        assert chunkq_json(bouncer_dsn, "job", "priority", job_id, 8)["priority"] == 8
        assert chunkq_json(bouncer_dsn, "limit", "set", "images.example.com", "--rate", "5/s")["rate"] == 5
        assert chunkq_json(bouncer_dsn, "job", "cancel", job_id)["status"] == "cancelled"
        # Two chunks per transaction: the same call twenty times over on one connection.
        assert chunkq_json(bouncer_dsn, "prune", "--older-than", "0 seconds", "--batch", "2", "--yes") == {
            "jobs_deleted": 1,
            "chunks_deleted": 40,
        }
        assert all(m["applied"] for m in chunkq_json(bouncer_dsn, "migrate", "status"))
    assert sampled.most <= POOL_SIZE


async def test_the_client_through_pgbouncer(dsn, conn, bouncer_dsn):
    with ServerConnections(dsn, conn) as sampled, Contention(bouncer_dsn):
        # prepare_threshold=None: PgBouncer 1.18 in transaction mode cannot keep a prepared statement for a client.
        aconn = await psycopg.AsyncConnection.connect(bouncer_dsn, autocommit=True, prepare_threshold=None)
        async with aconn:
            jobs, chunk_repo = CrawlJobRepository(aconn), JobChunkRepository(aconn)
            service = JobChunkingService(chunk_repo, jobs, aconn)
            # A job and its chunks in one transaction (one server connection throughout), a refused call rolled
            # back alone inside it.
            async with aconn.transaction():
                job = await jobs.create(project_id=1, name="cats", keywords=["cat"], max_images=5_000)
                with pytest.raises(ValidationError):
                    await jobs.create(project_id=1, name="dogs", keywords=["dog"], max_images=0)
                await service.create_chunks_for_job(job_id=job.id, priority=5)
            # Workflow 2 until the job is drained: the same three calls, ten times over.
            done = 0
            while chunk := await service.get_next_pending_chunk(job_id=job.id):
                await service.mark_chunk_processing(chunk_id=chunk.id)
                await service.mark_chunk_completed(chunk_id=chunk.id)
                done += 1
            progress = await service.get_job_chunk_progress(job_id=job.id)
    assert done == 10
    assert progress["is_complete"] and progress["completed_chunks"] == 10
    assert conn.execute("SELECT count(*) FROM chunkq.crawl_jobs").fetchone() == (1,)  # the refused one left nothing
    assert sampled.most <= POOL_SIZE
