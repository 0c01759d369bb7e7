# Generated from chunkq/_async/execute.py by tools/gen_sync.py: do not edit; edit the async source.
"""Runs one catalogue statement on the caller's connection, under chunkq's transaction rules.

- Autocommit connection, no transaction open: the statement is its own transaction.
- Inside the caller's transaction (``conn.transaction()`` or an implicit one):
  the statement runs in a savepoint and nothing is committed; if chunkq refuses
  the call, the savepoint is rolled back and the caller's transaction stays usable.
- Non-autocommit connection with no transaction open: psycopg opens one that the
  caller commits, as with any other statement. If chunkq refuses the call, that
  transaction held nothing else and is rolled back.
- A SQLAlchemy session (psycopg driver): the statement runs on the connection of
  the session's transaction, by the rules above; the session commits or rolls
  back, chunkq never does. A refusal leaves the session's transaction usable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import Connection
from psycopg.pq import TransactionStatus
from psycopg.rows import BaseRowFactory

from ..errors import translate

if TYPE_CHECKING:
    from .._connectable import Connectable

Row = TypeVar("Row")


def driver_connection(conn: Connectable) -> Connection[Any]:
    """The psycopg connection to run on: ``conn`` itself, or the one a SQLAlchemy session's transaction holds.

    Asking the session for its connection begins the session's transaction if it has none yet (as any
    statement of the session would) and commits nothing.
    """
    if isinstance(conn, Connection):
        return conn
    if not type(conn).__module__.startswith("sqlalchemy") or not hasattr(conn, "connection"):
        raise TypeError(f"chunkq runs on a psycopg connection or a SQLAlchemy session, not a {type(conn).__name__}")
    session_connection = conn.connection()
    pooled = session_connection.connection
    driver = pooled.driver_connection
    if not isinstance(driver, Connection):
        raise TypeError(
            f"the SQLAlchemy session's engine uses {type(driver).__module__}, not psycopg: "
            "create it from a postgresql+psycopg:// URL"
        )
    return driver


def fetch(conn: Connectable, query: str, params: Mapping[str, Any], row_factory: BaseRowFactory[Row]) -> list[Row]:
    conn = driver_connection(conn)
    status_before = conn.info.transaction_status
    try:
        if status_before == TransactionStatus.INTRANS:
            with conn.transaction():
                return _execute(conn, query, params, row_factory)
        return _execute(conn, query, params, row_factory)
    except psycopg.Error as exc:
        if status_before == TransactionStatus.IDLE and conn.info.transaction_status == TransactionStatus.INERROR:
            conn.rollback()
        error = translate(exc)
        if error is exc:
            raise
        raise error from exc


def _execute(
    conn: Connection[Any], query: str, params: Mapping[str, Any], row_factory: BaseRowFactory[Row]
) -> list[Row]:
    with conn.cursor(row_factory=row_factory) as cursor:
        cursor.execute(query, params)
        return cursor.fetchall()
