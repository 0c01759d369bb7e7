"""Workers shaped for I/O (issue 16), every measurement side by side in one run.

    python -m bench.io [--dsn DSN] [--quick] [--seconds 60] [--repeats 3] [--baseline 28e461d]

1. io          an I/O-bound crawl: a handler that waits 0.5 s per chunk and uses no CPU
               (workers.sample:io_wait, async; io_sleep, plain). For --seconds after a warm-up: the
               chunks completed per second, the most server connections at once besides the
               supervisor's LISTEN one, the peak resident memory of each worker process, for
               a. chunkq, --processes 2 --concurrency 100, io_wait;
               b. chunkq one chunk per process (--concurrency 1, io_sleep) with as many processes as fit in
                  the same memory budget, 2 x 80 MB (a worker's size is measured first);
               c. procrastinate, 2 processes x --concurrency 100, the same await as a task.
2. no regression  the no-op drains of bench.pool at batches of 1, 10 and 100 (--concurrency 1), this
               checkout against --baseline (28e461d, before the worker rewrite), alternating (bench.versus).
3. checkpoints a 500-image chunk, about 50 ms an image, a checkpoint after each; its worker is killed (-9)
               at image 450: how many images the retry does (its handler's record), and job_progress's
               images_completed, sampled throughout, against the images really done by then.
4. pgbouncer   8 processes x --concurrency 50 drain a 20,000-chunk job (async no-op handler) through
               PgBouncer (transaction mode, default_pool_size 10, started here), and directly, alternating:
               chunks/s, exactly once (every chunk completed by its first attempt, no error), the most
               server connections at once; and what an idle pool polling through PgBouncer costs.

--quick runs all of it tiny, in seconds (CI runs it so that it cannot rot; its figures mean nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bench import peers, versus
from bench.common import (
    CpuMeter,
    Summary,
    bench_database,
    children,
    cpu_seconds,
    new_job,
    one,
    parser,
    postgres_pids,
    server_line,
    table,
    vacuum_queue,
    wait_for_connections,
)
from bench.pool import rss_mb
from chunkq.embedded import embedded_server
from chunkq.sync import JobChunkRepository
from chunkq.testing import Bouncer, other_connections, pgbouncer

ROOT = Path(__file__).resolve().parents[1]
IO_SECONDS = 0.5  # per chunk, as the issue gives it
IO_PROCESSES, IO_CONCURRENCY = 2, 100
WORKER_BUDGET_MB = 80.0  # per worker process, the target
BOUNCER_PROCESSES, BOUNCER_CONCURRENCY, BOUNCER_POOL = 8, 50, 10
BATCHES = [1, 10, 100]
IMAGES, KILL_AT = 500, 450  # the checkpointed chunk, and the image its first attempt is killed at


@dataclass(frozen=True)
class Plan:
    seconds: float  # measured, per I/O run
    warmup: float  # before that
    repeats: int  # of the drains (sections 2 and 4)
    versus_chunks: int
    versus_processes: int
    bouncer_chunks: int
    image_seconds: float  # the checkpointed handler's time per image


FULL = Plan(60, 5, 3, 20_000, 4, 20_000, 0.05)
QUICK = Plan(2, 0.5, 1, 500, 2, 1_000, 0.005)


# ---------------------------------------------------------------------------
# Processes and what they use
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def started(command: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A process group of ours, stopped (SIGTERM, then SIGKILL after a minute) when the block ends."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        try:
            yield proc
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{command[2]} exited early:\n{log.read().decode()[-2000:]}")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def pool(dsn: str, *options: str, env: dict[str, str] | None = None) -> contextlib.AbstractContextManager[Any]:
    """This checkout's worker pool on ``dsn``."""
    command = [sys.executable, "-m", "workers", "--dsn", dsn, "--log-level", "warning", "--poll", "0.2", *options]
    return started(command, env)


class Sampler(threading.Thread):
    """Every 0.2 s, the server connections to the database of ``dsn`` (besides the sampler's own, ``ignore``d
    backends and a pool supervisor's LISTEN connection) and the resident memory of the processes ``pids()``
    names; keeps the peaks."""

    def __init__(self, dsn: str, pids: Callable[[], list[int]], ignore: list[int]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.pids, self.ignore = dsn, pids, ignore
        self.connections = 0
        self.rss: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while True:
                others = other_connections(conn, self.ignore)
                count = sum(1 for _, name in others if not name.startswith("chunkq supervisor "))
                self.connections = max(self.connections, count)
                for pid in self.pids():
                    self.rss[pid] = max(self.rss.get(pid, 0.0), rss_mb(pid))
                if self.done.wait(0.2):
                    return

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def server_now(conn: psycopg.Connection[Any]) -> Any:
    return one(conn, "SELECT clock_timestamp()")[0]


def measured_window(conn: psycopg.Connection[Any], plan: Plan) -> tuple[Any, Any]:
    """Waits out plan.warmup, then plan.seconds: the server's clock at the start and the end of the second wait."""
    time.sleep(plan.warmup)
    start = server_now(conn)
    time.sleep(plan.seconds)
    return start, server_now(conn)


class Results:
    """Every value measured, by key; printed as it comes so that a run that dies keeps them."""

    def __init__(self) -> None:
        self.values: dict[tuple[object, ...], list[float]] = defaultdict(list)

    def add(self, *key_and_value: Any) -> None:
        *key, value = key_and_value
        self.values[tuple(key)].append(float(value))
        print(f"    {' / '.join(map(str, key))}: {value:,.2f}", flush=True)

    def __getitem__(self, key: tuple[object, ...]) -> Summary:
        return Summary.of(self.values[key])

    def median(self, *key: object) -> float:
        return self[key].median


# ---------------------------------------------------------------------------
# 1. The I/O-bound crawl
# ---------------------------------------------------------------------------


def chunkq_sustained(dsn: str, plan: Plan, processes: int, concurrency: int, handler: str) -> tuple[float, Sampler]:
    """Chunks/s completed by a pool over plan.seconds after plan.warmup, with its peaks."""
    env = {"CHUNKQ_SAMPLE_SECONDS": str(IO_SECONDS)}
    options = ["--handler", handler, "--processes", str(processes), "--concurrency", str(concurrency)]
    with psycopg.connect(dsn, autocommit=True) as conn, pool(dsn, *options, env=env) as proc:
        vacuum_queue(conn)
        wait_for_connections(conn, processes + 1)  # connected, idle, the supervisor LISTENing
        # Enough work for the whole run at the rate the slots allow.
        chunks = int(processes * concurrency / IO_SECONDS * (plan.warmup + plan.seconds) * 1.2) + 100
        with Sampler(dsn, lambda: children(proc.pid), [conn.info.backend_pid]) as sampled:
            job_id = new_job(conn, chunks, chunk_size=1)
            start, end = measured_window(conn, plan)
        (done,) = one(
            conn,
            "SELECT count(*) FROM chunkq.job_chunks WHERE job_id = %s AND status = 'completed'"
            " AND finished_at >= %s AND finished_at < %s",
            (job_id, start, end),
        )
        conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    return done / (end - start).total_seconds(), sampled


def worker_mb(dsn: str) -> float:
    """Peak resident memory of one worker running one plain io_sleep chunk at a time, over a few seconds."""
    with psycopg.connect(dsn, autocommit=True) as conn, pool(dsn, "--handler", "workers.sample:io_sleep") as proc:
        wait_for_connections(conn, 2)
        with Sampler(dsn, lambda: children(proc.pid), [conn.info.backend_pid]) as sampled:
            job_id = new_job(conn, 20, chunk_size=1)
            time.sleep(4)
        conn.execute("SELECT chunkq.cancel_job(%s)", (job_id,))
    return max(sampled.rss.values())


def procrastinate_sustained(admin: str, plan: Plan) -> tuple[float, Sampler]:
    """procrastinate's jobs/s over plan.seconds after plan.warmup, 2 processes x concurrency 100, io_wait."""
    with peers.fresh_database(admin) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        asyncio.run(peers.install_procrastinate(dsn))
        command = [
            sys.executable,
            "-m",
            "procrastinate",
            "--app",
            "bench.peers.procrastinate_io_app",
            "--log-level",
            "warning",
            "worker",
            "--concurrency",
            str(IO_CONCURRENCY),
        ]
        env = {peers.DSN_ENV: dsn, "CHUNKQ_SAMPLE_SECONDS": str(IO_SECONDS)}
        with contextlib.ExitStack() as stack:
            procs = [stack.enter_context(started(command, env)) for _ in range(IO_PROCESSES)]
            wait_for_connections(conn, IO_PROCESSES * peers.IO_POOL_SIZE)
            jobs = int(IO_PROCESSES * IO_CONCURRENCY / IO_SECONDS * (plan.warmup + plan.seconds) * 1.2) + 100
            with Sampler(dsn, lambda: [p.pid for p in procs], [conn.info.backend_pid]) as sampled:
                asyncio.run(peers.enqueue_procrastinate_io(dsn, jobs))
                start, end = measured_window(conn, plan)
            (done,) = one(
                conn,
                "SELECT count(*) FROM procrastinate_events WHERE type = 'succeeded' AND at >= %s AND at < %s",
                (start, end),
            )
    return done / (end - start).total_seconds(), sampled


def io_section(admin: str, plan: Plan, results: Results) -> int:
    """Section 1; returns how many one-chunk processes fit the budget."""

    def record(key: str, rate: float, sampled: Sampler) -> None:
        results.add("io", key, "chunks/s", rate)
        results.add("io", key, "connections", sampled.connections)
        results.add("io", key, "worker MB", max(sampled.rss.values()))

    print(f"\n1. An I/O-bound crawl, {IO_SECONDS} s per chunk, {plan.seconds:.0f} s measured", flush=True)
    with bench_database(admin) as dsn:
        record("chunkq async", *chunkq_sustained(dsn, plan, IO_PROCESSES, IO_CONCURRENCY, "workers.sample:io_wait"))
        record("chunkq threads", *chunkq_sustained(dsn, plan, IO_PROCESSES, IO_CONCURRENCY, "workers.sample:io_sleep"))
        one_worker = worker_mb(dsn)
        fit = max(1, int(IO_PROCESSES * WORKER_BUDGET_MB // one_worker))
        results.add("io", "one worker at concurrency 1", "MB", one_worker)
        record("chunkq one per process", *chunkq_sustained(dsn, plan, fit, 1, "workers.sample:io_sleep"))
    record("procrastinate", *procrastinate_sustained(admin, plan))
    return fit


# ---------------------------------------------------------------------------
# 3. Checkpoints
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Resumed:
    retry_images: int  # images the second attempt processed
    retry_first: int  # the first of them
    redone: int  # images both attempts processed
    covered: bool  # every image processed by one attempt or the other
    most_counted: int  # the largest images_completed seen
    over_counted: int  # samples where images_completed exceeded the images really done by then
    samples: int


def checkpoints(admin: str, plan: Plan) -> Resumed:
    with (
        bench_database(admin) as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
        tempfile.TemporaryDirectory() as tmp,
    ):
        marks = Path(tmp) / "marks"
        marks.touch()
        job_id = new_job(conn, 1, chunk_size=IMAGES)
        env = {"CHUNKQ_TEST_SLEEP": str(plan.image_seconds), "CHUNKQ_TEST_MARK": str(marks)}
        options = ["--handler", "tests.helpers.handlers:checkpointing", "--processes", "1"]
        with pool(dsn, *options, "--lease", "2", "--heartbeat", "0.5", env=env) as proc:

            def done() -> list[tuple[int, int]]:
                return [(int(a), int(i)) for _, a, i in (line.split() for line in marks.read_text().splitlines())]

            most = over = samples = 0
            killed = False
            while True:
                (counted, open_chunks) = one(
                    conn,
                    "SELECT images_completed, pending_chunks + processing_chunks FROM chunkq.job_progress(%s)",
                    (job_id,),
                )
                really = len({image for _, image in done()})  # read after: at least what the counter could see
                most, over, samples = max(most, counted), over + (counted > really), samples + 1
                if not open_chunks:
                    break
                if not killed and really >= KILL_AT:
                    for worker in children(proc.pid):
                        os.kill(worker, signal.SIGKILL)
                    killed = True
                time.sleep(0.02)
        by_attempt: dict[int, list[int]] = defaultdict(list)
        for attempt, image in done():
            by_attempt[attempt].append(image)
        first, retry = by_attempt[1], by_attempt[2]
    return Resumed(
        retry_images=len(retry),
        retry_first=min(retry, default=-1),
        redone=len(set(first) & set(retry)),
        covered=set(first) | set(retry) == set(range(IMAGES)),
        most_counted=most,
        over_counted=over,
        samples=samples,
    )


# ---------------------------------------------------------------------------
# 4. Through PgBouncer
# ---------------------------------------------------------------------------

SIDES = {
    "direct, LISTEN and prepared statements (the default)": (False, []),
    "direct, --no-listen": (False, ["--no-listen"]),
    "PgBouncer, --no-listen": (True, ["--no-listen"]),
}


@dataclass(frozen=True)
class BouncedDrain:
    rate: float
    exactly_once: bool
    connections: int  # most server connections at once, besides a LISTEN one
    clients: int  # connections of the pool's workers to the database (through PgBouncer: to it)
    worker_cpu_ms: float
    server_cpu_ms: float | None
    bouncer_cpu_ms: float | None


def bounced_drain(dsn: str, bouncer: Bouncer, through: bool, options: list[str], chunks: int) -> BouncedDrain:
    dbname = str(conninfo_to_dict(dsn)["dbname"])
    target = bouncer.dsn(dbname) if through else dsn
    listens = "--no-listen" not in options
    with psycopg.connect(dsn, autocommit=True) as conn:
        vacuum_queue(conn)
        job_id = new_job(conn, chunks, chunk_size=1, split=False)
        args = ["--handler", "workers.sample:io_wait", "--processes", str(BOUNCER_PROCESSES)]
        args += ["--concurrency", str(BOUNCER_CONCURRENCY), *options]
        with pool(target, *args, env={"CHUNKQ_SAMPLE_SECONDS": "0"}) as proc:
            if through:  # an idle client of PgBouncer holds no server connection: count its clients
                clients = wait_for_clients(bouncer, dbname, BOUNCER_PROCESSES)
            else:
                wait_for_connections(conn, BOUNCER_PROCESSES + listens)
                clients = BOUNCER_PROCESSES
            meter = CpuMeter(conn, lambda: [proc.pid, *children(proc.pid)])
            bouncer_cpu = cpu_seconds([bouncer.pid]).get(bouncer.pid, 0.0)
            with Sampler(dsn, list, [conn.info.backend_pid]) as sampled:
                meter.start()
                JobChunkRepository(conn).create_for_job(job_id)
                while one(conn, "SELECT pending_chunks + processing_chunks FROM chunkq.job_progress(%s)", (job_id,))[0]:
                    if proc.poll() is not None:
                        raise RuntimeError("the pool exited early")
                    time.sleep(0.05)
                seconds, completed, first, last, errors = one(
                    conn,
                    "SELECT extract(epoch FROM max(finished_at) - min(claimed_at)),"
                    " count(*) FILTER (WHERE status = 'completed'), min(attempt), max(attempt),"
                    " (SELECT count(*) FROM chunkq.chunk_errors e WHERE e.job_id = c.job_id)"
                    " FROM chunkq.job_chunks c WHERE job_id = %s GROUP BY job_id",
                    (job_id,),
                )
                measured = meter.stop(chunks / float(seconds), chunks)
            bouncer_cpu = cpu_seconds([bouncer.pid]).get(bouncer.pid, 0.0) - bouncer_cpu
    return BouncedDrain(
        rate=measured.rate,
        exactly_once=(completed, first, last, errors) == (chunks, 1, 1, 0),
        connections=sampled.connections,
        clients=clients,
        worker_cpu_ms=measured.worker_cpu_ms,
        server_cpu_ms=measured.postgres_cpu_ms,
        bouncer_cpu_ms=bouncer_cpu / chunks * 1000 if through else None,
    )


def wait_for_clients(bouncer: Bouncer, dbname: str, at_least: int, timeout: float = 60.0) -> int:
    """Until ``at_least`` clients are connected to ``dbname`` through the bouncer and their number held still
    for a second; how many."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = bouncer.clients(dbname)
        if count != last:
            last, since = count, time.monotonic()
        elif count >= at_least and time.monotonic() - since >= 1.0:
            return count
        time.sleep(0.1)
    raise RuntimeError(f"the workers did not connect to PgBouncer: {last} clients after {timeout:.0f} s")


IDLE_POLL = 0.1  # seconds: idle workers poll this often in the idle measurement


def idle_polling(dsn: str, bouncer: Bouncer, seconds: float) -> tuple[float, float | None]:
    """An idle pool through PgBouncer (--no-listen, nothing to claim) polling every IDLE_POLL seconds: worker
    CPU and the CPU of the database's server backends (PgBouncer's), per poll, in ms. A poll is a claim that finds
    nothing, then claimable_in. Only this database's backends are counted: the signal is small, and other
    databases of the server may be busy."""
    dbname = str(conninfo_to_dict(dsn)["dbname"])
    options = ["--handler", "workers.sample:noop", "--processes", str(BOUNCER_PROCESSES), "--no-listen"]
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pool(bouncer.dsn(dbname), *options, "--poll", str(IDLE_POLL)) as proc,
    ):

        def backends() -> list[int]:
            return [pid for pid, _ in other_connections(conn)]

        vacuum_queue(conn)  # the drains' dead index entries would make every empty claim step over them
        wait_for_clients(bouncer, dbname, BOUNCER_PROCESSES)
        time.sleep(1)  # PgBouncer's server connections opened
        workers = [proc.pid, *children(proc.pid)]
        before = cpu_seconds(workers), cpu_seconds(backends())
        time.sleep(seconds)
        after = cpu_seconds(workers), cpu_seconds(backends())
        local = postgres_pids(conn) is not None
    polls = BOUNCER_PROCESSES * seconds / IDLE_POLL
    worker_cpu, server_cpu = (
        sum(now - then.get(pid, 0.0) for pid, now in end.items()) for end, then in zip(after, before, strict=True)
    )
    return worker_cpu / polls * 1000, server_cpu / polls * 1000 if local else None


def bouncer_section(admin: str, plan: Plan, results: Results) -> None:
    print(
        f"\n4. {BOUNCER_PROCESSES} processes x --concurrency {BOUNCER_CONCURRENCY} drain"
        f" {plan.bouncer_chunks:,} chunks, through PgBouncer (default_pool_size {BOUNCER_POOL}) and directly",
        flush=True,
    )
    # A database for each way in: PgBouncer keeps its idle server connections open between runs, which the
    # direct runs would otherwise count as theirs.
    with (
        bench_database(admin) as direct,
        bench_database(admin) as bounced,
        pgbouncer(admin, pool_size=BOUNCER_POOL) as bouncer,
    ):
        for _ in range(plan.repeats):
            for side, (through, options) in SIDES.items():
                run = bounced_drain(bounced if through else direct, bouncer, through, options, plan.bouncer_chunks)
                results.add("bouncer", side, "chunks/s", run.rate)
                results.add("bouncer", side, "exactly once", run.exactly_once)
                results.add("bouncer", side, "connections", run.connections)
                results.add("bouncer", side, "clients", run.clients)
                results.add("bouncer", side, "worker CPU", run.worker_cpu_ms)
                if run.server_cpu_ms is not None:
                    results.add("bouncer", side, "server CPU", run.server_cpu_ms)
                if run.bouncer_cpu_ms is not None:
                    results.add("bouncer", side, "bouncer CPU", run.bouncer_cpu_ms)
        worker, server = idle_polling(bounced, bouncer, max(2.0, plan.seconds / 3))
        results.add("idle", "worker CPU per poll", worker)
        if server is not None:
            results.add("idle", "server CPU per poll", server)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def report(plan: Plan, fit: int, samples: versus.Samples, resumed: Resumed, r: Results) -> None:
    slots = IO_PROCESSES * IO_CONCURRENCY / IO_SECONDS  # chunks/s the slots allow at best
    io_rows = [
        (
            f"chunkq, {IO_PROCESSES} processes × --concurrency {IO_CONCURRENCY}, async io_wait",
            "chunkq async",
            slots,
        ),
        (
            f"chunkq, {IO_PROCESSES} processes × --concurrency {IO_CONCURRENCY}, plain io_sleep in threads",
            "chunkq threads",
            slots,
        ),
        (
            f"chunkq, {fit} processes × --concurrency 1 (the same memory budget), plain io_sleep",
            "chunkq one per process",
            fit / IO_SECONDS,
        ),
        (
            f"procrastinate {peers.peer_versions()['procrastinate']}, {IO_PROCESSES} processes ×"
            f" --concurrency {IO_CONCURRENCY}, pool of {peers.IO_POOL_SIZE} each",
            "procrastinate",
            slots,
        ),
    ]
    table(
        f"1. I/O-bound crawl: {IO_SECONDS} s per chunk, no CPU; chunks completed per second over {plan.seconds:g} s"
        f" after {plan.warmup:g} s",
        ["system", "chunks/s", "of what its slots allow", "server connections (besides LISTEN)", "worker RSS MB"],
        [
            [
                name,
                f"{r.median('io', key, 'chunks/s'):,.1f}",
                f"{r.median('io', key, 'chunks/s') / allowed:.0%}",
                f"{r.median('io', key, 'connections'):.0f}",
                f"{r.median('io', key, 'worker MB'):.1f}",
            ]
            for name, key, allowed in io_rows
        ],
    )
    print(
        f"\none worker at --concurrency 1: {r.median('io', 'one worker at concurrency 1', 'MB'):.1f} MB;"
        f" {IO_PROCESSES} × {WORKER_BUDGET_MB:.0f} MB hold {fit} of them"
    )

    print("\n### 2. No regression: no-op drains, --concurrency 1")
    versus.report(samples, BATCHES)
    this, base = versus.sides_of(samples)
    ratios = {
        b: Summary.of(samples[("chunks/s", this, b)]).median / Summary.of(samples[("chunks/s", base, b)]).median
        for b in BATCHES
    }

    table(
        f"3. Checkpoints: a {IMAGES}-image chunk, {plan.image_seconds * 1000:.0f} ms an image,"
        f" killed at image {KILL_AT}",
        ["measurement", "value"],
        [
            ["images the retry processed", f"{resumed.retry_images}"],
            ["its first image", f"{resumed.retry_first}"],
            ["images processed twice", f"{resumed.redone}"],
            ["every image processed", "yes" if resumed.covered else "**no**"],
            ["largest images_completed seen", f"{resumed.most_counted} of {IMAGES}"],
            [f"samples counting more images than done (of {resumed.samples})", f"{resumed.over_counted}"],
        ],
    )

    def cpu(side: str, what: str) -> str:
        return f"{r[('bouncer', side, what)]:.3f}" if ("bouncer", side, what) in r.values else "n/a"

    rows = []
    for side in SIDES:
        rows.append(
            [
                side,
                f"{r[('bouncer', side, 'chunks/s')]}",
                f"{r.median('bouncer', side, 'chunks/s') / r.median('bouncer', next(iter(SIDES)), 'chunks/s'):.2f}",
                "yes" if min(r.values[("bouncer", side, "exactly once")]) else "**no**",
                f"{max(r.values[('bouncer', side, 'clients')]):.0f}",
                f"{max(r.values[('bouncer', side, 'connections')]):.0f}",
                cpu(side, "worker CPU"),
                cpu(side, "server CPU"),
                cpu(side, "bouncer CPU"),
            ]
        )
    table(
        f"4. {BOUNCER_PROCESSES} processes × --concurrency {BOUNCER_CONCURRENCY}, async no-op, drains of"
        f" {plan.bouncer_chunks:,} chunks",
        [
            "connection",
            "chunks/s",
            "/ the default",
            "exactly once",
            "worker connections",
            "server connections (most)",
            "worker CPU ms/chunk",
            "server CPU ms/chunk",
            "PgBouncer CPU ms/chunk",
        ],
        rows,
    )

    if ("idle", "server CPU per poll") in r.values:  # the server runs on this machine (its CPU is read from /proc)
        print(
            f"\nan idle pool through PgBouncer, {BOUNCER_PROCESSES} processes polling every {IDLE_POLL} s"
            f" (--no-listen): {r.median('idle', 'server CPU per poll'):.3f} ms of server CPU per poll (a claim that"
            f" finds nothing, then claimable_in); each idle worker process used"
            f" {r.median('idle', 'worker CPU per poll') / IDLE_POLL / 1000:.1%} of a core"
        )

    bounced = "PgBouncer, --no-listen"
    targets: list[tuple[str, str, str, bool]] = [
        (
            "I/O crawl, 2 × 100, chunks/s sustained",
            f"{r.median('io', 'chunkq async', 'chunks/s'):,.1f}",
            "≥ 300",
            r.median("io", "chunkq async", "chunks/s") >= 300,
        ),
        (
            "server connections besides the LISTEN one",
            f"{max(r.values[('io', 'chunkq async', 'connections')]):.0f}",
            "≤ 4",
            max(r.values[("io", "chunkq async", "connections")]) <= 4,
        ),
        (
            "worker RSS, each",
            f"{max(r.values[('io', 'chunkq async', 'worker MB')]):.1f} MB",
            "< 80 MB",
            max(r.values[("io", "chunkq async", "worker MB")]) < 80,
        ),
        *(
            (f"no-op drain at batch {b}, this / 28e461d", f"{ratios[b]:.3f}", "≥ 0.90", ratios[b] >= 0.9)
            for b in BATCHES
        ),
        ("images the retry processed", f"{resumed.retry_images}", "≤ 60", 0 < resumed.retry_images <= 60),
        (
            "an image counted twice by progress",
            f"{resumed.over_counted} of {resumed.samples} samples; most {resumed.most_counted}",
            "never",
            resumed.over_counted == 0 and resumed.most_counted <= IMAGES and resumed.covered,
        ),
        (
            f"PgBouncer drain of {plan.bouncer_chunks:,} exactly once",
            "yes" if min(r.values[("bouncer", bounced, "exactly once")]) else "no",
            "yes",
            bool(min(r.values[("bouncer", bounced, "exactly once")])),
        ),
        (
            "server connections through PgBouncer",
            f"{max(r.values[('bouncer', bounced, 'connections')]):.0f}",
            f"≤ {BOUNCER_POOL}",
            max(r.values[("bouncer", bounced, "connections")]) <= BOUNCER_POOL,
        ),
    ]
    table(
        "Targets",
        ["target", "measured", "goal", "met"],
        [[name, value, goal, "met" if ok else "**missed**"] for name, value, goal, ok in targets],
    )


def main() -> None:
    p = parser("workers shaped for I/O: every measurement of issue 16, side by side")
    p.set_defaults(repeats=None)  # None: the plan's (3, or 1 with --quick)
    p.add_argument("--quick", action="store_true", help="everything tiny (seconds): a smoke test")
    p.add_argument("--seconds", type=float, help="seconds measured per I/O run (default 60)")
    p.add_argument("--baseline", default="28e461d", help="the commit the no-op drains compare with")
    args = p.parse_args()
    plan = QUICK if args.quick else FULL
    if args.seconds:
        plan = replace(plan, seconds=args.seconds)
    if args.repeats:
        plan = replace(plan, repeats=args.repeats)
    peers.peer_versions()  # fails early, saying what to install
    results = Results()
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(embedded_server())
        print(f"{server_line(admin)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
        fit = io_section(admin, plan, results)
        print(f"\n2. No-op drains, batches {BATCHES}, this checkout against {args.baseline}", flush=True)
        samples = versus.compare(admin, args.baseline, BATCHES, plan.repeats, plan.versus_chunks, plan.versus_processes)
        print("\n3. Checkpoints", flush=True)
        resumed = checkpoints(admin, plan)
        bouncer_section(admin, plan, results)
    report(plan, fit, samples, resumed, results)


if __name__ == "__main__":
    main()
