"""An example handler package, outside chunkq: what docker-compose.yml mounts for the worker by default."""
