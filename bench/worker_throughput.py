"""End-to-end no-op throughput of the worker pool at 1, 2 and 4 processes, against pgbench on the same SQL.

    python -m bench.worker_throughput [--dsn DSN] [--chunks 20000] [--repeats 3] [--processes 1 2 4]

For each process count, in one run and alternating: the pool (python -m workers,
no-op handler, default options) drains --chunks fresh chunks, timed from the first
claim to the last completion as recorded in job_chunks; then pgbench runs the
bare SQL a worker sends per chunk — claim_chunks(1) in one transaction,
complete_chunk in a second — with as many clients, on as many fresh chunks.
Between runs the table is VACUUMed, so that neither side inherits the other's
dead rows. Prints medians with min-max, and pool / pgbench.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bench.common import bench_database, parser, server_line

ROOT = Path(__file__).resolve().parents[1]
PGBENCH_SCRIPT = """\
SELECT id, attempt FROM chunkq.claim_chunks('pgbench', 1) \\gset
SELECT chunkq.complete_chunk(:id, :attempt);
"""


def fresh_chunks(conn: psycopg.Connection, chunks: int) -> int:
    conn.execute("VACUUM ANALYZE chunkq.job_chunks")
    conn.execute("VACUUM ANALYZE chunkq.job_chunk_counts")
    job_id = conn.execute("SELECT id FROM chunkq.create_job(1, 'bench', '[]', %s, NULL, NULL, 1)",
                          (chunks,)).fetchone()[0]
    conn.execute("SELECT chunkq.create_chunks(%s)", (job_id,))
    return job_id


def pool_rate(dsn: str, conn: psycopg.Connection, processes: int, chunks: int) -> float:
    job_id = fresh_chunks(conn, chunks)
    with tempfile.TemporaryFile() as log:
        pool = subprocess.Popen(
            [sys.executable, "-m", "workers", "--dsn", dsn, "--handler", "workers.sample:noop",
             "--processes", str(processes), "--job", str(job_id)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while conn.execute("SELECT pending_chunks + processing_chunks FROM chunkq.job_progress(%s)",
                               (job_id,)).fetchone()[0]:
                if pool.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the pool exited early:\n{log.read().decode()[-2000:]}")
                time.sleep(0.2)
        finally:
            pool.send_signal(signal.SIGTERM)
            pool.wait(60)
    seconds = conn.execute(
        "SELECT extract(epoch FROM max(finished_at) - min(claimed_at)) FROM chunkq.job_chunks WHERE job_id = %s",
        (job_id,)).fetchone()[0]
    return chunks / float(seconds)


def pgbench_rate(dsn: str, conn: psycopg.Connection, clients: int, chunks: int, script: Path) -> float:
    fresh_chunks(conn, chunks)
    params = conninfo_to_dict(dsn)
    env = {**os.environ, "PGPASSWORD": str(params.get("password") or "")}
    command = [shutil.which("pgbench") or "pgbench", "-n", "-f", str(script), "-c", str(clients),
               "-j", str(clients), "-t", str(chunks // clients)]
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
        if params.get(key):
            command += [flag, str(params[key])]
    command.append(str(params.get("dbname")))
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    p = parser("worker pool throughput versus pgbench")
    p.add_argument("--chunks", type=int, default=20_000)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    with bench_database(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn, \
            tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "claim_complete.sql"
        script.write_text(PGBENCH_SCRIPT)
        print(server_line(dsn))
        print(f"{args.chunks:,} chunks per run, {args.repeats} runs each, medians (min-max), chunks/s")
        print(f"{'processes':>9} | {'pool':>22} | {'pgbench, same SQL':>22} | pool / pgbench")
        for n in args.processes:
            pool, bench = [], []
            for _ in range(args.repeats):
                pool.append(pool_rate(dsn, conn, n, args.chunks))
                bench.append(pgbench_rate(dsn, conn, n, args.chunks, script))
            p_med, b_med = statistics.median(pool), statistics.median(bench)
            print(f"{n:>9} | {p_med:>8,.0f} ({min(pool):,.0f}-{max(pool):,.0f}) | "
                  f"{b_med:>8,.0f} ({min(bench):,.0f}-{max(bench):,.0f}) | {p_med / b_med:.2f}")


if __name__ == "__main__":
    main()
