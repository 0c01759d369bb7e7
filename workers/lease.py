"""What a worker holds, and the thread that keeps its leases alive.

While the handler runs in the main thread, the LeaseKeeper heartbeats every
chunk the worker holds (one call for all of them). A chunk whose lease was lost
(reclaimed after a stall, or its job cancelled) is dropped and its task's
``lost`` event set, so the worker never reports on it. After SIGTERM the keeper
also enforces the grace period: chunks still running at the deadline are handed
back to pending (release_chunk: no retry spent) and the process exits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg

from chunkq import ChunkqError, JobChunk

from . import logs

if TYPE_CHECKING:
    from .worker import Session


class Holdings:
    """The chunks this worker holds: chunk id -> (attempt, lost event). Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held while reporting or releasing, so the two never overlap
        self._held: dict[int, tuple[int, threading.Event]] = {}

    def add(self, chunk: JobChunk) -> threading.Event:
        lost = threading.Event()
        self._held[chunk.id] = (chunk.attempt, lost)
        return lost

    def holds(self, chunk_id: int) -> bool:
        return chunk_id in self._held

    def drop(self, chunk_id: int) -> None:
        self._held.pop(chunk_id, None)

    def lose(self, chunk_id: int) -> None:
        entry = self._held.pop(chunk_id, None)
        if entry:
            entry[1].set()

    def pairs(self) -> list[tuple[int, int]]:
        return [(chunk_id, attempt) for chunk_id, (attempt, _) in list(self._held.items())]


class LeaseKeeper(threading.Thread):
    def __init__(self, session: Session, holdings: Holdings, heartbeat: float, lease: float,
                 stop_deadline: Callable[[], float | None]) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.session, self.holdings = session, holdings
        self.heartbeat, self.lease = heartbeat, lease
        self.stop_deadline = stop_deadline  # monotonic time by which running chunks must be done, once stopping
        self.finished = threading.Event()

    def run(self) -> None:
        next_beat = time.monotonic() + self.heartbeat
        while not self.finished.wait(0.1):
            deadline = self.stop_deadline()
            if deadline is not None and time.monotonic() >= deadline and self.holdings.pairs():
                self.release_all_and_exit()
            if time.monotonic() >= next_beat:
                self.beat()
                next_beat = time.monotonic() + self.heartbeat

    def beat(self) -> None:
        pairs = self.holdings.pairs()
        if not pairs:
            return
        try:
            states = self.session.chunks.heartbeat_many(pairs, lease=self.lease)
        except (psycopg.Error, ChunkqError) as exc:
            # The main thread reconnects when it next uses the connection; a missed
            # beat only matters if the outage outlasts the lease.
            logs.event("heartbeat failed", level=30, error=str(exc))
            return
        for state in states:
            if not state.held and self.holdings.holds(state.chunk_id):
                self.holdings.lose(state.chunk_id)
                logs.event("lease lost", level=30, chunk=state.chunk_id, now=state.status)

    def release_all_and_exit(self) -> None:
        """The grace period is over: hand back what is still running, without spending a retry, and exit."""
        with self.holdings.lock:
            code = 0
            for chunk_id, attempt in self.holdings.pairs():
                try:
                    self.session.chunks.release(chunk_id, attempt)
                    logs.event("chunk released", chunk=chunk_id, attempt=attempt, outcome="released")
                except (psycopg.Error, ChunkqError) as exc:
                    code = 1  # its lease will expire and it will be reclaimed
                    logs.event("release failed", level=40, chunk=chunk_id, error=str(exc))
            logs.event("grace period over, exiting", exit_code=code)
            os._exit(code)
