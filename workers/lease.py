"""What a worker holds, and the thread that keeps its leases alive and watches the clock and the parent.

While the handler runs in the main thread, the LeaseKeeper heartbeats every
chunk the worker holds (one call for all of them). A chunk whose lease was lost
(reclaimed after a stall, or its job cancelled) is marked lost and its task's
``lost`` event set, so the worker never reports on it. The keeper also calls the
worker back when the grace period after SIGTERM is over (running chunks are then
handed back) and when the supervisor is gone (the worker stops at once).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg

from chunkq import ChunkqError, JobChunk
from chunkq.errors import one_line
from chunkq.records import Lease

from . import logs, metrics

if TYPE_CHECKING:
    from .worker import Session


@dataclass
class Held:
    """One chunk the worker holds, from its claim until its outcome is reported."""

    chunk: JobChunk
    lost: threading.Event = field(default_factory=threading.Event)  # the lease is gone: never report on it
    took_ms: float | None = None  # set once the handler completed it: reported with the next claim


class Holdings:
    """The chunks this worker holds, by id. Thread-safe; ``lock`` is held while chunks are claimed,
    reported or handed back, so that those never overlap and never miss a chunk (re-entrant: a hand-back
    reports what is finished, then releases the rest, under one hold)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._held: dict[int, Held] = {}

    def add(self, chunks: list[JobChunk]) -> None:
        for chunk in chunks:
            self._held[chunk.id] = Held(chunk)

    def get(self, chunk_id: int) -> Held | None:
        return self._held.get(chunk_id)

    def drop(self, chunk_id: int) -> None:
        self._held.pop(chunk_id, None)

    def lose(self, chunk_id: int) -> bool:
        """Marks a chunk lost (its lease is gone); True if it was held and not lost yet."""
        held = self._held.get(chunk_id)
        if held is None or held.lost.is_set():
            return False
        held.lost.set()
        return True

    def all(self) -> list[Held]:
        return list(self._held.values())

    def finished(self) -> list[Held]:
        """Completed by the handler, not reported yet (lost ones included: they are logged, not reported)."""
        return [held for held in self.all() if held.took_ms is not None]

    def leases(self) -> list[Lease]:
        """The leases to keep alive: every chunk held and not lost."""
        return [held.chunk.lease for held in self.all() if not held.lost.is_set()]


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
        while not self.finished.wait(0.1):
            try:
                if os.getppid() != self.parent:  # re-parented: the supervisor died (kill -9, OOM killer)
                    self.orphaned()
                deadline = self.stop_deadline()
                if deadline is not None and time.monotonic() >= deadline and self.holdings.all():
                    self.past_deadline()
                if time.monotonic() >= next_beat:
                    self.beat()
                    next_beat = time.monotonic() + self.heartbeat
            except Exception:
                # Keep the leases alive whatever went wrong once; the worker carries on.
                logs.log.exception("lease keeper failed")

    def beat(self) -> None:
        leases = self.holdings.leases()
        if not leases:
            return
        try:
            states = self.session.chunks.heartbeat_many(leases, lease=self.lease)
        except (psycopg.Error, ChunkqError) as exc:
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
