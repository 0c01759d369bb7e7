"""What the dashboard shows of each record, as display strings: the templates and the live JSON use the same
dictionaries, so a value looks the same on first paint and after every update."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from .._times import FAR_FUTURE
from ..records import FailureKind, JobBlocker, JobOverview, LiveWorker, MetricSample

#: Headlines for job_blockers() reasons. A reason the SQL adds later shows with its code as headline
#: until it gets one here.
BLOCKER_TITLES = {
    "finished": "Finished",
    "not_chunked": "Nothing claimable yet",
    "paused": "Paused",
    "capped": "Capped by max_running",
    "rate_limited": "Held back by its rate key",
    "waiting_for_retry": "Waiting for retry backoff",
    "behind_higher_priority": "Queued behind higher-priority work",
    "no_workers": "No workers connected",
}

DASH = "–"
NEVER = FAR_FUTURE  # how chunkq reads a timestamptz of 'infinity'


def duration(value: timedelta | float | None) -> str:
    """``3h 04m``, ``4m 12s``, ``12s``, ``0.4s``; a dash for None."""
    if value is None:
        return DASH
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        return "in " + duration(-seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def moment(value: datetime | None) -> str:
    if value == NEVER:
        return "not while the job is paused"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else DASH


def ago(value: datetime | None) -> str:
    return duration(datetime.now(UTC) - value) + " ago" if value else DASH


def number(value: int | None) -> str:
    return DASH if value is None else f"{value:,}"


def rate(value: float | None) -> str:
    return DASH if not value else f"{value:,.1f}/s"


def job_row(job: JobOverview) -> dict[str, Any]:
    """A job in the jobs list and at the top of its page."""
    return {
        "key": str(job.id),
        "id": str(job.id),
        "url": f"/jobs/{job.id}",
        "name": job.name,
        "status": "paused" if job.paused_at and job.finished_at is None else str(job.status),
        "priority": str(job.priority),
        "percent": job.completion_percentage,
        "percent_text": f"{job.completion_percentage:.1f}%",
        "done": f"{job.completed_chunks:,} / {job.total_chunks:,}",
        "total": number(job.total_chunks),
        "pending": number(job.pending_chunks),
        "processing": number(job.processing_chunks),
        "completed": number(job.completed_chunks),
        "failed": number(job.failed_chunks),
        "cancelled": number(job.cancelled_chunks),
        "images": f"{job.completed_images:,} / {job.max_images:,}",
        "rate": rate(job.chunks_per_second),
        "eta": DASH if job.paused_at else duration(job.eta),
        "created": moment(job.created_at),
        "started": moment(job.started_at),
        "finished": moment(job.finished_at),
        "paused_at": moment(job.paused_at),
    }


def blocker_row(blocker: JobBlocker) -> dict[str, Any]:
    title = BLOCKER_TITLES.get(blocker.reason, blocker.reason.replace("_", " ").capitalize())
    return {"key": blocker.reason, "reason": blocker.reason, "title": title, "detail": blocker.detail}


def failure_row(kind: FailureKind) -> dict[str, Any]:
    return {
        "key": kind.error_kind,
        "kind": kind.error_kind,
        "occurrences": number(kind.occurrences),
        "chunks": number(kind.chunks),
        "ended_failed": number(kind.ended_failed),
        "last_seen": ago(kind.last_seen),
        "example": kind.example_error,
        "example_url": f"/chunks/{kind.example_chunk_id}",
        "example_chunk": str(kind.example_chunk_id),
    }


def worker_row(worker: LiveWorker) -> dict[str, Any]:
    lease = DASH
    if worker.next_lease_expiry is not None:
        left = worker.next_lease_expiry - datetime.now(UTC)
        lease = f"in {duration(left)}" if left >= timedelta(0) else f"expired {duration(-left)} ago"
    return {
        "key": worker.worker_id,
        "worker": worker.worker_id,
        "connected": "yes" if worker.backend_pid is not None else "gone",
        "pid": DASH if worker.backend_pid is None else str(worker.backend_pid),
        "since": ago(worker.connected_since),
        "held": number(worker.chunks_held),
        "oldest_claim": ago(worker.oldest_claim),
        "heartbeat": DASH if worker.heartbeat_age is None else duration(worker.heartbeat_age) + " ago",
        "lease": lease,
    }


def queue_summary(samples: list[MetricSample]) -> dict[str, Any]:
    """The strip at the top of every page, from a metrics snapshot without per-job series."""
    value: dict[tuple[str, str], float] = {}
    for sample in samples:
        value[(sample.metric, sample.labels.get("state", sample.labels.get("status", "")))] = sample.value

    def count(metric: str, label: str = "") -> str:
        return number(int(value.get((metric, label), 0)))

    ratio = value.get(("chunkq_failure_ratio", ""))
    return {
        "pending": count("chunkq_chunks", "pending"),
        "processing": count("chunkq_chunks", "processing"),
        "failed": count("chunkq_chunks", "failed"),
        "running_jobs": count("chunkq_jobs", "running"),
        "rate": rate(value.get(("chunkq_chunks_completed_per_second", ""))),
        "workers": count("chunkq_workers_connected"),
        "expired": count("chunkq_expired_leases"),
        "failure_ratio": DASH if ratio is None else f"{ratio:.1%}",
    }
