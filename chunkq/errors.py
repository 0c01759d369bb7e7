"""chunkq's exceptions, and the translation of Postgres errors into them.

Each error the SQL functions raise on purpose has its own SQLSTATE (listed in the
table ``chunkq.error_codes``) and maps to exactly one class here.
"""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors


class ChunkqError(Exception):
    """Base class of every error chunkq raises on purpose.

    ``sqlstate``, ``detail`` and ``hint`` come from the Postgres error when there
    was one; the original psycopg exception is chained as ``__cause__``.
    """

    sqlstate: str | None

    def __init__(
        self, message: str, *, sqlstate: str | None = None, detail: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.detail = detail
        self.hint = hint


class ValidationError(ChunkqError, ValueError):
    """An argument is out of range or malformed. Nothing was changed."""


class NotFound(ChunkqError, LookupError):
    """No job or chunk has that id."""


class JobNotFound(NotFound):
    """No crawl job has that id."""


class ChunkNotFound(NotFound):
    """No chunk has that id."""


class InvalidTransition(ChunkqError):
    """The job or chunk is not in a state that allows the operation."""


class JobAlreadyChunked(InvalidTransition):
    """The job already has its chunks; they are never created twice."""


class LeaseLost(ChunkqError):
    """The caller no longer holds the chunk: stop working on it.

    Its lease expired and the chunk was reclaimed, or a newer attempt holds it.
    The newer attempt was left untouched.
    """


class ChunkCancelled(LeaseLost):
    """The chunk was cancelled with its job while the caller held it."""


class RateKeyNotFound(NotFound):
    """No limits are set for that rate key."""


class Throttled(ChunkqError):
    """The chunk's job or rate key allows no claim now (its cap, bucket or block): try again later."""


class PermissionDenied(ChunkqError):
    """The database role may not do this (see the chunkq_worker / chunkq_reader / chunkq_app roles)."""


class MigrationError(ChunkqError):
    """chunkq.migrate or chunkq.rollback refused (the role lacks a privilege a pending migration needs) or a
    migration failed; the message says what is missing and how to fix it, and whether anything changed."""


class SchemaNotMigrated(ChunkqError):
    """The database has no chunkq schema, or an older one: run ``chunkq.migrate(dsn)``."""


#: SQLSTATE -> class, for the errors the SQL functions raise (see chunkq.error_codes).
ERRORS_BY_SQLSTATE: dict[str, type[ChunkqError]] = {
    "CQ001": ValidationError,
    "CQ002": JobNotFound,
    "CQ003": ChunkNotFound,
    "CQ004": InvalidTransition,
    "CQ005": JobAlreadyChunked,
    "CQ006": LeaseLost,
    "CQ007": ChunkCancelled,
    "CQ008": RateKeyNotFound,
    "CQ009": Throttled,
}

# Errors that mean "the chunkq schema is not there": no schema, function, table or type.
_MISSING_OBJECT = (
    pg_errors.InvalidSchemaName,
    pg_errors.UndefinedFunction,
    pg_errors.UndefinedTable,
    pg_errors.UndefinedObject,
)


def translate(exc: psycopg.Error) -> Exception:
    """The chunkq exception for a psycopg error, or the error itself when it is not ours.

    Bad input that Postgres itself rejects (a value out of range, text Postgres
    cannot store, malformed JSON, a failed CHECK) becomes a ValidationError.
    """
    diag = exc.diag
    message = diag.message_primary or str(exc)
    fields = {"sqlstate": exc.sqlstate, "detail": diag.message_detail, "hint": diag.message_hint}
    cls = ERRORS_BY_SQLSTATE.get(exc.sqlstate or "")
    if cls is not None:
        return cls(message, **fields)
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return PermissionDenied(message, **fields)
    if isinstance(exc, (psycopg.DataError, pg_errors.CheckViolation)):
        # Class 22 (data exception) and 23514: the input, not the database, is wrong.
        return ValidationError(message, **fields)
    if isinstance(exc, _MISSING_OBJECT) and "chunkq" in message:
        return SchemaNotMigrated(
            f"{message}: the chunkq schema is missing or outdated; run chunkq.migrate(dsn) or `yoyo apply`",
            **fields,
        )
    return exc


def one_line(exc: BaseException | str) -> str:
    """An error's message on one line, for logs and command-line errors: libpq's messages span several
    (``connection ... failed: Connection refused`` then ``Is the server running ...?``)."""
    return " ".join(str(exc).split())
