"""The queue's gauges for Prometheus: chunkq.metrics_snapshot() rows turned into metric families.

No I/O here: the caller fetches the samples (``JobChunkRepository.metrics``, sync or async) and
``exposition`` renders what a scrape returns. Needs prometheus-client (``pip install chunkq[metrics]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from .records import MetricSample

__all__ = ["CONTENT_TYPE", "GAUGES", "exposition", "families"]

#: The classic text format, which every Prometheus reads (the names here need none of 1.0.0's escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Every gauge metrics_snapshot() returns: help text and label names. A metric a newer schema adds and
#: this table lacks is still exported, with its own label names and a generic help text.
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chunkq_chunks": ("Chunks by state, all jobs (from the counter rows).", ("state",)),
    "chunkq_job_chunks": (
        'Chunks by state of the most recent or unfinished jobs; the other jobs summed under job="other".',
        ("job", "state"),
    ),
    "chunkq_job_info": (
        "1 for each job that has series of its own, with its name and status.",
        ("job", "name", "status"),
    ),
    "chunkq_job_progress_ratio": ("Completed chunks / total chunks of a job (0 to 1).", ("job",)),
    "chunkq_job_chunks_completed_per_second": (
        "A job's completions per second over the last one to two minutes.",
        ("job",),
    ),
    "chunkq_job_eta_seconds": (
        "A job's pending and processing chunks at its current rate; absent when it stands.",
        ("job",),
    ),
    "chunkq_job_paused": ("1 while a job is paused.", ("job",)),
    "chunkq_jobs": ("Jobs by status.", ("status",)),
    "chunkq_jobs_paused": ("Jobs paused now.", ()),
    "chunkq_queue_pending_chunks": ("Pending chunks by priority (paused jobs' included).", ("priority",)),
    "chunkq_queue_oldest_pending_age_seconds": (
        "Age of the oldest pending chunk a claim may take, by priority (paused jobs' left out).",
        ("priority",),
    ),
    "chunkq_chunks_completed_per_second": ("Completions per second over the last one to two minutes, all jobs.", ()),
    "chunkq_failure_ratio": ("Failed / (completed + failed) chunks, all jobs.", ()),
    "chunkq_chunk_errors_per_second": ("Errors recorded per second over the last minute (retried ones too).", ()),
    "chunkq_chunk_deferrals_per_second": ("Chunks put back per second by a handler's retry-after, last minute.", ()),
    "chunkq_chunk_errors_last_hour": ("Errors recorded in the last hour (deferrals left out).", ()),
    "chunkq_rate_keys_throttled": ("Rate keys holding chunks back now: blocked, at their cap or out of tokens.", ()),
    "chunkq_rate_key_throttled": (
        "1 while a rate key holds chunks back (see rate_limit_state.held_back); for up to 100 keys in use.",
        ("key",),
    ),
    "chunkq_rate_key_running_chunks": ("Chunks of a rate key's unfinished jobs processing now.", ("key",)),
    "chunkq_rate_key_pending_chunks": ("Chunks of a rate key's unfinished jobs waiting.", ("key",)),
    "chunkq_rate_key_tokens": ("Tokens in a rate key's bucket now (keys with a rate only).", ("key",)),
    "chunkq_expired_leases": ("Processing chunks whose lease ran out and that no claim has taken back yet.", ()),
    "chunkq_workers_connected": ("Worker connections to the database (pool processes).", ()),
    "chunkq_dead_chunk_rows": ("Dead row versions in chunkq.job_chunks that vacuum has not removed.", ()),
    "chunkq_last_vacuum_timestamp_seconds": ("When job_chunks was last vacuumed (Unix time).", ()),
    "chunkq_autovacuum_enabled": ("1 when autovacuum is on.", ()),
    "chunkq_oldest_transaction_age_seconds": (
        "Age of the oldest open transaction in the database (it holds back vacuum); 0 when none.",
        (),
    ),
}


def families(samples: Iterable[MetricSample], *, up: bool, seconds: float) -> list[Metric]:
    """The metric families of one snapshot, plus chunkq_up (whether the snapshot could be read) and how
    long reading it took."""
    grouped: dict[str, list[MetricSample]] = {}
    for sample in samples:
        grouped.setdefault(sample.metric, []).append(sample)
    out: list[Metric] = [
        GaugeMetricFamily("chunkq_up", "1 when the database answered the scrape's query, else 0.", value=int(up)),
        GaugeMetricFamily("chunkq_metrics_query_seconds", "How long the scrape's query took.", value=seconds),
    ]
    for name, rows in sorted(grouped.items()):
        help_text, label_names = GAUGES.get(name, ("(from chunkq.metrics_snapshot)", tuple(sorted(rows[0].labels))))
        family = GaugeMetricFamily(name, help_text, labels=label_names)
        for row in rows:
            family.add_metric([str(row.labels.get(label, "")) for label in label_names], row.value)
        out.append(family)
    return out


class _Fixed(Collector):
    def __init__(self, metrics: Sequence[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def exposition(metrics: Sequence[Metric]) -> bytes:
    """The text exposition format of these families (Content-Type: CONTENT_TYPE)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(metrics))
    return generate_latest(registry)
