"""What a worker holds, and the thread that keeps its leases alive and watches the clock and the parent.

While handlers run, the LeaseKeeper heartbeats every chunk the worker holds (one
call for all of them), and sends the checkpoints handlers recorded since (within
CHECKPOINT_EVERY). A chunk whose lease was lost (reclaimed after a stall, or its
job cancelled) is marked lost and its task's ``lost`` event set, so the worker
never reports on it. The keeper also calls the worker back when the grace period
after SIGTERM is over (running chunks are then handed back) and when the
supervisor is gone (the worker stops at once).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from chunkq import ChunkqError, JobChunk
from chunkq.errors import ValidationError, one_line
from chunkq.records import Lease

from . import logs, metrics

if TYPE_CHECKING:
    from .worker import Session


#: Seconds a checkpoint may wait for the keeper to send it (with the heartbeat of every held chunk).
CHECKPOINT_EVERY = 0.25


@dataclass
class Held:
    """One chunk the worker holds, from its claim until its outcome is reported."""

    chunk: JobChunk
    lost: threading.Event = field(default_factory=threading.Event)  # the lease is gone: never report on it
    started: bool = False  # its handler runs (or ran)
    took_ms: float | None = None  # set once the handler completed it: reported with the next claim
    checkpoint: tuple[int, Any] | None = None  # (last image done, state) not sent yet

    def record_checkpoint(self, position: int, state: Any) -> None:
        """From the handler's thread: the keeper sends the latest one."""
        self.checkpoint = (position, state)


class Holdings:
    """The chunks this worker holds, by id, each waiting to start, running, or finished and not reported yet.
    Thread-safe; ``lock`` is held while chunks are claimed, reported or handed back, so that those never overlap
    and never miss a chunk (re-entrant: a hand-back reports what is finished, then releases the rest, under one
    hold). The coordinator alone adds, starts, finishes and drops chunks; the keeper reads them and marks lost."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._held: dict[int, Held] = {}
        self._waiting: collections.deque[Held] = collections.deque()  # claimed, not started, in claim order
        self.running = 0  # started, not finished

    def add(self, chunks: list[JobChunk]) -> None:
        for chunk in chunks:
            held = self._held[chunk.id] = Held(chunk)
            self._waiting.append(held)

    def get(self, chunk_id: int) -> Held | None:
        return self._held.get(chunk_id)

    def next_waiting(self) -> Held | None:
        """The next chunk to start, taken off the waiting line (None: none waits)."""
        while self._waiting:
            held = self._waiting.popleft()
            if self._held.get(held.chunk.id) is held:
                return held
        return None

    def has_waiting(self) -> bool:
        while self._waiting and self._held.get(self._waiting[0].chunk.id) is not self._waiting[0]:
            self._waiting.popleft()  # dropped meanwhile (lost, or handed back)
        return bool(self._waiting)

    def start(self, held: Held) -> None:
        held.started = True
        self.running += 1

    def finish(self, held: Held, took_ms: float) -> None:
        """The handler completed it: held until reported."""
        if held.took_ms is None and held.started:
            self.running -= 1
        held.took_ms = took_ms

    def drop(self, chunk_id: int) -> None:
        held = self._held.pop(chunk_id, None)
        if held is not None and held.started and held.took_ms is None:
            self.running -= 1

    def lose(self, chunk_id: int) -> bool:
        """Marks a chunk lost (its lease is gone); True if it was held and not lost yet."""
        held = self._held.get(chunk_id)
        if held is None or held.lost.is_set():
            return False
        held.lost.set()
        return True

    def all(self) -> list[Held]:
        return list(self._held.values())

    def waiting_list(self) -> list[Held]:
        return [held for held in self.all() if not held.started]

    def finished(self) -> list[Held]:
        """Completed by the handler, not reported yet (lost ones included: they are logged, not reported)."""
        return [held for held in self.all() if held.took_ms is not None]

    def leases(self) -> list[Lease]:
        """The leases to keep alive: every chunk held and not lost."""
        return [held.chunk.lease for held in self.all() if not held.lost.is_set()]

    def take_checkpoints(self) -> dict[int, tuple[int, Any]]:
        """The checkpoints recorded since the last call, by chunk id (each sent once)."""
        marks = {}
        for held in self.all():
            mark, held.checkpoint = held.checkpoint, None
            if mark is not None and not held.lost.is_set():
                marks[held.chunk.id] = mark
        return marks


class LeaseKeeper(threading.Thread):
    def __init__(
        self,
        session: Session,
        holdings: Holdings,
        heartbeat: float,
        lease: float,
        stop_deadline: Callable[[], float | None],
        past_deadline: Callable[[], None],
        orphaned: Callable[[], None],
    ) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.session, self.holdings = session, holdings
        self.heartbeat, self.lease = heartbeat, lease
        self.stop_deadline = stop_deadline  # monotonic time by which running chunks must be done, once stopping
        self.past_deadline = past_deadline  # hands back what is held and exits the process
        self.orphaned = orphaned  # the supervisor is gone
        self.parent = os.getppid()
        self.finished = threading.Event()

    def run(self) -> None:
        next_beat = time.monotonic() + self.heartbeat
        next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
        while not self.finished.wait(0.05):
            try:
                if os.getppid() != self.parent:  # re-parented: the supervisor died (kill -9, OOM killer)
                    self.orphaned()
                deadline = self.stop_deadline()
                if deadline is not None and time.monotonic() >= deadline and self.holdings.all():
                    self.past_deadline()
                now = time.monotonic()
                if now >= next_beat or (now >= next_checkpoint and any(h.checkpoint for h in self.holdings.all())):
                    self.beat()
                    next_beat, next_checkpoint = now + self.heartbeat, now + CHECKPOINT_EVERY
            except Exception:
                # Keep the leases alive whatever went wrong once; the worker carries on.
                logs.log.exception("lease keeper failed")

    def beat(self) -> None:
        leases = self.holdings.leases()
        if not leases:
            return
        checkpoints = self.holdings.take_checkpoints()
        try:
            try:
                states = self.session.chunks.heartbeat_many(leases, lease=self.lease, checkpoints=checkpoints)
            except ValidationError as exc:  # a checkpoint the server refused must not cost the leases
                logs.event("checkpoints refused", level=logging.WARNING, error=one_line(exc))
                states = self.session.chunks.heartbeat_many(leases, lease=self.lease)
        except (psycopg.Error, ChunkqError) as exc:
            for chunk_id, mark in checkpoints.items():  # sent with the next beat, unless a newer one came
                held = self.holdings.get(chunk_id)
                if held is not None and held.checkpoint is None:
                    held.checkpoint = mark
            # The main thread reconnects when it next uses the connection; a missed
            # beat only matters if the outage outlasts the lease.
            logs.event("heartbeat failed", level=logging.WARNING, error=one_line(exc))
            metrics.heartbeat(False)
            return
        metrics.heartbeat(True)
        for state in states:
            if not state.held and self.holdings.lose(state.chunk_id):
                logs.event("lease lost", level=logging.WARNING, chunk=state.chunk_id, now=state.status)
                metrics.lease_lost()
