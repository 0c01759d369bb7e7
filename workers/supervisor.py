"""The parent process: starts the workers, restarts those that die, wakes idle ones, drains on SIGTERM.

Connections: each worker opens one (claims, reports and heartbeats share it),
and the supervisor one more to LISTEN for new chunks (none with --no-listen):
processes + 1 in all.

Wake-up: only the supervisor LISTENs on chunkq_claimable. A notification says how
many chunks became claimable; the supervisor wakes that many idle workers, not
all of them. Workers that miss a wake-up still find the work at their next poll.
NOTIFY needs no privilege, so a payload is a hint anyone may forge: whatever it
says, the worst it can do is wake idle workers that then find nothing.

What the supervisor shares with a worker can never wedge either of them when the
other dies at any instant: a wake-up is a byte down a pipe (a dead worker's pipe
is simply replaced; a dead supervisor is end-of-file), and the idle flags are
plain shared bytes without a lock. No multiprocessing Event, Lock or Condition:
those keep state in shared memory that a killed process can leave taken.

Signals: the first SIGTERM or SIGINT stops claiming and lets running chunks
finish within --grace seconds (then they are handed back to pending); the
supervisor exits 0 once every worker drained cleanly. A second signal kills the
workers at once; their chunks come back when the leases expire.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeGuard

import psycopg

from chunkq.errors import one_line

from . import logs, metrics
from .config import PoolConfig
from .worker import main as worker_main

RESTART_DELAY_MAX = 30.0  # seconds
STABLE_AFTER = 60.0  # a worker that ran this long is not crash-looping
DRAIN_MARGIN = 10.0  # seconds past --grace before a worker that has not exited is killed
EVERYONE = sys.maxsize  # a notification that says nothing usable wakes every idle worker


def chunks_announced(payload: str, job_id: int | None) -> int:
    """How many chunks a chunkq_claimable payload announces for this pool: 0 when it names a job other
    than ``job_id`` (--job), EVERYONE when it says nothing usable (not JSON, not an object, no positive
    integer ``chunks``)."""
    try:
        news = json.loads(payload)
    except Exception:  # ValueError, RecursionError for deep nesting: anything goes in a forged payload
        return EVERYONE
    if not isinstance(news, dict):
        return EVERYONE
    named_job, chunks = news.get("job_id"), news.get("chunks")
    if job_id is not None and _is_int(named_job) and named_job != job_id:
        return 0
    return chunks if _is_int(chunks) and chunks > 0 else EVERYONE


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Slot:
    index: int
    process: BaseProcess | None = None
    waker: Connection | None = None  # write end of the worker's wake-up pipe
    started: float = 0.0
    crashes: int = 0  # in a row
    restart_at: float = 0.0

    def new_channel(self, context: Any) -> Connection:
        """A fresh wake-up pipe for the next worker in this slot; returns its read end, for the worker."""
        reader, writer = context.Pipe(duplex=False)
        os.set_blocking(writer.fileno(), False)
        if self.waker is not None:
            self.waker.close()
        self.waker = writer
        return reader  # type: ignore[no-any-return]

    def ring(self) -> None:
        """Wakes the worker: one byte down its pipe. Never blocks: a full pipe already holds wake-ups,
        and a broken one belongs to a dead worker that restart_dead replaces."""
        if self.waker is None:
            return
        try:
            os.write(self.waker.fileno(), b"!")
        except (BlockingIOError, BrokenPipeError):
            pass


class Supervisor:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.context = multiprocessing.get_context("spawn")  # no inherited connections or threads
        self.idle = self.context.Array("b", config.processes, lock=False)  # no lock: nothing to leave taken
        self.slots = [Slot(i) for i in range(config.processes)]
        self.signals = 0
        self.listener: psycopg.Connection[Any] | None = None
        self.listener_retry_at = 0.0

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        logs.event(
            "pool starting",
            processes=self.config.processes,
            handler=self.config.handler,
            lease_s=self.config.lease,
            batch=self.config.batch,
            listen=self.config.listen,
        )
        try:
            metrics.serve(self.config, processes=lambda: sum(s.process is not None for s in self.slots))
        except (OSError, ImportError) as exc:  # the port is taken; prometheus-client is not installed
            logs.event(
                "cannot serve --metrics-port (pip install 'chunkq[metrics]' for it)",
                level=logging.ERROR,
                port=self.config.metrics_port,
                error=one_line(exc),
            )
            return 2
        for slot in self.slots:
            self.start(slot)
        try:
            return self.supervise()
        finally:
            if self.listener is not None:
                self.listener.close()
            metrics.stop()

    def supervise(self) -> int:
        drain_deadline: float | None = None
        while True:
            if self.signals >= 2:
                return self.kill_all("second signal: killing workers; their chunks return when the leases expire")
            if self.signals == 1 and drain_deadline is None:
                drain_deadline = time.monotonic() + self.config.grace + DRAIN_MARGIN
                self.begin_drain()
            if drain_deadline is not None:
                if not self.alive():
                    return self.drained()
                if time.monotonic() > drain_deadline:
                    return self.kill_all("workers did not drain in time: killing them")
            try:
                self.listen(timeout=0.2)
                if drain_deadline is None:
                    self.restart_dead()
            except Exception:
                # A bug or a surprise in housekeeping must not stop the supervision (restarts, drains).
                logs.log.exception("supervisor housekeeping failed")
                time.sleep(0.2)

    def start(self, slot: Slot) -> None:
        reader = slot.new_channel(self.context)
        slot.process = self.context.Process(
            target=worker_main, args=(self.config, slot.index, reader, self.idle), name=f"worker-{slot.index}"
        )
        slot.process.start()
        reader.close()  # the worker has its own copy; ours would hide the worker's death from ring()
        slot.started = time.monotonic()
        logs.event("worker process started", slot=slot.index, pid=slot.process.pid)

    def alive(self) -> list[Slot]:
        return [s for s in self.slots if s.process is not None and s.process.is_alive()]

    def restart_dead(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is None or process.is_alive():
                if process is None and now >= slot.restart_at:
                    self.start(slot)
                continue
            self.reap(slot)
            metrics.worker_restarted()
            slot.crashes = 0 if now - slot.started >= STABLE_AFTER else slot.crashes + 1
            delay = min(RESTART_DELAY_MAX, 0.5 * 2 ** (slot.crashes - 1)) if slot.crashes else 0.0
            logs.event(
                "worker process died, restarting",
                level=logging.WARNING,
                slot=slot.index,
                pid=process.pid,
                exit_code=process.exitcode,
                restart_in_s=delay,
            )
            slot.restart_at = now + delay

    def reap(self, slot: Slot) -> None:
        """Forgets a dead worker: its process, its idle flag, its wake-up pipe."""
        assert slot.process is not None
        slot.process.join()
        metrics.process_dead(slot.process.pid)
        slot.process = None
        self.idle[slot.index] = 0
        if slot.waker is not None:
            slot.waker.close()
            slot.waker = None

    def begin_drain(self) -> None:
        logs.event("draining: no new claims, running chunks get the grace period", grace_s=self.config.grace)
        for slot in self.slots:
            process = slot.process
            if process is None:
                continue
            if process.is_alive():
                process.terminate()  # SIGTERM
            else:  # died before the drain began: a crash already, not a worker that failed to drain
                logs.event(
                    "worker process died",
                    level=logging.WARNING,
                    slot=slot.index,
                    pid=process.pid,
                    exit_code=process.exitcode,
                )
                self.reap(slot)

    def listen(self, timeout: float) -> None:
        """Waits up to ``timeout`` for notifications and wakes as many idle workers as chunks arrived."""
        if not self.config.listen:
            time.sleep(timeout)
            return
        if self.listener is None:
            if time.monotonic() < self.listener_retry_at:
                time.sleep(timeout)
                return
            try:
                self.listener = psycopg.connect(
                    self.config.dsn,
                    autocommit=True,
                    connect_timeout=10,
                    application_name=f"chunkq supervisor {self.config.name}:{os.getpid()}",
                )
                self.listener.execute("LISTEN chunkq_claimable")
            except psycopg.Error as exc:
                logs.event("cannot LISTEN, workers poll meanwhile", level=logging.WARNING, error=one_line(exc))
                self.listener, self.listener_retry_at = None, time.monotonic() + 5
                return
        try:
            # The first notification, then whatever else has already arrived: a burst wakes workers once.
            batch = list(self.listener.notifies(timeout=timeout, stop_after=1))
            if batch:
                batch += self.listener.notifies(timeout=0)
        except psycopg.Error as exc:
            logs.event("lost the LISTEN connection", level=logging.WARNING, error=one_line(exc))
            self.listener.close()
            self.listener, self.listener_retry_at = None, time.monotonic() + 1
            return
        if batch:
            self.wake(sum(chunks_announced(n.payload, self.config.job_id) for n in batch))

    def wake(self, chunks: int) -> None:
        """Wakes idle workers, one per --batch chunks announced."""
        for slot in self.slots:
            if chunks <= 0:
                break
            if self.idle[slot.index]:
                self.idle[slot.index] = 0
                slot.ring()
                chunks -= self.config.batch

    def drained(self) -> int:
        codes = {slot.index: slot.process.exitcode for slot in self.slots if slot.process is not None}
        # Killed by SIGTERM itself: the worker was still starting, before it set its handler and
        # so before it connected; it held nothing and stopped as cleanly as one that drained.
        clean = all(code in (0, -signal.SIGTERM) for code in codes.values())
        logs.event(
            "pool stopped" if clean else "pool stopped, not all workers drained cleanly",
            level=logging.INFO if clean else logging.WARNING,
            exit_codes=codes,
        )
        return 0 if clean else 1

    def kill_all(self, why: str) -> int:
        logs.event(why, level=logging.WARNING)
        for slot in self.alive():
            slot.process.kill()  # type: ignore[union-attr]
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join()
        return 1
