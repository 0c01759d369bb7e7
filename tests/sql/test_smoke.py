from tests.helpers.db import assert_counters_consistent, claim, new_job, statuses


def test_claim_and_complete_a_job(conn):
    job_id = new_job(conn, 1500)
    for chunk_id, attempt in claim(conn, limit=3):
        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
    assert statuses(conn, job_id) == {"completed": 3}
    assert_counters_consistent(conn)
