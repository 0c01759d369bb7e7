"""chunkq limit set/list/delete and a job's scheduling options on the command line."""

from __future__ import annotations

import pytest


def test_limit_set_list_and_delete(chunkq, conn):
    set_ = chunkq("limit", "set", "images.example.com", "--rate", "300/min", "--burst", "10", "--max-running", "8")
    assert set_.code == 0, set_
    assert "5 chunks/s in bursts of 10, at most 8 running" in set_.out
    listed = chunkq("limit", "list", "--json")
    assert listed.code == 0, listed
    (row,) = listed.json()
    assert (row["key"], row["rate"], row["burst"], row["max_running"]) == ("images.example.com", 5.0, 10, 8)
    assert chunkq("limit", "delete", "images.example.com").code == 0
    assert conn.execute("SELECT count(*) FROM chunkq.rate_limits").fetchone() == (0,)
    again = chunkq("limit", "delete", "images.example.com")
    assert again.code == 3 and again.err.startswith("chunkq: rate key images.example.com has no limits")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--rate", "5/fortnight"), "is not a rate"),
        (("--rate=-5/s",), "is not a rate"),
        (("--rate", "0/s"), "must be more than 0"),
        (("--burst", "3"), "needs a rate"),
        (("--rate", "5", "--burst", "0"), "burst must be between 1"),
        (("--max-running", "0"), "max_running must be at least 1"),
    ],
)
def test_bad_limits_are_refused_in_one_line(chunkq, conn, args, message):
    result = chunkq("limit", "set", "k", *args)
    assert result.code == 2, result
    assert message in result.err and len(result.err.strip().splitlines()) == 1
    assert conn.execute("SELECT count(*) FROM chunkq.rate_limits").fetchone() == (0,)


def test_job_create_takes_the_scheduling_options_and_job_limit_changes_them(chunkq, conn):
    created = chunkq(
        "job",
        "create",
        "--name",
        "crawl",
        "--max-images",
        "5000",
        "--max-running",
        "4",
        "--rate-key",
        "site",
        "--weight",
        "2",
        "--max-failed-ratio",
        "0.1",
        "--max-consecutive-failures",
        "50",
        "--json",
    )
    assert created.code == 0, created
    job = created.json()
    assert (
        job["max_running"],
        job["rate_key"],
        job["weight"],
        job["max_failed_ratio"],
        job["max_consecutive_failures"],
    ) == (4, "site", 2.0, pytest.approx(0.1), 50)
    changed = chunkq("job", "limit", str(job["id"]), "--max-running", "none", "--weight", "3", "--json")
    assert changed.code == 0, changed
    assert (changed.json()["max_running"], changed.json()["weight"], changed.json()["rate_key"]) == (None, 3.0, "site")
    nothing = chunkq("job", "limit", str(job["id"]))
    assert nothing.code == 2 and "say which limit to change" in nothing.err
    bad = chunkq("job", "limit", str(job["id"]), "--max-failed-ratio", "1.5")
    assert bad.code == 2 and "max_failed_ratio must be more than 0 and at most 1" in bad.err
