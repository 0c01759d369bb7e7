"""The async client: the source from which chunkq._sync is generated (tools/gen_sync.py)."""
