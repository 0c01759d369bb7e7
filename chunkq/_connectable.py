"""What chunkq's clients run on: a psycopg connection, or a SQLAlchemy session whose engine uses the psycopg driver
(``postgresql+psycopg://``), so that chunkq's calls join the application's own transaction. Types only: SQLAlchemy
is an optional extra (``chunkq[sqlalchemy]``) and is never imported at run time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    #: The async client's connection: psycopg's AsyncConnection or SQLAlchemy's AsyncSession.
    AsyncConnectable: TypeAlias = AsyncConnection[Any] | AsyncSession
    #: The sync client's (generated from the async one's name): psycopg's Connection or SQLAlchemy's Session.
    Connectable: TypeAlias = Connection[Any] | Session
