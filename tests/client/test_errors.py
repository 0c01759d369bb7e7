"""Bad input through the client: a typed error, and the database unchanged."""

from __future__ import annotations

import math

import pytest

import chunkq
from chunkq import errors
from chunkq.sync import CrawlJobRepository, JobChunkingService, JobChunkRepository
from tests.helpers.db import snapshot


@pytest.fixture
def svc(conn):
    return JobChunkingService(JobChunkRepository(conn), CrawlJobRepository(conn), conn, worker_id="w")


@pytest.fixture
def job_id(svc):
    job = svc.job_repo.create(project_id=1, name="job", keywords=["k"], max_images=1500)
    return job.id


def test_every_sql_error_code_has_its_python_class(conn):
    table = dict(conn.execute("SELECT sqlstate, name FROM chunkq.error_codes").fetchall())
    assert table == {code: cls.__name__ for code, cls in errors.ERRORS_BY_SQLSTATE.items()}
    for name in table.values():
        assert issubclass(getattr(chunkq, name), chunkq.ChunkqError)


def test_error_hierarchy():
    assert issubclass(chunkq.ValidationError, ValueError)
    assert issubclass(chunkq.JobNotFound, chunkq.NotFound) and issubclass(chunkq.NotFound, LookupError)
    assert issubclass(chunkq.JobAlreadyChunked, chunkq.InvalidTransition)
    assert issubclass(chunkq.ChunkCancelled, chunkq.LeaseLost)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_images": 0}, "max_images must be a positive"),
        ({"max_images": -1}, "max_images must be a positive"),
        ({"max_images": 10**12}, "at most 1000000 are allowed"),
        ({"max_images": 10**30}, "out of range"),
        ({"max_images": 10, "priority": 11}, "priority must be between 0 and 10"),
        ({"max_images": 10, "priority": -3}, "priority must be between 0 and 10"),
        ({"max_images": 10, "chunk_size": 0}, "chunk_size"),
        ({"max_images": 10, "max_retries": -1}, "max_retries"),
        ({"max_images": 10, "name": " "}, "name must be"),
        ({"max_images": 10, "name": "nul\x00byte"}, "NUL"),
        ({"max_images": 10, "keywords": {"a": {1, 2}}}, "JSON-serialisable"),
        ({"max_images": 10, "keywords": [math.nan]}, "JSON-serialisable"),
        ({"max_images": 10, "keywords": [object()]}, "JSON-serialisable"),
        ({"max_images": 10, "keywords": {(1, 2): "tuple key"}}, "JSON-serialisable"),
        ({"max_images": 10, "keywords": ["nul \x00 in json"]}, "unsupported Unicode escape"),
    ],
)
def test_create_job_rejects(conn, svc, kwargs, message):
    before = snapshot(conn)
    args = {"project_id": 1, "name": "job", "keywords": [], **kwargs}
    with pytest.raises(chunkq.ValidationError, match=message):
        svc.job_repo.create(**args)
    assert snapshot(conn) == before


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s, j: s.create_chunks_for_job(j, max_images=0), chunkq.ValidationError),
        (lambda s, j: s.create_chunks_for_job(j, max_images=10**30), chunkq.ValidationError),
        (lambda s, j: s.create_chunks_for_job(j, priority=99), chunkq.ValidationError),
        (lambda s, j: s.create_chunks_for_job(j, chunk_size=-500), chunkq.ValidationError),
        (lambda s, j: s.create_chunks_for_job(424242, 10), chunkq.JobNotFound),
        (lambda s, j: s.get_next_pending_chunk(424242), chunkq.JobNotFound),
        (lambda s, j: s.get_job_chunk_progress(424242), chunkq.JobNotFound),
        (lambda s, j: s.get_failed_chunks(424242), chunkq.JobNotFound),
        (lambda s, j: s.cancel_job(424242), chunkq.JobNotFound),
        (lambda s, j: s.mark_chunk_processing(424242), chunkq.ChunkNotFound),
        (lambda s, j: s.mark_chunk_completed(424242), chunkq.ChunkNotFound),
        (lambda s, j: s.mark_chunk_failed(424242, "x"), chunkq.ChunkNotFound),
        (lambda s, j: s.retry_chunk(424242), chunkq.ChunkNotFound),
        (lambda s, j: s.chunk_repo.claim(limit=0), chunkq.ValidationError),
        (lambda s, j: s.chunk_repo.claim(lease=-1), chunkq.ValidationError),
        (lambda s, j: s.chunk_repo.list_for_job(j, status="finished"), chunkq.ValidationError),
    ],
)
def test_bad_calls_raise_typed_errors_and_change_nothing(conn, svc, job_id, call, error):
    before = snapshot(conn)
    with pytest.raises(error):
        call(svc, job_id)
    assert snapshot(conn) == before


def test_wrong_state_and_double_chunking(conn, svc, job_id):
    chunks = svc.create_chunks_for_job(job_id)
    before = snapshot(conn)
    with pytest.raises(chunkq.JobAlreadyChunked):
        svc.create_chunks_for_job(job_id)
    with pytest.raises(chunkq.InvalidTransition):
        svc.mark_chunk_completed(chunks[0].id)  # pending, never claimed
    with pytest.raises(chunkq.InvalidTransition):
        svc.retry_chunk(chunks[0].id)  # not failed
    assert snapshot(conn) == before


@pytest.mark.parametrize(
    "message",
    [
        "plain",
        "nul \x00 byte",
        "lone surrogate \ud800 here",
        "x" * 3_000_000,
        ValueError("an exception object"),
    ],
)
def test_error_messages_of_any_size_or_characters_are_recorded(conn, svc, job_id, message):
    svc.create_chunks_for_job(job_id)
    chunk = svc.get_next_pending_chunk(job_id)
    outcome = svc.mark_chunk_failed(chunk.id, message)
    assert outcome.chunk_status == "failed"
    stored = svc.get_chunk_by_id(chunk.id).error_message
    expected = str(message).replace("\x00", "\\x00").replace("\ud800", "\\ud800")[:10_000]
    assert stored.startswith(expected)


def test_unmigrated_database(empty_dsn):
    import psycopg

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        with pytest.raises(chunkq.SchemaNotMigrated, match="chunkq.migrate"):
            CrawlJobRepository(conn).get_by_id(1)
        with pytest.raises(chunkq.SchemaNotMigrated):
            chunkq.check_schema(conn)


def test_check_schema_of_a_migrated_database(conn):
    assert chunkq.check_schema(conn) == chunkq.SCHEMA_VERSION


def test_older_schema_is_refused(conn):
    conn.execute("CREATE OR REPLACE FUNCTION chunkq.schema_version() RETURNS integer LANGUAGE sql AS 'SELECT 0'")
    with pytest.raises(chunkq.SchemaNotMigrated, match="version 0"):
        chunkq.check_schema(conn)
