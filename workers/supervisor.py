"""The parent process: starts the workers, restarts those that die, wakes idle ones, drains on SIGTERM.

Connections: each worker opens one (claims, reports and heartbeats share it),
and the supervisor one more to LISTEN for new chunks (none with --no-listen):
processes + 1 in all.

Wake-up: only the supervisor LISTENs on chunkq_claimable. A notification says how
many chunks became claimable; the supervisor wakes that many idle workers, not
all of them. Workers that miss a wake-up still find the work at their next poll.

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
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import psycopg

from . import logs
from .config import PoolConfig
from .worker import main as worker_main

RESTART_DELAY_MAX = 30.0  # seconds
STABLE_AFTER = 60.0  # a worker that ran this long is not crash-looping


@dataclass
class Slot:
    index: int
    wake: Any  # multiprocessing.Event
    process: BaseProcess | None = None
    started: float = 0.0
    crashes: int = 0  # in a row
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.context = multiprocessing.get_context("spawn")  # no inherited connections or threads
        self.idle = self.context.Array("b", config.processes, lock=False)
        self.slots = [Slot(i, self.context.Event()) for i in range(config.processes)]
        self.signals = 0
        self.listener: psycopg.Connection[Any] | None = None
        self.listener_retry_at = 0.0

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        logs.event("pool starting", processes=self.config.processes, handler=self.config.handler,
                   lease_s=self.config.lease, batch=self.config.batch, listen=self.config.listen)
        for slot in self.slots:
            self.start(slot)
        try:
            return self.supervise()
        finally:
            if self.listener is not None:
                self.listener.close()

    def supervise(self) -> int:
        draining = False
        while True:
            if self.signals >= 2:
                return self.kill_all()
            if self.signals == 1 and not draining:
                draining = True
                logs.event("draining: no new claims, running chunks get the grace period", grace_s=self.config.grace)
                for slot in self.alive():
                    slot.process.terminate()  # type: ignore[union-attr]  # SIGTERM
            if draining and not self.alive():
                return self.drained()
            self.listen(timeout=0.2)
            if not draining:
                self.restart_dead()

    def start(self, slot: Slot) -> None:
        slot.process = self.context.Process(
            target=worker_main, args=(self.config, slot.index, slot.wake, self.idle), name=f"worker-{slot.index}"
        )
        slot.process.start()
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
            process.join()
            slot.crashes = 0 if now - slot.started >= STABLE_AFTER else slot.crashes + 1
            delay = min(RESTART_DELAY_MAX, 0.5 * 2 ** (slot.crashes - 1)) if slot.crashes else 0.0
            logs.event("worker process died, restarting", level=logging.WARNING, slot=slot.index,
                       pid=process.pid, exit_code=process.exitcode, restart_in_s=delay)
            slot.process, slot.restart_at = None, now + delay
            self.idle[slot.index] = 0

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
                self.listener = psycopg.connect(self.config.dsn, autocommit=True, connect_timeout=10,
                                                application_name=f"chunkq supervisor {self.config.name}:{os.getpid()}")
                self.listener.execute("LISTEN chunkq_claimable")
            except psycopg.Error as exc:
                logs.event("cannot LISTEN, workers poll meanwhile", level=logging.WARNING, error=str(exc))
                self.listener, self.listener_retry_at = None, time.monotonic() + 5
                return
        try:
            for notice in self.listener.notifies(timeout=timeout):
                self.wake(notice.payload)
        except psycopg.Error as exc:
            logs.event("lost the LISTEN connection", level=logging.WARNING, error=str(exc))
            self.listener.close()
            self.listener, self.listener_retry_at = None, time.monotonic() + 1

    def wake(self, payload: str) -> None:
        try:
            news = json.loads(payload)
        except ValueError:
            news = {}
        if self.config.job_id is not None and news.get("job_id") not in (None, self.config.job_id):
            return
        wanted = int(news.get("chunks") or self.config.processes)
        for slot in self.slots:
            if wanted <= 0:
                break
            if self.idle[slot.index]:
                self.idle[slot.index] = 0
                slot.wake.set()
                wanted -= self.config.batch

    def drained(self) -> int:
        codes = {slot.index: slot.process.exitcode for slot in self.slots if slot.process is not None}
        # Killed by SIGTERM itself: the worker was still starting, before it set its handler and
        # so before it connected; it held nothing and stopped as cleanly as one that drained.
        clean = all(code in (0, -signal.SIGTERM) for code in codes.values())
        logs.event("pool stopped" if clean else "pool stopped, not all workers drained cleanly",
                   level=logging.INFO if clean else logging.WARNING, exit_codes=codes)
        return 0 if clean else 1

    def kill_all(self) -> int:
        logs.event("second signal: killing workers; their chunks return when the leases expire",
                   level=logging.WARNING)
        for slot in self.alive():
            slot.process.kill()  # type: ignore[union-attr]
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join()
        return 1
