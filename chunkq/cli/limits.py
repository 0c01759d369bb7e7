"""The scheduler's commands: rate limits by key (``chunkq limit``) and a job's limits (``chunkq job limit``)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

from ..errors import ValidationError
from ..sync import CrawlJobRepository, RateLimitRepository

PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def rate(text: str) -> float:
    """``5/s``, ``300/min``, ``0.5`` (per second) -> chunks per second."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:/\s*([a-z]+))?\s*", text)
    if not match or (match.group(2) and match.group(2) not in PER):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate: say 5/s, 300/min or 2/hour")
    per_second = float(match.group(1)) / PER[match.group(2) or "s"]
    if per_second <= 0:
        raise argparse.ArgumentTypeError(f"a rate must be more than 0, got {text!r}")
    return per_second


def optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option value that ``none`` removes."""

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def add_job_options(parser: argparse.ArgumentParser, *, removable: bool) -> None:
    """The scheduling options of ``job create`` and ``job limit`` (where ``none`` removes a limit)."""
    from . import integer  # Postgres integer range, so a huge N is a usage error, not a database one

    wrap = optional if removable else (lambda kind: kind)
    default = argparse.SUPPRESS if removable else None
    tail = " (none removes it)" if removable else ""
    parser.add_argument(
        "--max-running",
        type=wrap(integer),
        metavar="N",
        default=default,
        help=f"at most N of the job's chunks running at once{tail}",
    )
    parser.add_argument(
        "--rate-key",
        type=wrap(str),
        metavar="KEY",
        default=default,
        help=f"the site, API or tenant whose limits (chunkq limit set KEY) apply{tail}",
    )
    parser.add_argument(
        "--weight",
        type=float,
        metavar="W",
        default=argparse.SUPPRESS if removable else 1.0,
        help="share of claims among the jobs of its priority (default 1; 2 gets twice the claims)",
    )
    parser.add_argument(
        "--max-failed-ratio",
        type=wrap(float),
        metavar="R",
        default=default,
        help=f"failure budget: pause the job once more than this share of its chunks failed{tail}",
    )
    parser.add_argument(
        "--max-failed-chunks",
        type=wrap(integer),
        metavar="N",
        default=default,
        help=f"failure budget: pause the job once more than N chunks failed{tail}",
    )
    parser.add_argument(
        "--max-consecutive-failures",
        type=wrap(integer),
        metavar="N",
        default=default,
        help=f"failure budget: pause the job after N failures in a row{tail}",
    )


JOB_LIMIT_OPTIONS = (
    "max_running",
    "rate_key",
    "weight",
    "max_failed_ratio",
    "max_failed_chunks",
    "max_consecutive_failures",
)


def job_limits(args: argparse.Namespace) -> dict[str, Any]:
    """The scheduling options given on the command line."""
    return {name: getattr(args, name) for name in JOB_LIMIT_OPTIONS if hasattr(args, name)}


def cmd_job_limit(args: argparse.Namespace, connect: Callable[..., Any], done: Callable[..., int]) -> int:
    changes = job_limits(args)
    if not changes:
        raise ValidationError("say which limit to change, e.g. --max-running 8 (see chunkq job limit --help)")
    with connect(args) as conn:
        job = CrawlJobRepository(conn).set_limits(args.job_id, **changes)
    shown = ", ".join(f"{name} {getattr(job, name)}" for name in JOB_LIMIT_OPTIONS)
    return done(args, job, f"job {job.id}: {shown}")


def cmd_limit_set(args: argparse.Namespace, connect: Callable[..., Any], done: Callable[..., int]) -> int:
    with connect(args) as conn:
        state = RateLimitRepository(conn).set(args.key, rate=args.rate, burst=args.burst, max_running=args.max_running)
    what = [
        f"{state.rate:g} chunks/s in bursts of {state.burst}" if state.rate else "no rate limit",
        f"at most {state.max_running} running" if state.max_running else "no cap on running chunks",
    ]
    return done(args, state, f"rate key {state.key}: {', '.join(what)}")


def cmd_limit_delete(args: argparse.Namespace, connect: Callable[..., Any], done: Callable[..., int]) -> int:
    with connect(args) as conn:
        RateLimitRepository(conn).delete(args.key)
    return done(args, {"key": args.key, "deleted": True}, f"rate key {args.key}: limits removed")


def cmd_limit_list(args: argparse.Namespace, connect: Callable[..., Any], listed: Callable[..., int]) -> int:
    with connect(args) as conn:
        states = RateLimitRepository(conn).overview()
    return listed(
        args,
        states,
        ["key", "rate", "burst", "tokens", "max_running", "running_chunks", "pending_chunks", "jobs", "held_back"],
    )
