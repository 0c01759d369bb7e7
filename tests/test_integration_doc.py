"""docs/integration.md runs: the FastAPI routes over a pool, the SQLAlchemy app with its own crawl_jobs, Alembic's
filter, the handler under the pool, and the shell commands of "Running it" as written."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.cli.conftest import cli_env
from tests.helpers.db import new_job
from tests.helpers.pool import ROOT, progress, wait_until

DOC = ROOT / "docs" / "integration.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def block(first_line: str) -> str:
    """The python block that starts with this comment line."""
    (code,) = [b for b in code_blocks("python") if b.startswith(first_line)]
    return code


def load(code: str, name: str, directory: Path):
    path = directory / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def url_dsn(dsn: str) -> str:
    """The test database as a postgresql:// URL, as the doc's CHUNKQ_DSN is."""
    p = conninfo_to_dict(dsn)
    who, port = f"{p['user']}:{p.get('password', '')}", p.get("port", 5432)
    if str(p.get("host", "")).startswith("/"):  # a socket directory (the embedded server)
        return f"postgresql://{who}@/{p['dbname']}?host={p['host']}&port={port}"
    return f"postgresql://{who}@{p.get('host', 'localhost')}:{port}/{p['dbname']}"


def test_every_python_block_is_run_here():
    firsts = [b.splitlines()[0] for b in code_blocks("python")]
    assert firsts == ["import os", "# myapp/main.py", "# alembic/env.py (excerpt)", "# myapp/crawl.py"]


def test_fastapi_routes(dsn, conn, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("CHUNKQ_DSN", dsn)
    app = load(code_blocks("python")[0], "integration_app", tmp_path).app
    job_id = new_job(conn, 1500, chunk=False)
    with TestClient(app) as client:
        created = client.post(f"/jobs/{job_id}/chunks", params={"max_images": 1500})
        assert created.status_code == 200, created.text
        chunks = created.json()["chunks"]
        assert [(c["image_start"], c["image_end"], c["status"]) for c in chunks] == [
            (0, 499, "pending"),
            (500, 999, "pending"),
            (1000, 1499, "pending"),
        ]
        progress_ = client.get(f"/jobs/{job_id}/chunks/progress").json()
        assert (progress_["total_chunks"], progress_["pending_chunks"], progress_["is_complete"]) == (3, 3, False)
        again = client.post(f"/jobs/{job_id}/chunks", params={"max_images": 1500})
        assert (again.status_code, again.json()["sqlstate"]) == (409, "CQ005")
        assert client.get("/jobs/424242/chunks/progress").status_code == 404
        other = new_job(conn, 1000, chunk=False)
        assert client.post(f"/jobs/{other}/chunks", params={"max_images": 0}).status_code == 422


def test_the_shell_way_to_a_job_the_app_chunks(dsn, conn, tmp_path, monkeypatch):
    """What the doc says to use when the app makes the chunks: `chunkq job create --no-chunks --id 7`."""
    from fastapi.testclient import TestClient

    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "chunkq",
            "job",
            "create",
            "--no-chunks",
            "--id",
            "7",
            "--name",
            "cats",
            "--max-images",
            "1500",
        ],
        cwd=ROOT,
        env=cli_env(CHUNKQ_DSN=dsn),
        capture_output=True,
        text=True,
    )
    assert created.returncode == 0, created.stderr
    monkeypatch.setenv("CHUNKQ_DSN", dsn)
    app = load(code_blocks("python")[0], "integration_app_shell", tmp_path).app
    with TestClient(app) as client:
        assert client.post("/jobs/7/chunks", params={"max_images": 1500}).status_code == 200


@pytest.fixture
def myapp(dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """myapp/main.py and myapp/crawl.py from the doc, with the application's tables created as Alembic would."""
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(block("# myapp/main.py"))
    (package / "crawl.py").write_text(block("# myapp/crawl.py"))
    monkeypatch.setenv("CHUNKQ_DSN", url_dsn(dsn))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "myapp" or m.startswith("myapp.")]:
        del sys.modules[name]
    main = importlib.import_module("myapp.main")
    with psycopg.connect(dsn, autocommit=True) as conn:  # what the app's Alembic migration would create
        conn.execute(
            "CREATE TABLE public.crawl_jobs (id bigserial PRIMARY KEY, project_id bigint NOT NULL,"
            " name varchar(500) NOT NULL, max_images bigint NOT NULL)"
        )
    yield tmp_path, main
    for name in [m for m in sys.modules if m == "myapp" or m.startswith("myapp.")]:
        del sys.modules[name]


def rows(dsn: str, query: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


def test_sqlalchemy_app_with_its_own_crawl_jobs(dsn, myapp):
    from fastapi.testclient import TestClient

    _, main = myapp
    with TestClient(main.app) as client:
        body = {"project_id": 1, "name": "cats", "keywords": ["cat"], "max_images": 1500}
        created = client.post("/jobs", json=body)
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        assert created.json() == {"id": job_id, "total_chunks": 3}
        assert rows(dsn, "SELECT id, name FROM public.crawl_jobs") == [(job_id, "cats")]  # the app's row
        assert rows(dsn, "SELECT id, name, keywords FROM chunkq.crawl_jobs") == [(job_id, "cats", ["cat"])]
        assert client.get(f"/jobs/{job_id}/chunks/progress").json()["total_chunks"] == 3

        refused = client.post("/jobs", json={**body, "max_images": 0})
        assert refused.status_code == 422 and "max_images" in refused.json()["detail"]
        assert rows(dsn, "SELECT count(*) FROM public.crawl_jobs") == [(1,)]  # rolled back with chunkq's
        assert rows(dsn, "SELECT count(*) FROM chunkq.crawl_jobs") == [(1,)]
        assert client.get("/jobs/424242/chunks/progress").status_code == 404
    main.engine.sync_engine.dispose()


def test_alembic_autogenerate_leaves_chunkq_alone(dsn, myapp):
    """The env.py filter against a real autogenerate comparison of a database chunkq migrated."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    _, main = myapp
    env = {}
    exec(block("# alembic/env.py (excerpt)"), env)
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    with engine.connect() as connection:
        with psycopg.connect(dsn, autocommit=True) as conn:  # a database migrated before the bookkeeping moved
            conn.execute("CREATE TABLE public._yoyo_log (id integer)")
        unfiltered = MigrationContext.configure(connection, opts={"include_schemas": True})
        noisy = compare_metadata(unfiltered, main.Base.metadata)
        assert any("chunkq" in str(diff) for diff in noisy)  # without the filter: drop chunkq's tables
        filtered = MigrationContext.configure(
            connection,
            opts={
                "include_schemas": True,
                "include_name": env["include_name"],
                "include_object": env["include_object"],
            },
        )
        assert compare_metadata(filtered, main.Base.metadata) == []
    engine.dispose()
    main.engine.sync_engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_running_it_as_the_doc_says(dsn, conn, myapp):
    """The shell block, line by line: export, chunkq migrate, uvicorn serving the app, the pool crawling."""
    project, _ = myapp
    (shell,) = code_blocks("sh")
    commands = [line.split("  #")[0].strip() for line in shell.splitlines() if line.strip()]
    assert [c.split()[0] for c in commands] == ["export", "chunkq", "uvicorn", "chunkq"]
    env = {**cli_env(), "CHUNKQ_DSN": url_dsn(dsn), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    assert commands[0].startswith("export CHUNKQ_DSN=")  # the test's database instead of the doc's

    migrate = subprocess.run(shlex.split(commands[1]), cwd=project, env=env, capture_output=True, text=True)
    assert (migrate.returncode, migrate.stdout.strip()) == (0, "the schema is up to date"), migrate.stderr

    port = free_port()
    api = subprocess.Popen(
        shlex.split(commands[2].replace("--port 8000", f"--port {port}")),
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pool = None
    try:

        def post() -> dict | None:
            body = json.dumps({"project_id": 1, "name": "cats", "keywords": ["cat"], "max_images": 1500}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/jobs", body, {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return json.load(response)
            except (urllib.error.URLError, ConnectionError):
                return None

        job = wait_until(post, 30, "uvicorn to serve the app")
        assert job["total_chunks"] == 3
        pool = subprocess.Popen(
            shlex.split(commands[3].replace("--processes 8", "--processes 1")),
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: progress(dsn, job["id"]) == {"completed": 3}, 60, "the pool to crawl the job")
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(30)
        if pool is not None:
            pool.send_signal(signal.SIGTERM)
            assert pool.wait(30) == 0


def test_handler_runs_under_the_pool(dsn, conn, tmp_path, start_pool):
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "crawl.py").write_text(block("# myapp/crawl.py"))
    job_id = new_job(conn, 1500)
    empty = conn.execute("SELECT id FROM chunkq.create_job(1, 'no keywords', '[]', 500)").fetchone()[0]
    conn.execute("SELECT chunkq.create_chunks(%s)", (empty,))
    pool = start_pool("--handler", "myapp.crawl:crawl_chunk", "--processes", "1", env={"PYTHONPATH": str(tmp_path)})
    wait_until(
        lambda: progress(dsn, job_id) == {"completed": 3} and progress(dsn, empty) == {"failed": 1},
        30,
        "the jobs to finish",
    )
    assert pool.stop() == 0
    error = conn.execute("SELECT error FROM chunkq.chunk_errors WHERE job_id = %s", (empty,)).fetchone()[0]
    assert error.startswith("DoNotRetry: job has no keywords")
    sys.modules.pop("myapp", None)
