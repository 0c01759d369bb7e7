"""This checkout's worker pool against another commit's, drain after drain, in one run.

    python -m bench.versus --baseline REF [--dsn DSN] [--repeats 3] [--chunks 20000] [--processes 4]
                           [--batches 1,100]

How much a change to the schema or the pool costs (or gains), measured side by
side: the tree of REF (any git commit or ref) is unpacked into a temporary
folder; each side drains a no-op job with its own ``python -m workers`` (as
bench/pool.py does) in a fresh database migrated by its own migrations, on the
same server. The sides alternate, repeat after repeat, so that drift in the
machine hits both alike; the tables show medians, min-max and the ratio of the
medians, of the rate and of the CPU per chunk (worker processes, and the server
when it runs on this machine), which drifts less than the rate.
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from contextlib import ExitStack
from pathlib import Path

import psycopg

from bench.common import Summary, bench_database, parser, server_line
from bench.pool import ROOT, drain
from chunkq.embedded import embedded_server


def unpack(ref: str, into: Path) -> Path:
    """The files of commit ``ref`` of this repository, in ``into``."""
    archive = into / "baseline.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), ref], cwd=ROOT, check=True)
    tree = into / "baseline"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


Samples = dict[tuple[str, str, int], list[float]]
MEASURES = ("chunks/s", "worker CPU ms/chunk", "server CPU ms/chunk")


def compare(admin: str, baseline_ref: str, batches: list[int], repeats: int, chunks: int, processes: int) -> Samples:
    """Drains of this checkout and of ``baseline_ref``, alternating, on the server of ``admin``: every
    measurement by (what, side, batch). The sides are named "this checkout" and "baseline <commit>"."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", baseline_ref], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    samples: Samples = {}
    with ExitStack() as stack:
        baseline = unpack(baseline_ref, Path(stack.enter_context(tempfile.TemporaryDirectory())))
        sides = {
            "this checkout": (ROOT, stack.enter_context(bench_database(admin))),
            f"baseline {commit}": (baseline, stack.enter_context(bench_database(admin, checkout=baseline))),
        }
        for _ in range(repeats):
            for batch in batches:
                for side, (root, dsn) in sides.items():
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        measured = drain(dsn, conn, processes, batch, chunks, root=root).drain
                    for what, value in zip(
                        MEASURES, (measured.rate, measured.worker_cpu_ms, measured.postgres_cpu_ms), strict=True
                    ):
                        if value is not None:
                            samples.setdefault((what, side, batch), []).append(value)
                    print(
                        f"    {side}, {processes} processes, batch {batch}: {measured.rate:,.0f} chunks/s,"
                        f" worker {measured.worker_cpu_ms:.3f} ms/chunk",
                        flush=True,
                    )
    return samples


def sides_of(samples: Samples) -> tuple[str, str]:
    this, base = dict.fromkeys(side for _, side, _ in samples)
    return this, base


def report(samples: Samples, batches: list[int]) -> None:
    """Per measure, a table of both sides' medians (min-max) by batch and the ratio of the medians."""
    this, base = sides_of(samples)
    for what in MEASURES:
        if (what, this, batches[0]) not in samples:
            continue
        spec = ",.0f" if what == "chunks/s" else ".3f"
        print(f"\n| chunks per claim | {this}, {what} | {base}, {what} | this / baseline |")
        print("|---:|---:|---:|---:|")
        for batch in batches:
            new, old = Summary.of(samples[(what, this, batch)]), Summary.of(samples[(what, base, batch)])
            print(f"| {batch} | {new:{spec}} | {old:{spec}} | {new.median / old.median:.3f} |")


def main() -> None:
    p = parser("this checkout's pool against another commit's, side by side")
    p.add_argument("--baseline", required=True, help="the git commit or ref to compare with, e.g. HEAD~1")
    p.add_argument("--chunks", type=int, default=20_000, help="chunks per drain (default 20000)")
    p.add_argument("--processes", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--batches", default="1,100", help="chunks per claim, comma-separated (default 1,100)")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with ExitStack() as stack:
        admin = args.dsn or stack.enter_context(embedded_server())
        print(server_line(admin))
        samples = compare(admin, args.baseline, batches, args.repeats, args.chunks, args.processes)
    report(samples, batches)


if __name__ == "__main__":
    main()
