"""chunkq's benchmark: one command, one run, every number beside the ones it is compared with.

    python -m bench [--dsn DSN] [--quick] [--repeats 3] [--no-peers]

Against the server of --dsn (default $CHUNKQ_DSN, else an embedded PostgreSQL),
in fresh databases dropped afterwards, with the server's settings untouched:

1. ceiling   pgbench running chunkq's SQL functions (bench/ceiling.py), 1-8 clients;
2. chunkq    the worker pool draining as many chunks with a no-op handler
             (bench/pool.py), 1-4 processes, 1, 10 or 100 chunks per claim;
3. peers     PGQueuer and procrastinate draining as many no-op jobs (bench/peers.py;
             pip install -e '.[bench]'), at their documented settings for 2 cores,
             and PGQueuer also with batches of 100, as chunkq's largest;
4. enqueue   create_chunks for jobs of 2,000 and 200,000 chunks, and the peers' bulk enqueue;
5. scale     claim latency at 10k / 1M / 10M rows, progress latency of a 1M-chunk job,
             one job versus many (bench/scale.py);
6. memory    resident memory of the pool's supervisor and workers, sampled during (2).

Throughput runs alternate between the systems, repeat after repeat, so drift in
the machine hits all of them alike; tables show medians with min-max, and ratios
are taken between medians of the same run. The targets of docs/benchmarks.md are
checked at the end. --quick runs everything small, once (CI runs it so it cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from bench import peers
from bench.ceiling import ceiling_rate
from bench.common import Drain, Summary, bench_database, server_line, table
from bench.pool import drain
from bench.scale import claim_latency, enqueue_rate, grow_to, one_job_versus_many, progress_latency
from chunkq.embedded import embedded_server

#: Chunks per claim: single-chunk mode, then batched mode with PGQueuer's documented
#: batch size (10), then with batches ten times larger.
BATCHES = (1, 10, 100)
PGQUEUER_BATCHES = (10, 100)


@dataclass(frozen=True)
class Plan:
    chunks: int  # per throughput run, for every system
    repeats: int
    clients: tuple[int, ...]  # pgbench clients
    processes: tuple[int, ...]  # pool processes
    enqueue: tuple[int, ...]  # chunks per job
    rows: tuple[int, ...]  # table sizes for claim latency
    claims: int  # claims timed per table size
    progress_chunks: int
    contention_chunks: int


FULL = Plan(
    chunks=50_000,
    repeats=3,
    clients=(1, 2, 4, 8),
    processes=(1, 2, 4),
    enqueue=(2_000, 200_000),
    rows=(10_000, 1_000_000, 10_000_000),
    claims=2_000,
    progress_chunks=1_000_000,
    contention_chunks=4_000,
)
QUICK = Plan(
    chunks=1_000,
    repeats=1,
    clients=(2,),
    processes=(2,),
    enqueue=(2_000, 20_000),
    rows=(5_000, 10_000),
    claims=200,
    progress_chunks=10_000,
    contention_chunks=400,
)


class Results:
    """Measurements by key, e.g. ("pool", 10, 4) -> chunks/s of each repeat."""

    def __init__(self) -> None:
        self.values: dict[tuple[object, ...], list[float]] = defaultdict(list)

    def add(self, key: tuple[object, ...], value: float) -> float:
        self.values[key].append(value)
        print(f"    {' '.join(map(str, key))}: {value:,.3f}", flush=True)  # kept even if the run dies
        return value

    def __getitem__(self, key: tuple[object, ...]) -> Summary:
        return Summary.of(self.values[key])

    def median(self, key: tuple[object, ...]) -> float:
        return self[key].median

    def __contains__(self, key: tuple[object, ...]) -> bool:
        return key in self.values

    def add_drain(self, key: tuple[object, ...], drain: Drain) -> None:
        """A drain's rate under ``key``, its CPU per job under ("cpu worker", *key), ("cpu postgres", *key)."""
        self.add(key, drain.rate)
        self.add(("cpu worker", *key), drain.worker_cpu_ms)
        if drain.postgres_cpu_ms is not None:
            self.add(("cpu postgres", *key), drain.postgres_cpu_ms)


def processes(n: int) -> str:
    return f"{n} process" + ("es" if n > 1 else "")


def throughput(admin: str, plan: Plan, with_peers: bool, results: Results) -> None:
    with bench_database(admin) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        for repeat in range(plan.repeats):
            print(f"  throughput, repeat {repeat + 1} of {plan.repeats}", flush=True)
            for batch in BATCHES:
                for clients in plan.clients:
                    results.add(("ceiling", batch, clients), ceiling_rate(dsn, conn, batch, clients, plan.chunks))
                for processes in plan.processes:
                    run = drain(dsn, conn, processes, batch, plan.chunks)
                    results.add_drain(("pool", batch, processes), run.drain)
                    results.add(("supervisor MB",), run.supervisor_mb)
                    results.add(("worker MB",), run.worker_mb)
            if with_peers:
                for batch in PGQUEUER_BATCHES:
                    results.add_drain(("pgqueuer", batch), peers.drain_rate("pgqueuer", admin, plan.chunks, batch))
                results.add_drain(("procrastinate",), peers.drain_rate("procrastinate", admin, plan.chunks))


def enqueue(admin: str, plan: Plan, with_peers: bool, results: Results) -> None:
    with bench_database(admin) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(plan.repeats):
            for chunks in plan.enqueue:
                results.add(("enqueue", "chunkq", chunks), enqueue_rate(conn, chunks))
                if with_peers:
                    for peer in peers.PEERS:
                        results.add(("enqueue", peer, chunks), peers.enqueue_rate(peer, admin, chunks))


def scale(admin: str, plan: Plan, results: Results) -> None:
    with bench_database(admin) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        for rows in plan.rows:  # first, while the table holds nothing else
            print(f"  claim latency at {rows:,} rows", flush=True)
            grow_to(conn, rows)
            p50, p99 = claim_latency(conn, plan.claims)
            results.add(("claim p50", rows), p50)
            results.add(("claim p99", rows), p99)
        for _ in range(plan.repeats):
            one, many = one_job_versus_many(dsn, conn, 4, plan.contention_chunks)
            results.add(("contention", "one job"), one)
            results.add(("contention", "4 jobs"), many)
        for fraction, ms in progress_latency(conn, plan.progress_chunks).items():
            results.add(("progress", fraction), ms)


def report(plan: Plan, with_peers: bool, r: Results) -> None:
    rows = []
    for batch in BATCHES:
        for n in sorted(set(plan.clients) | set(plan.processes)):
            ceiling, pool = ("ceiling", batch, n), ("pool", batch, n)
            rows.append(
                [
                    f"{batch} per claim",
                    str(n),
                    f"{r[ceiling]}" if ceiling in r else "",
                    f"{r[pool]}" if pool in r else "",
                    f"{r.median(pool) / r.median(ceiling):.2f}" if pool in r and ceiling in r else "",
                ]
            )
    table(
        f"Throughput: chunks claimed and completed per second, {plan.chunks:,} chunks per run",
        ["chunks per claim", "clients / processes", "pgbench ceiling", "chunkq pool", "pool / ceiling"],
        rows,
    )

    best = max((r.median(("pool", b, n)), b, n) for b in BATCHES[1:] for n in plan.processes)
    versions = peers.peer_versions() if with_peers else {}
    drained: list[tuple[str, tuple[object, ...]]] = [
        (f"chunkq pool, batches of {b}, {processes(n)}", ("pool", b, n)) for b in BATCHES for n in plan.processes
    ]
    if with_peers:
        drained += [
            (f"pgqueuer {versions['pgqueuer']}, batches of {b}, {processes(peers.PROCESSES)}", ("pgqueuer", b))
            for b in PGQUEUER_BATCHES
        ]
        drained += [
            (
                f"procrastinate {versions['procrastinate']}, {processes(peers.PROCESSES)}"
                f" × concurrency {peers.CONCURRENCY}",
                ("procrastinate",),
            )
        ]

    def cpu(kind: str, key: tuple[object, ...]) -> str:
        return f"{r[(kind, *key)]:.3f}" if (kind, *key) in r else "n/a"

    table(
        f"Drains: {plan.chunks:,} no-op jobs (chunks) per run; CPU per job from the enqueue to the empty queue",
        ["system", "jobs/s", "best batched chunkq / this", "worker CPU ms/job", "Postgres CPU ms/job"],
        [
            [name, f"{r[key]}", f"{best[0] / r.median(key):.2f}", cpu("cpu worker", key), cpu("cpu postgres", key)]
            for name, key in drained
        ],
    )

    systems = ["chunkq", *(peers.PEERS if with_peers else ())]
    table(
        "Enqueue: chunks (jobs) created per second, bulk",
        ["chunks per job", *systems],
        [[f"{n:,}", *(f"{r[('enqueue', s, n)]}" for s in systems)] for n in plan.enqueue],
    )

    table(
        "Scale",
        ["measurement", "value"],
        [
            *(
                [
                    f"claim latency at {n:,} rows, p50 / p99 (ms)",
                    f"{r.median(('claim p50', n)):.2f} / {r.median(('claim p99', n)):.2f}",
                ]
                for n in plan.rows
            ),
            *(
                [
                    f"job_progress of a {plan.progress_chunks:,}-chunk job at {f:.0%} (ms, median)",
                    f"{r.median(('progress', f)):.3f}",
                ]
                for f in (0.0, 0.5, 0.99)
            ),
            ["completions/s, 4 processes on one job", f"{r[('contention', 'one job')]}"],
            ["completions/s, 4 processes on 4 jobs", f"{r[('contention', '4 jobs')]}"],
        ],
    )
    table(
        "Memory: peak resident set during the pool runs",
        ["process", "MB"],
        [["supervisor", f"{r[('supervisor MB',)]:.1f}"], ["worker (largest)", f"{r[('worker MB',)]:.1f}"]],
    )

    targets: list[tuple[str, float, str, Callable[[float], bool]]] = []
    if 4 in plan.clients and 4 in plan.processes:
        targets.append(
            (
                "single-chunk pool at 4 processes / pgbench two-transaction ceiling at 4 clients",
                r.median(("pool", 1, 4)) / r.median(("ceiling", 1, 4)),
                "≥ 1.0",
                lambda x: x >= 1.0,
            )
        )
    if with_peers:
        pgqueuer = max(r.median(("pgqueuer", b)) for b in PGQUEUER_BATCHES)
        targets.append(
            (
                f"batched pool (best: batches of {best[1]}, {processes(best[2])}) / PGQueuer (best)",
                best[0] / pgqueuer,
                "≥ 2.0",
                lambda x: x >= 2.0,
            )
        )
    low, high = min(plan.rows), max(plan.rows)
    targets += [
        (
            f"claim p50 at {high:,} rows / at {low:,} rows",
            r.median(("claim p50", high)) / r.median(("claim p50", low)),
            "≤ 1.5",
            lambda x: x <= 1.5,
        ),
        (
            f"slowest job_progress of a {plan.progress_chunks:,}-chunk job (ms)",
            max(r.median(("progress", f)) for f in (0.0, 0.5, 0.99)),
            "< 10",
            lambda x: x < 10,
        ),
        (
            f"create_chunks, {max(plan.enqueue):,}-chunk job (chunks/s)",
            r.median(("enqueue", "chunkq", max(plan.enqueue))),
            "≥ 100,000",
            lambda x: x >= 100_000,
        ),
        ("worker resident memory (MB)", r[("worker MB",)].high, "< 60", lambda x: x < 60),
    ]
    table(
        "Targets",
        ["target", "measured", "goal", "met"],
        [
            [name, f"{value:,.0f}" if value >= 1000 else f"{value:.2f}", goal, "met" if ok(value) else "**missed**"]
            for name, value, goal, ok in targets
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="chunkq's benchmark against its ceiling and its peers")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("CHUNKQ_DSN"),
        help="admin DSN of the server (default: $CHUNKQ_DSN, else an embedded PostgreSQL)",
    )
    parser.add_argument("--quick", action="store_true", help="everything small and once: a smoke test")
    parser.add_argument("--repeats", type=int, help="repeats of each throughput measurement (default 3)")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="leave PGQueuer and procrastinate out")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.repeats:
        plan = Plan(**{**plan.__dict__, "repeats": args.repeats})
    if args.peers:
        peers.peer_versions()  # fails early, saying what to install
    results = Results()
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(embedded_server())
        print(f"{server_line(admin)}; {platform.python_implementation()} {platform.python_version()}", flush=True)
        throughput(admin, plan, args.peers, results)
        enqueue(admin, plan, args.peers, results)
        scale(admin, plan, results)
    report(plan, args.peers, results)


if __name__ == "__main__":
    main()
