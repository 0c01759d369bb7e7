"""chunkq web: the dashboard (jobs, a job's chunks and failures, workers, actions) and /metrics, in one
ASGI process. Needs the web extra: ``pip install 'chunkq[web]'``."""

from __future__ import annotations

import logging

from .app import WebConfig, create_app

__all__ = ["WebConfig", "create_app", "serve"]


def serve(config: WebConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Runs the dashboard with uvicorn until SIGINT or SIGTERM. Actions and database outages are logged on
    stderr (the operators' audit trail); requests are not."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=5,
        lifespan="on",
    )
