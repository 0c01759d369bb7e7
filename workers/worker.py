"""One worker process: claim chunks, run the handler on each, report the outcome.

The loop: claim (up to --batch chunks) -> for each, run the handler while the
LeaseKeeper heartbeats -> a failure is reported at once (retried with backoff
unless DoNotRetry), a completion is held back -> the held-back completions and
the next claim go in one call (complete_and_claim: one round trip, one commit).
A completion is held back only while more chunks as quick as the last one would
fit in FLUSH_AFTER, so slow chunks are reported as each one finishes. When there
is nothing to claim, wait for the supervisor's wake-up (a byte on the wake-up
pipe: a NOTIFY arrived) or the poll interval.

Stopping (SIGTERM, or the supervisor gone): no more claims; what the handler
finished is reported as finished, what it did not start is handed back at once,
and running chunks are handed back if they outlast the grace period (at once if
the supervisor is gone). Handed back means pending again, no retry spent.

The connection is opened here, in the worker process, and reopened with backoff
whenever Postgres goes away. A report that could not be delivered is sent again
after reconnecting; if the chunk was meanwhile reclaimed, chunkq refuses the stale
report (LeaseLost) and the chunk is re-run elsewhere: never lost, never counted twice.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import psycopg

from chunkq import ChunkCancelled, ChunkStatus, InvalidTransition, JobChunk, JobNotFound, LeaseLost
from chunkq.schema import check_schema
from chunkq.sync import CrawlJobRepository, JobChunkRepository

from . import logs, metrics
from .config import PoolConfig
from .handler import ChunkTask, DoNotRetry, Handler, RetryAfter, load_handler
from .lease import Held, Holdings, LeaseKeeper

T = TypeVar("T")
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
REFUSALS = (LeaseLost, InvalidTransition)  # a chunk is no longer held as this worker thinks
#: Seconds a completion may wait to be reported with the next claim.
FLUSH_AFTER = 1.0
#: Shortest wait before claiming again when a limit said "now" (another claimer held the key a moment ago).
LIMIT_RETRY_MIN = 0.01
#: Seconds the keeper waits for the main thread to finish a report before handing back regardless.
HAND_BACK_WAIT = 5.0


class Session:
    """The worker's one connection, reopened with backoff when it breaks."""

    def __init__(self, config: PoolConfig, stopping: threading.Event) -> None:
        self.config, self.stopping = config, stopping
        self.conn: psycopg.Connection[Any] | None = None

    def connect(self) -> None:
        delay = 0.2
        while True:
            try:
                # prepare_threshold=None: no server-side prepared statements, which
                # PgBouncer in transaction mode cannot follow (the --no-listen setup).
                prepare = 5 if self.config.listen else None
                # The name shows the worker in pg_stat_activity and chunkq.live_workers.
                self.conn = psycopg.connect(
                    self.config.dsn,
                    autocommit=True,
                    prepare_threshold=prepare,
                    connect_timeout=10,
                    application_name=f"chunkq worker {self.config.name}:{os.getpid()}",
                )
                self.chunks = JobChunkRepository(self.conn)
                self.jobs = CrawlJobRepository(self.conn)
                return
            except CONNECTION_ERRORS as exc:
                logs.event("cannot connect, retrying", level=logging.WARNING, retry_in_s=delay, error=str(exc))
                if self.stopping.wait(delay):
                    raise SystemExit(1) from exc
                delay = min(delay * 2, 10.0)

    def call(self, operation: Callable[[Session], T]) -> T:
        """Runs ``operation``; on a broken connection, reconnects and runs it again."""
        while True:
            try:
                return operation(self)
            except CONNECTION_ERRORS as exc:
                logs.event("connection lost, reconnecting", level=logging.WARNING, error=str(exc))
                metrics.reconnected()
                if self.conn is not None:
                    self.conn.close()
                self.connect()


class Worker:
    def __init__(self, config: PoolConfig, slot: int, handler: Handler, wake: Connection, idle: Any) -> None:
        self.config, self.slot, self.handler, self.wake, self.idle = config, slot, handler, wake, idle
        self.stopping = threading.Event()
        self.deadline: float | None = None  # set on SIGTERM: running chunks must be done by then
        self.session = Session(config, self.stopping)
        self.holdings = Holdings()
        self.keywords: dict[int, Any] = {}  # job id -> keywords, fetched once per job
        self.completed_since: float | None = None  # when the oldest completion not reported yet was finished

    @functools.cached_property
    def worker_id(self) -> str:
        return f"{self.config.name}:{os.getpid()}"

    def stop(self, _signum: int = 0, _frame: object = None) -> None:
        """SIGTERM: stop claiming; running chunks get the grace period. Idempotent, because a
        service manager may signal the whole process group as well as the supervisor; exiting
        at once on a second signal is the supervisor's call (it SIGKILLs)."""
        if not self.stopping.is_set():
            self.deadline = time.monotonic() + self.config.grace
            self.stopping.set()

    def orphaned(self) -> None:
        """The supervisor is gone: nobody restarts, drains or watches this worker any more. Stop at
        once: report what is finished, hand back the rest (the keeper does, as the deadline is now)."""
        if self.deadline is None or self.deadline > time.monotonic():
            logs.event(
                "the supervisor is gone: stopping, handing back what this worker holds",
                level=logging.WARNING,
                worker=self.worker_id,
            )
            self.deadline = time.monotonic()
            self.stopping.set()

    def run(self) -> int:
        self.session.connect()
        check_schema(self.session.conn)  # type: ignore[arg-type]
        keeper = LeaseKeeper(
            self.session,
            self.holdings,
            self.config.heartbeat,
            self.config.lease,
            lambda: self.deadline,
            self.hand_back_and_exit,
            self.orphaned,
        )
        keeper.start()
        logs.event("worker started", worker=self.worker_id)
        while not self.stopping.is_set():
            self.idle[self.slot] = 1  # before claiming, so a wake-up sent meanwhile is not missed
            chunks = self.session.call(self.claim)
            if chunks:
                self.idle[self.slot] = 0
                self.process(chunks)
            else:
                self.wait_for_work()
        self.session.call(self.hand_back)
        keeper.finished.set()
        logs.event("worker stopped", worker=self.worker_id)
        return 0

    def claim(self, session: Session) -> list[JobChunk]:
        """Reports the held-back completions and claims up to --batch more chunks, in one call."""
        try:
            return self.report_completed(session, limit=self.config.batch)
        except JobNotFound:  # the --job was deleted while we ran: nothing to do, ever
            logs.event("the job to work on no longer exists", level=logging.WARNING, job=self.config.job_id)
            return []

    def report_completed(self, session: Session, limit: int = 0) -> list[JobChunk]:
        """complete_and_claim for the held-back completions; if one of them is no longer held, it
        refuses them all, and each is reported on its own instead (then the claim is made alone).
        What is claimed is held from the moment the call returns."""
        with self.holdings.lock:
            finished = self.holdings.finished()
            done: list[Held] = []
            lost: list[Held] = []
            for held in finished:  # one look at each: the keeper may mark a chunk lost at any moment
                (lost if held.lost.is_set() else done).append(held)
            claimed: list[JobChunk] = []
            outcomes: list[str] = []
            if done or limit:
                try:
                    claimed = session.chunks.complete_and_claim(
                        [held.chunk.lease for held in done],
                        self.worker_id,
                        limit=limit,
                        job_id=self.config.job_id,
                        lease=self.config.lease,
                    )
                    outcomes = ["completed"] * len(done)
                except REFUSALS:
                    outcomes = [self.deliver(session, held.chunk, None, True) for held in done]
                    claimed = (
                        session.chunks.claim(
                            self.worker_id, limit=limit, job_id=self.config.job_id, lease=self.config.lease
                        )
                        if limit
                        else []
                    )
            for held in finished:
                self.holdings.drop(held.chunk.id)
            self.completed_since = None
            self.holdings.add(claimed)
        if limit:
            metrics.claimed(len(claimed))
        for held, outcome in [*zip(done, outcomes, strict=True), *((held, "lease_lost") for held in lost)]:
            self.log_outcome(held.chunk, outcome, held.took_ms or 0.0, None)
        return claimed

    def hand_back(self, session: Session) -> None:
        """On the way out: everything finished is reported as finished; only work not done goes back
        to pending (release_chunk: no retry spent)."""
        with self.holdings.lock:
            self.report_completed(session)
            self.release_unfinished(session)

    def release_unfinished(self, session: Session) -> None:
        for held in self.holdings.all():
            if not held.lost.is_set():
                chunk = held.chunk
                session.chunks.release(chunk.id, chunk.attempt, chunk.lease_token)
                logs.event("chunk released", chunk=chunk.id, attempt=chunk.attempt, outcome="released")
                metrics.chunk_outcome("released")
            self.holdings.drop(held.chunk.id)

    def hand_back_and_exit(self) -> None:
        """The grace period is over (or the supervisor is gone) while chunks are still held: called by the
        keeper while the handler may still be running. Reports the finished ones, releases the rest, and
        ends the process, handler and all."""
        code = 0
        if not self.holdings.lock.acquire(timeout=HAND_BACK_WAIT):  # a report stuck on a dead connection
            logs.event(
                "grace period over, a report is stuck: exiting; held chunks return when their leases expire",
                level=logging.ERROR,
            )
            os._exit(1)
        try:
            self.session.call(self.hand_back)
        except BaseException as exc:  # SystemExit too: no reconnecting once stopping
            code = 1  # what was not handed back returns when its lease expires
            logs.event("hand back failed", level=logging.ERROR, error=str(exc))
        logs.event("grace period over, exiting", exit_code=code)
        os._exit(code)

    def wait_for_work(self) -> None:
        """Until a wake-up, the poll interval, or sooner when a limit (a rate key's bucket) is about to let a
        chunk be claimed."""
        hint = self.session.call(lambda s: s.chunks.claimable_in(self.config.job_id))
        wait = self.config.poll if hint is None else min(self.config.poll, max(LIMIT_RETRY_MIN, hint.total_seconds()))
        until = time.monotonic() + wait
        while not self.stopping.is_set() and (left := until - time.monotonic()) > 0:
            if self.wake.poll(min(left, 0.2)):
                try:
                    woken = os.read(self.wake.fileno(), 4096)
                except OSError:
                    woken = b""
                if not woken:  # end of file: the supervisor's end of the pipe is closed, it is gone
                    self.orphaned()
                return

    def process(self, chunks: list[JobChunk]) -> None:
        for chunk in chunks:
            held = self.holdings.get(chunk.id)
            if self.stopping.is_set() or held is None:
                break
            if held.lost.is_set():  # reclaimed or cancelled before its turn came: nothing to run
                with self.holdings.lock:
                    self.holdings.drop(chunk.id)
                self.log_outcome(chunk, "lease_lost", 0.0, None)
                continue
            took = self.run_one(held)
            # Report now if waiting for one more chunk like this one would hold the
            # completions back longer than FLUSH_AFTER (slow chunks: each one at once).
            if self.completed_since is not None and time.monotonic() - self.completed_since + took > FLUSH_AFTER:
                self.session.call(self.report_completed)
        if self.stopping.is_set():
            self.session.call(self.hand_back)
        # Otherwise the completions go with the next claim.

    def run_one(self, held: Held) -> float:
        """Runs the handler on one chunk; holds back a completion, reports a failure. Seconds it took."""
        chunk = held.chunk
        task = ChunkTask(
            chunk.id,
            chunk.job_id,
            chunk.chunk_index,
            chunk.image_start,
            chunk.image_end,
            self.job_keywords(chunk.job_id),
            chunk.attempt,
            held.lost,
        )
        started = time.monotonic()
        error: str | None = None
        retry = True
        deferral: RetryAfter | None = None
        try:
            self.handler(task)
        except RetryAfter as exc:
            error, deferral = f"RetryAfter: {exc}", exc
        except DoNotRetry as exc:
            error, retry = describe(exc), False
        except Exception as exc:
            error = describe(exc)
        took = time.monotonic() - started
        metrics.handler_took(took)
        duration_ms = round(took * 1000, 1)
        if error is None:
            with self.holdings.lock:  # so that a hand-back sees it either running or finished
                if self.completed_since is None:
                    self.completed_since = time.monotonic()
                held.took_ms = duration_ms
        else:
            self.log_outcome(chunk, self.report_failure(held, error, retry, deferral), duration_ms, error)
        return took

    def log_outcome(self, chunk: JobChunk, outcome: str, duration_ms: float, error: str | None) -> None:
        metrics.chunk_outcome(outcome)
        level = logging.INFO if outcome == "completed" else logging.WARNING
        if not logs.log.isEnabledFor(level):  # --log-level warning: no line per completed chunk, nor its fields
            return
        logs.event(
            "chunk " + outcome,
            level=level,
            event="chunk",
            job=chunk.job_id,
            chunk=chunk.id,
            index=chunk.chunk_index,
            attempt=chunk.attempt,
            outcome=outcome,
            duration_ms=duration_ms,
            worker=self.worker_id,
            **({"error": error} if error else {}),
        )

    def report_failure(self, held: Held, error: str, retry: bool, deferral: RetryAfter | None = None) -> str:
        """Records a failure, or a deferral; returns retrying, failed, deferred, lease_lost or cancelled."""

        def send(session: Session) -> str:
            with self.holdings.lock:
                if held.lost.is_set():  # the LeaseKeeper found the lease lost
                    outcome = "lease_lost"
                else:  # a connection error: sent again
                    outcome = self.deliver(session, held.chunk, error, retry, deferral)
                self.holdings.drop(held.chunk.id)
                return outcome

        return self.session.call(send)

    def deliver(
        self, session: Session, chunk: JobChunk, error: str | None, retry: bool, deferral: RetryAfter | None = None
    ) -> str:
        """Reports one chunk's outcome; returns completed, retrying, failed, deferred, lease_lost or cancelled."""
        try:
            if error is None:
                session.chunks.complete(chunk.id, chunk.attempt, chunk.lease_token)
                return "completed"
            if deferral is not None:
                session.chunks.defer(
                    chunk.id,
                    chunk.attempt,
                    deferral.seconds,
                    deferral.reason,
                    block_key=deferral.block_key,
                    lease_token=chunk.lease_token,
                )
                return "deferred"
            outcome = session.chunks.fail(
                chunk.id,
                chunk.attempt,
                error,
                retry=retry,
                max_retries=self.config.max_retries,
                lease_token=chunk.lease_token,
            )
            return "retrying" if outcome.chunk_status == ChunkStatus.PENDING else "failed"
        except ChunkCancelled:
            return "cancelled"
        except LeaseLost:
            return "lease_lost"
        except InvalidTransition:
            # A first try may have been recorded just before the connection broke.
            now = session.chunks.get_by_id(chunk.id)
            if now is not None and now.attempt == chunk.attempt:
                recorded = {
                    ChunkStatus.COMPLETED: "completed",
                    ChunkStatus.FAILED: "failed",
                    ChunkStatus.PENDING: "retrying",
                }
                return recorded.get(now.status, "refused")
            return "lease_lost"

    def job_keywords(self, job_id: int) -> Any:
        if job_id not in self.keywords:
            job = self.session.call(lambda s: s.jobs.get_by_id(job_id))
            self.keywords[job_id] = job.keywords if job else None
        return self.keywords[job_id]


def describe(exc: BaseException) -> str:
    """``Type: message`` and the last frames of the traceback, for chunk_errors."""
    frames = traceback.format_exception(exc, limit=-3)
    return f"{type(exc).__name__}: {exc}\n" + "".join(frames[:-1]).rstrip()


def main(config: PoolConfig, slot: int, wake: Connection, idle: Any) -> None:
    """Entry point of a worker process (started by the supervisor)."""
    logs.setup(config.log_format, config.log_level)
    metrics.start_worker(config)
    multiprocessing.current_process().name = f"worker-{slot}"
    worker = Worker(config, slot, load_handler(config.handler), wake, idle)
    # Ctrl-C reaches the whole process group; the supervisor decides and sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, worker.stop)
    try:
        code = worker.run()
    except Exception:
        # A bug or an unexpected database error: log it, exit, let the supervisor
        # restart this worker; chunks it held come back when their leases expire.
        logs.log.exception("worker crashed")
        code = 1
    sys.exit(code)
