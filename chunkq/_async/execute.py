"""Runs one catalogue statement on the caller's connection, under chunkq's transaction rules.

- Autocommit connection, no transaction open: the statement is its own transaction.
- Inside the caller's transaction (``conn.transaction()`` or an implicit one):
  the statement runs in a savepoint and nothing is committed; if chunkq refuses
  the call, the savepoint is rolled back and the caller's transaction stays usable.
- Non-autocommit connection with no transaction open: psycopg opens one that the
  caller commits, as with any other statement. If chunkq refuses the call, that
  transaction held nothing else and is rolled back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import BaseRowFactory

from ..errors import translate

Row = TypeVar("Row")


async def fetch(
    conn: AsyncConnection[Any], query: str, params: Mapping[str, Any], row_factory: BaseRowFactory[Row]
) -> list[Row]:
    status_before = conn.info.transaction_status
    try:
        if status_before == TransactionStatus.INTRANS:
            async with conn.transaction():
                return await _execute(conn, query, params, row_factory)
        return await _execute(conn, query, params, row_factory)
    except psycopg.Error as exc:
        if status_before == TransactionStatus.IDLE and conn.info.transaction_status == TransactionStatus.INERROR:
            await conn.rollback()
        error = translate(exc)
        if error is exc:
            raise
        raise error from exc


async def _execute(
    conn: AsyncConnection[Any], query: str, params: Mapping[str, Any], row_factory: BaseRowFactory[Row]
) -> list[Row]:
    async with conn.cursor(row_factory=row_factory) as cursor:
        await cursor.execute(query, params)
        return await cursor.fetchall()
