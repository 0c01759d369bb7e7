"""Following a job's progress: a live bar on a terminal, plain lines when piped.

Rates come from the job's own counters sampled over the last few seconds:
chunks/s and images/s, and the ETA = chunks left / chunks per second.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

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


def line(progress: JobProgress, rates: Rates) -> str:
    return (
        f"job {progress.job_id} {progress.status}: {progress.completed_chunks}/{progress.total_chunks} "
        f"completed ({progress.completion_percentage:.1f}%), {progress.failed_chunks} failed, "
        f"{progress.processing_chunks} processing, {rates.chunks_per_s:,.1f} chunks/s, "
        f"{rates.images_per_s:,.0f} images/s, {eta_text(rates.eta_s)}"
    )


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

    bar = Progress(
        TextColumn("[bold]job {task.fields[job]}[/] {task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("[red]{task.fields[failed]} failed[/] {task.fields[processing]} processing"),
        TextColumn("{task.fields[chunks_s]} chunks/s {task.fields[images_s]} images/s"),
        TextColumn("{task.fields[eta]}"),
        console=console,
    )
    with bar:
        task = bar.add_task(
            "",
            total=max(progress.total_chunks, 1),
            job=job_id,
            status="",
            failed=0,
            processing=0,
            chunks_s="0",
            images_s="0",
            eta="",
        )
        while True:
            rates = meter.add(progress)
            bar.update(
                task,
                completed=progress.completed_chunks,
                status=progress.status.value,
                failed=progress.failed_chunks,
                processing=progress.processing_chunks,
                chunks_s=f"{rates.chunks_per_s:,.1f}",
                images_s=f"{rates.images_per_s:,.0f}",
                eta=eta_text(rates.eta_s),
            )
            if progress.status in FINISHED:
                return progress
            time.sleep(interval)
            progress = jobs.progress(job_id)
