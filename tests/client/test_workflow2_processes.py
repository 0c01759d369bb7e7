"""Four processes run the seed's Workflow 2 on one job of 5,000 chunks: each chunk exactly once."""

from __future__ import annotations

import multiprocessing
from collections import Counter

import pytest

from tests.helpers.db import assert_counters_consistent, new_job
from tests.helpers.procs import seed_workflow_2

PROCESSES = 4
CHUNKS = 5000


@pytest.mark.slow
def test_workflow_2_in_four_processes_processes_every_chunk_once(dsn, conn):
    job_id = new_job(conn, 500 * CHUNKS)
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    procs = [spawn.Process(target=seed_workflow_2, args=(dsn, job_id, results)) for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    per_process = [results.get(timeout=240) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0

    processed = [chunk for chunks in per_process for chunk in chunks]
    duplicates = [chunk for chunk, n in Counter(c[0] for c in processed).items() if n > 1]
    assert duplicates == []
    starts = sorted(start for _, start, _ in processed)
    assert starts == [500 * i for i in range(CHUNKS)]  # no gap
    assert all(end == start + 499 for _, start, end in processed)
    assert all(len(chunks) > 0 for chunks in per_process), "every process should have taken part"

    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'completed'), max(attempt), min(attempt)"
        " FROM chunkq.job_chunks WHERE job_id = %s",
        (job_id,),
    ).fetchone()
    assert row == (CHUNKS, 1, 1)  # all completed, none claimed twice
    assert conn.execute("SELECT status::text FROM chunkq.crawl_jobs").fetchone() == ("completed",)
    assert_counters_consistent(conn)
