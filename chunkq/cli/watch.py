"""Following a job's progress: a live bar on a terminal, plain lines when piped.

Rates come from the job's own counters sampled over the last few seconds:
chunks/s and images/s, and the ETA = chunks left / chunks per second. When
nothing is processing because chunks wait out a retry back-off, the view says so
("3 chunks waiting to retry, next in 12 s") rather than look hung. The bar is
one short line, the counts and rates two more under it, so that it stays
readable in an 80-column terminal.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.console import RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text

from ..records import JobProgress, JobStatus
from ..sync import CrawlJobRepository
from .output import console

FINISHED = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass
class Rates:
    chunks_per_s: float
    images_per_s: float
    eta_s: float | None


class RateMeter:
    """Speed over a sliding window of (time, completed chunks, completed images) samples."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int, int]] = deque()

    def add(self, progress: JobProgress) -> Rates:
        now = time.monotonic()
        self.samples.append((now, progress.completed_chunks, progress.completed_images))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        (t0, c0, i0), (t1, c1, i1) = self.samples[0], self.samples[-1]
        span = t1 - t0
        chunks = (c1 - c0) / span if span > 0 else 0.0
        images = (i1 - i0) / span if span > 0 else 0.0
        left = progress.pending_chunks + progress.processing_chunks
        return Rates(chunks, images, left / chunks if chunks > 0 else None)


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA -"
    return f"ETA {int(seconds) // 60}:{int(seconds) % 60:02d}"


def duration_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def waiting_text(progress: JobProgress) -> str | None:
    """ "3 chunks waiting to retry, next in 12 s", or None when no chunk waits out a back-off."""
    if not progress.retrying_chunks:
        return None
    noun = "chunk" if progress.retrying_chunks == 1 else "chunks"
    text = f"{progress.retrying_chunks:,} {noun} waiting to retry"
    if progress.next_retry_at is not None:
        text += f", next in {duration_text((progress.next_retry_at - datetime.now(UTC)).total_seconds())}"
    return text


def line(progress: JobProgress, rates: Rates) -> str:
    waiting = waiting_text(progress)
    return (
        f"job {progress.job_id} {progress.status}: {progress.completed_chunks}/{progress.total_chunks} "
        f"completed ({progress.completion_percentage:.1f}%), {progress.failed_chunks} failed, "
        f"{progress.processing_chunks} processing, {f'{waiting}, ' if waiting else ''}"
        f"{rates.chunks_per_s:,.1f} chunks/s, {rates.images_per_s:,.0f} images/s, {eta_text(rates.eta_s)}"
    )


class JobBar(Progress):
    """The bar on one line (job, status, bar, done/total, %, ETA), and under it the counts and the rates."""

    details: list[Text]

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield from getattr(self, "details", [])


def details(progress: JobProgress, rates: Rates) -> list[Text]:
    counts = Text.assemble(
        (f"{progress.failed_chunks:,} failed", "red" if progress.failed_chunks else ""),
        f", {progress.processing_chunks:,} processing",
    )
    waiting = waiting_text(progress)
    if waiting:
        counts.append(f", {waiting}", style="yellow")
    speed = Text(f"{rates.chunks_per_s:,.1f} chunks/s, {rates.images_per_s:,.0f} images/s")
    for text in (counts, speed):
        text.no_wrap, text.overflow = True, "ellipsis"
    return [counts, speed]


def watch(jobs: CrawlJobRepository, job_id: int, interval: float = 0.5) -> JobProgress:
    """Follows the job until it finishes; returns its last progress. Raises JobNotFound at once."""
    meter = RateMeter()
    progress = jobs.progress(job_id)
    if not console.is_terminal:
        # Piped: a plain line now and then, no escape codes.
        last_line = 0.0
        while True:
            rates = meter.add(progress)
            if progress.status in FINISHED or time.monotonic() - last_line >= max(interval, 2.0):
                print(line(progress, rates), flush=True)
                last_line = time.monotonic()
            if progress.status in FINISHED:
                return progress
            time.sleep(interval)
            progress = jobs.progress(job_id)

    bar = JobBar(
        TextColumn("[bold]job {task.fields[job]}[/] {task.fields[status]}"),
        BarColumn(bar_width=None),
        MofNCompleteColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[eta]}"),
        console=console,
        expand=True,
    )
    bar.details = []
    with bar:
        task = bar.add_task("", total=max(progress.total_chunks, 1), job=job_id, status="", eta="")
        while True:
            rates = meter.add(progress)
            bar.details = details(progress, rates)
            fields: dict[str, Any] = {"status": progress.status.value, "eta": eta_text(rates.eta_s)}
            bar.update(task, completed=progress.completed_chunks, **fields)
            if progress.status in FINISHED:
                bar.refresh()
                return progress
            time.sleep(interval)
            progress = jobs.progress(job_id)
