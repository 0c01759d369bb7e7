"""Generates the sync client (chunkq/_sync) from the async source (chunkq/_async).

psycopg's approach: one source, the other side generated and committed, and a
test (tests/client/test_sync_generated.py) fails when the two drift apart.

    python tools/gen_sync.py           # rewrite chunkq/_sync/*.py
    python tools/gen_sync.py --check   # exit 1 if they are out of date
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import unasync

ROOT = Path(__file__).resolve().parent.parent
ASYNC_DIR = ROOT / "chunkq" / "_async"
SYNC_DIR = ROOT / "chunkq" / "_sync"
# _async/__init__.py describes the source; _sync/__init__.py is written by hand.
SOURCES = sorted(p.name for p in ASYNC_DIR.glob("*.py") if p.name != "__init__.py")
REPLACEMENTS = {
    "AsyncConnection": "Connection",
    "AsyncCursor": "Cursor",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncConnectable": "Connectable",
}
HEADER = "# Generated from chunkq/_async/{name} by tools/gen_sync.py: do not edit; edit the async source.\n"
#: Where SQLAlchemy's sync API is not the async one without ``await``: text rewritten after unasync.
SYNC_REWRITES = {
    # AsyncConnection.get_raw_connection() is a coroutine; a sync Connection has the property .connection.
    "session_connection.get_raw_connection()": "session_connection.connection",
}


def generated() -> dict[str, str]:
    """File name -> the sync module it should contain."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "_async"
        src.mkdir()
        for name in SOURCES:
            shutil.copy(ASYNC_DIR / name, src / name)
        rule = unasync.Rule("/_async/", "/_sync/", additional_replacements=REPLACEMENTS)
        unasync.unasync_files([str(src / name) for name in SOURCES], rules=[rule])
        return {
            name: formatted(name, HEADER.format(name=name) + rewritten(Path(tmp) / "_sync" / name)) for name in SOURCES
        }


def rewritten(path: Path) -> str:
    text = path.read_text()
    for old, new in SYNC_REWRITES.items():
        text = text.replace(old, new)
    return text


def formatted(name: str, source: str) -> str:
    """The module as ruff leaves it (imports sorted, then formatted), like every other file here."""
    path = str(SYNC_DIR / name)
    for command in (["check", "--fix", "--quiet", "--exit-zero"], ["format", "--quiet"]):
        source = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "--stdin-filename", path, "-"],
            input=source,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    return source


def main(argv: list[str]) -> int:
    expected = generated()
    stale = [
        name
        for name, text in expected.items()
        if not (SYNC_DIR / name).exists() or (SYNC_DIR / name).read_text() != text
    ]
    if "--check" in argv:
        for name in stale:
            print(f"chunkq/_sync/{name} is out of date: run ./dev gen", file=sys.stderr)
        return 1 if stale else 0
    for name in stale:
        (SYNC_DIR / name).write_text(expected[name])
        print(f"wrote chunkq/_sync/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
