"""docs/integration.md's code runs: the FastAPI routes over a pool, and the handler under the pool."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from tests.helpers.db import new_job
from tests.helpers.pool import ROOT, progress, wait_until

DOC = ROOT / "docs" / "integration.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def load(code: str, name: str, directory: Path):
    path = directory / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_handler_runs_under_the_pool(dsn, conn, tmp_path, start_pool):
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "crawl.py").write_text(code_blocks("python")[1])
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


def test_shell_block_names_real_commands():
    (shell,) = [b for b in code_blocks("sh")]
    assert "chunkq worker --handler myapp.crawl:crawl_chunk" in shell
