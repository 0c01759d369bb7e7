"""The sync client, generated from chunkq._async by tools/gen_sync.py (except this file)."""
