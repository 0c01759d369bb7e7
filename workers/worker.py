"""One worker process: claim chunks, run the handler on each, report the outcome.

The process's main thread is the coordinator, the only one that claims and
reports (the lease keeper shares its connection for heartbeats): it holds up to
max(--batch, --concurrency) chunks, starts up to --concurrency of them at once
(see run.py: in this thread, in threads, or as tasks of an async handler), and
handles each result as it comes: a failure is reported at once (retried with
backoff unless DoNotRetry; a RetryAfter defers it), a completion is held back
and goes with the next claim (complete_and_claim: one round trip, one commit).
A completion is held back only while more chunks as quick as the last one would
fit in FLUSH_AFTER, so slow chunks are reported as each one finishes. When there
is nothing to claim, it waits for the supervisor's wake-up (a byte on the
wake-up pipe: a NOTIFY arrived), the poll interval, or what a limit says.

Stopping (SIGTERM, or the supervisor gone): no more claims; what a handler
finished is reported as finished, what was not started is handed back at once,
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
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import psycopg

from chunkq import ChunkCancelled, ChunkNotFound, ChunkStatus, InvalidTransition, JobChunk, JobNotFound, LeaseLost
from chunkq.schema import check_schema
from chunkq.sync import CrawlJobRepository, JobChunkRepository

from . import logs, metrics
from .config import PoolConfig
from .handler import ChunkTask, Handler, RetryAfter, load_handler
from .lease import Held, Holdings, LeaseKeeper
from .run import Result, make_runner

T = TypeVar("T")
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
# A chunk is no longer held as this worker thinks: its lease lapsed, its job was cancelled, or the job was
# deleted with its chunks (ChunkNotFound: an operator's `job cancel` then `job delete`). Routine, never a crash.
REFUSALS = (LeaseLost, InvalidTransition, ChunkNotFound)
#: Seconds a completion may wait to be reported with the next claim.
FLUSH_AFTER = 1.0
#: Seconds the keeper waits for the coordinator to finish a report before handing back regardless.
HAND_BACK_WAIT = 5.0
#: Shortest wait before claiming again when a limit said "now" (another claimer held the key a moment ago).
LIMIT_RETRY_MIN = 0.01


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
        self.results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self.runner = make_runner(handler, config.concurrency, self.results.put)
        self.keywords: dict[int, Any] = {}  # job id -> keywords, fetched once per job
        self.completed_since: float | None = None  # when the oldest completion not reported yet was finished
        self.last_took = 0.0  # seconds the last chunk took: how long the next one may take
        self.claim_after = 0.0  # after a claim found nothing while handlers run: not before this (monotonic)

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
        logs.event("worker started", worker=self.worker_id, concurrency=self.config.concurrency)
        while not self.stopping.is_set():
            self.start_handlers()
            if self.holdings.has_waiting() and self.holdings.running < self.config.concurrency:
                continue  # a slot is free again (a handler run here finished): start the next
            if self.may_claim() and (time.monotonic() >= self.claim_after or self.woken()):
                self.idle[self.slot] = 1  # before claiming, so a wake-up sent meanwhile is not missed
                if self.session.call(self.claim):
                    self.idle[self.slot] = 0
                    continue
                if not self.holdings.running:
                    self.flush_completions()  # nothing else is coming to carry them
                    self.wait_for_work()
                    continue
                self.claim_after = time.monotonic() + self.wait_time()  # handlers run: look again later
            self.wait_for_results()
        # Stopping: what was not started goes back at once; running chunks finish, unless
        # they outlast the grace period (then the keeper hands them back and ends the process).
        self.session.call(self.release_waiting)
        while self.holdings.running:
            self.wait_for_results()
        self.session.call(self.hand_back)
        self.runner.close()
        keeper.finished.set()
        logs.event("worker stopped", worker=self.worker_id)
        return 0

    def may_claim(self) -> bool:
        """Claim when every chunk held has started and a handler slot is free."""
        return not self.holdings.has_waiting() and self.holdings.running < self.config.concurrency

    def start_handlers(self) -> None:
        """Starts waiting chunks in the free handler slots (one slot and a plain handler: runs them here, in turn)."""
        while self.holdings.running < self.config.concurrency and not self.stopping.is_set():
            held = self.holdings.next_waiting()
            if held is None:
                break
            if held.lost.is_set():  # reclaimed or cancelled before its turn came: nothing to run
                with self.holdings.lock:
                    self.holdings.drop(held.chunk.id)
                self.log_outcome(held.chunk, "lease_lost", 0.0, None)
                continue
            self.holdings.start(held)
            self.runner.start(held, self.task(held))
            # An inline handler is done already: its completion is weighed (reported now, or held back for
            # the next claim) before the next chunk starts, and its slot is free again.
            self.handle_results()
        self.handle_results()

    def task(self, held: Held) -> ChunkTask:
        chunk = held.chunk
        return ChunkTask(
            chunk.id,
            chunk.job_id,
            chunk.chunk_index,
            chunk.image_start,
            chunk.image_end,
            self.job_keywords(chunk.job_id),
            chunk.attempt,
            held.lost,
            resume_from=chunk.resume_from,
            resume_state=chunk.checkpoint_state,
            on_checkpoint=held.record_checkpoint,
        )

    def wait_for_results(self) -> None:
        """Until a handler finishes (or a moment passes, to look at the stop flag and the flush deadline)."""
        try:
            first = self.results.get(timeout=0.1)
        except queue.Empty:
            self.flush_if_due()
            return
        self.handle_results(first)

    def handle_results(self, first: Result | None = None) -> None:
        """Every result that has come in: a completion is held back for the next claim, a failure reported."""
        while first is not None or not self.results.empty():  # (this thread alone takes from the queue)
            if first is not None:
                result, first = first, None
            else:
                result = self.results.get_nowait()
            held = result.held
            self.last_took = result.took
            metrics.handler_took(result.took)
            duration_ms = round(result.took * 1000, 1)
            if result.error is None:
                with self.holdings.lock:  # so that a hand-back sees it either running or finished
                    if self.completed_since is None:
                        self.completed_since = time.monotonic()
                    self.holdings.finish(held, duration_ms)
            else:
                outcome = self.report_failure(held, result.error, result.retry, result.deferral)
                self.log_outcome(held.chunk, outcome, duration_ms, result.error)
        self.flush_if_due()

    def flush_if_due(self) -> None:
        """Reports the held-back completions now if waiting for the next claim would keep them past
        FLUSH_AFTER: the next claim is at least one more chunk like the last one away."""
        if self.completed_since is None:
            return
        now = time.monotonic()
        waited = now - self.completed_since
        if waited + self.last_took <= FLUSH_AFTER:  # one more chunk like the last fits, whenever the claim comes
            return
        claim_soon = self.may_claim() and not self.stopping.is_set() and now >= self.claim_after
        if waited + (0 if claim_soon else self.last_took) > FLUSH_AFTER:
            self.flush_completions()

    def flush_completions(self) -> None:
        if self.completed_since is not None:
            self.session.call(self.report_completed)

    def claim(self, session: Session) -> list[JobChunk]:
        """Reports the held-back completions and claims enough chunks to fill the free handler slots (at
        least --batch), in one call."""
        free = self.config.concurrency - self.holdings.running
        return self.report_completed(session, limit=max(self.config.batch, free))

    def woken(self) -> bool:
        """Whether the supervisor woke this worker (a NOTIFY came) since it last looked; reads the wake-ups."""
        if not self.wake.poll(0):
            return False
        try:
            woken = os.read(self.wake.fileno(), 4096)
        except OSError:
            woken = b""
        if not woken:  # end of file: the supervisor's end of the pipe is closed, it is gone
            self.orphaned()
        return bool(woken)

    def wait_time(self) -> float:
        """How long to wait before claiming again after finding nothing: the poll interval, or sooner when a
        limit (a rate key's bucket, a block) is about to let a chunk be claimed."""
        hint = self.session.call(lambda s: s.chunks.claimable_in(self.config.job_id))
        return self.config.poll if hint is None else min(self.config.poll, max(LIMIT_RETRY_MIN, hint.total_seconds()))

    def claim_alone(self, session: Session, limit: int) -> list[JobChunk]:
        if not limit:
            return []
        try:
            return session.chunks.claim(self.worker_id, limit=limit, job_id=self.config.job_id, lease=self.config.lease)
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
                except (*REFUSALS, JobNotFound):
                    # One of the chunks is no longer held, or the --job is gone: each on its own, then the claim.
                    outcomes = [self.deliver(session, held.chunk, None, True) for held in done]
                    claimed = self.claim_alone(session, limit)
            for held in finished:
                self.holdings.drop(held.chunk.id)
            self.completed_since = None
            self.holdings.add(claimed)
        if limit:
            metrics.claimed(len(claimed))
        for held, outcome in [*zip(done, outcomes, strict=True), *((held, "lease_lost") for held in lost)]:
            self.log_outcome(held.chunk, outcome, held.took_ms or 0.0, None)
        return claimed

    def release_waiting(self, session: Session) -> None:
        with self.holdings.lock:
            self.release(session, self.holdings.waiting_list())

    def hand_back(self, session: Session) -> None:
        """On the way out: everything finished is reported as finished; only work not done goes back
        to pending (release_chunk: no retry spent)."""
        with self.holdings.lock:
            self.report_completed(session)
            self.release(session, self.holdings.all())

    def release(self, session: Session, held_chunks: list[Held]) -> None:
        for held in held_chunks:
            if not held.lost.is_set():
                chunk = held.chunk
                try:
                    session.chunks.release(chunk.id, chunk.attempt, chunk.lease_token)
                    logs.event("chunk released", chunk=chunk.id, attempt=chunk.attempt, outcome="released")
                    metrics.chunk_outcome("released")
                except REFUSALS as refusal:  # not ours any more: nothing to hand back
                    self.log_outcome(chunk, refused_outcome(refusal), 0.0, None)
            self.holdings.drop(held.chunk.id)

    def hand_back_and_exit(self) -> None:
        """The grace period is over (or the supervisor is gone) while chunks are still held: called by the
        keeper while handlers may still be running. Reports the finished ones, releases the rest, and
        ends the process, handlers and all."""
        code = 0
        if not self.holdings.lock.acquire(timeout=HAND_BACK_WAIT):  # a report stuck on a dead connection
            logs.event(
                "grace period over, a report is stuck: exiting; held chunks return when their leases expire",
                level=logging.ERROR,
            )
            os._exit(1)
        try:
            self.handle_finished_results_quietly()
            self.session.call(self.hand_back)
        except BaseException as exc:  # SystemExit too: no reconnecting once stopping
            code = 1  # what was not handed back returns when its lease expires
            logs.event("hand back failed", level=logging.ERROR, error=str(exc))
        logs.event("grace period over, exiting", exit_code=code)
        os._exit(code)

    def handle_finished_results_quietly(self) -> None:
        """Completions waiting in the results queue count as finished for the hand-back (failures stay
        running: they are handed back, their retry not spent)."""
        while True:
            try:
                result = self.results.get_nowait()
            except queue.Empty:
                return
            if result.error is None:
                self.holdings.finish(result.held, round(result.took * 1000, 1))

    def wait_for_work(self) -> None:
        """Nothing held, nothing to claim: until a wake-up or the wait_time."""
        until = time.monotonic() + self.wait_time()
        while not self.stopping.is_set() and (left := until - time.monotonic()) > 0:
            if self.wake.poll(min(left, 0.2)) and (self.woken() or self.stopping.is_set()):
                return

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
        """Records a failure, or a deferral; returns retrying, failed, deferred, lease_lost, cancelled or vanished."""

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
        """Reports one chunk's outcome; returns completed, retrying, failed, deferred, lease_lost, cancelled or
        vanished."""
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
        except (ChunkCancelled, LeaseLost, ChunkNotFound) as refusal:
            return refused_outcome(refusal)
        except InvalidTransition:
            # A first try may have been recorded just before the connection broke.
            now = session.chunks.get_by_id(chunk.id)
            if now is None:
                return "vanished"
            if now.attempt == chunk.attempt:
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


def refused_outcome(refusal: Exception) -> str:
    """The outcome logged for a report chunkq refused: cancelled, vanished (deleted with its job) or lease_lost."""
    if isinstance(refusal, ChunkCancelled):
        return "cancelled"
    if isinstance(refusal, ChunkNotFound):
        return "vanished"
    return "lease_lost"


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
