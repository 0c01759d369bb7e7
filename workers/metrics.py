"""The pool's Prometheus metrics (--metrics-port): counted in every worker process and served by the
supervisor as one endpoint, through prometheus-client's multiprocess mode in a private directory.

The worker loop calls the hooks below at a handful of named points. Without --metrics-port
prometheus-client is never imported and every hook returns at once (one global read).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import PoolConfig

#: Where the processes of a pool keep their counts; prometheus-client reads it when it is first imported,
#: so the supervisor sets it before that, and the workers it spawns inherit it.
DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
#: Handler durations: a chunk may take milliseconds (a no-op) or minutes (500 images over the network).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _Counts:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.chunks = Counter(
            "chunkq_worker_chunks", "Chunks whose outcome a worker reported, by outcome.", ["outcome"]
        )
        self.duration = Histogram(
            "chunkq_worker_handler_duration_seconds",
            "Time the handler took per chunk, successful or not.",
            buckets=DURATION_BUCKETS,
        )
        self.claims = Counter("chunkq_worker_claims", "Claim calls, by whether they got chunks.", ["result"])
        self.claimed = Counter("chunkq_worker_chunks_claimed", "Chunks handed to the pool's workers by claims.")
        self.heartbeats = Counter(
            "chunkq_worker_heartbeats",
            "Heartbeat calls (one per beat for every chunk a worker holds), by result.",
            ["result"],
        )
        self.lease_losses = Counter(
            "chunkq_worker_lease_losses",
            "Chunks a worker found it no longer held while it ran them (reclaimed or cancelled).",
        )
        self.reconnects = Counter("chunkq_worker_reconnects", "Times a worker lost its connection and reconnected.")
        self.restarts = Counter("chunkq_pool_worker_restarts", "Worker processes that died and were restarted.")


_counts: _Counts | None = None


def start_worker(config: PoolConfig) -> None:
    """In a worker process, first thing: count from now on if the pool serves metrics."""
    global _counts
    if config.metrics_port is not None and os.environ.get(DIRECTORY):
        _counts = _Counts()


# -- the hooks the worker loop calls --------------------------------------------------------------------------


def chunk_outcome(outcome: str) -> None:
    """completed, retrying, failed, deferred, lease_lost, cancelled, released, refused."""
    if _counts is not None:
        _counts.chunks.labels(outcome).inc()


def handler_took(seconds: float) -> None:
    if _counts is not None:
        _counts.duration.observe(seconds)


def claimed(chunks: int) -> None:
    if _counts is not None:
        _counts.claims.labels("chunks" if chunks else "empty").inc()
        _counts.claimed.inc(chunks)


def heartbeat(ok: bool) -> None:
    if _counts is not None:
        _counts.heartbeats.labels("ok" if ok else "error").inc()


def lease_lost() -> None:
    if _counts is not None:
        _counts.lease_losses.inc()


def reconnected() -> None:
    if _counts is not None:
        _counts.reconnects.inc()


def worker_restarted() -> None:
    if _counts is not None:
        _counts.restarts.inc()


# -- the endpoint, in the supervisor ---------------------------------------------------------------------------


class Endpoint:
    """The HTTP server (prometheus-client's own, a thread) that sums the counts of every worker, living or dead."""

    def __init__(self, config: PoolConfig, processes: Callable[[], int]) -> None:
        assert config.metrics_port is not None
        self.directory = tempfile.mkdtemp(prefix="chunkq-pool-metrics-")
        os.environ[DIRECTORY] = self.directory  # before prometheus_client is imported, here and in the workers
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        registry.register(_PoolCollector(processes))
        try:
            self.server, self.thread = start_http_server(config.metrics_port, config.metrics_host, registry)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def process_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)


class _PoolCollector:
    """What only the supervisor knows, read at scrape time."""

    def __init__(self, processes: Callable[[], int]) -> None:
        self.processes = processes

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "chunkq_pool_processes", "Worker processes the supervisor runs now.", value=self.processes()
        )


_endpoint: Endpoint | None = None


def serve(config: PoolConfig, processes: Callable[[], int]) -> None:
    """In the supervisor, before any worker starts: serve /metrics on --metrics-host:--metrics-port (OSError if
    the port is taken). Does nothing without --metrics-port."""
    global _endpoint
    if config.metrics_port is not None:
        _endpoint = Endpoint(config, processes)
        start_worker(config)  # the supervisor counts restarts into the same directory


def process_dead(pid: int | None) -> None:
    """A worker process ended: its live gauges (a handler's own, if any) stop counting; its counters stay."""
    if _endpoint is not None and pid is not None:
        _endpoint.process_dead(pid)


def stop() -> None:
    global _endpoint
    if _endpoint is not None:
        _endpoint.close()
        _endpoint = None
