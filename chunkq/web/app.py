"""The dashboard as an ASGI app (Starlette, Jinja2): pages, their live JSON twins, actions and /metrics.

Every answer is a few calls of the SQL API through the async client, on connections from one
psycopg_pool.AsyncConnectionPool. Everything that arrives over HTTP is untrusted: parameters are parsed
strictly (400), bodies are bounded (413), and a database outage is a 503 page, not a dead server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import psycopg
from jinja2 import Environment, FileSystemLoader
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import metrics
from .._async.repositories import CrawlJobRepository, JobChunkRepository
from .._times import TIMESTAMPTZ_OID, InfinityTimestamptzLoader
from ..errors import InvalidTransition, NotFound, PermissionDenied, ValidationError, one_line
from ..records import JobStatus
from . import views
from .auth import COOKIE, SESSION_SECONDS, Auth

logger = logging.getLogger("chunkq.web")

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
MAX_BODY = 16 * 1024  # bytes: the largest form is a token and a CSRF token
POOL_WAIT = 2.0  # seconds a request waits for a connection before the 503 page
DATABASE_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
ID = re.compile(r"[0-9]{1,18}")  # a bigint that cannot overflow
ACTIONS = ("pause", "resume", "cancel", "retry-failed", "priority")
DONE = {
    "pause": "Job paused.",
    "resume": "Job resumed.",
    "cancel": "Job cancelled.",
    "retry-failed": "Failed chunks put back to pending.",
    "priority": "Priority changed.",
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


@dataclass(frozen=True)
class WebConfig:
    dsn: str
    token: str | None = None  # None: read-only
    top_jobs: int = 20  # jobs with series of their own in /metrics
    refresh: float = 2.0  # seconds between live updates in the browser


@dataclass(frozen=True)
class JobFilters:
    status: str | None
    name: str | None
    page: int

    @classmethod
    def parse(cls, request: Request) -> JobFilters:
        params = request.query_params
        status = params.get("status") or None
        if status is not None and status not in JobStatus.__members__.values():
            raise HTTPException(400, f"status must be one of {', '.join(JobStatus)}")
        name = params.get("name") or None
        if name is not None and (len(name) > 200 or "\x00" in name):
            raise HTTPException(400, "name must be at most 200 characters, without NUL")
        page = params.get("page") or "1"
        if not re.fullmatch(r"[0-9]{1,6}", page) or int(page) < 1:
            raise HTTPException(400, "page must be a positive whole number")
        return cls(status, name, int(page))

    def query(self, **change: Any) -> str:
        values = {"status": self.status, "name": self.name, "page": self.page, **change}
        return "?" + urlencode({key: value for key, value in values.items() if value not in (None, "", 1)})


def path_id(request: Request, name: str) -> int:
    raw = request.path_params[name]
    if not ID.fullmatch(raw):
        raise HTTPException(400, f"{name.replace('_', ' ')} must be a positive whole number")
    return int(raw)


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form (Guard has bounded it already), empty without a body; 400 for anything else."""
    body = await request.body()
    if not body:
        return {}
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HTTPException(400, "expected a form (application/x-www-form-urlencoded)")
    try:
        fields = parse_qs(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=10, strict_parsing=False, errors="strict"
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPException(400, f"malformed form: {one_line(exc)}") from exc
    return {key: values[-1] for key, values in fields.items()}


class Dashboard:
    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self.auth = Auth(config.token)
        self.pool = AsyncConnectionPool(
            config.dsn,
            min_size=1,
            max_size=4,
            open=False,
            timeout=POOL_WAIT,
            name="chunkq-web",
            kwargs={"autocommit": True, "connect_timeout": 5, "application_name": "chunkq web"},
            configure=self.configure,
            check=AsyncConnectionPool.check_connection,
            # Give up a failing reconnection after 10 s (the next request starts a fresh one) rather than back off
            # for minutes: after a long outage the pages would stay 503 that long once the database is back.
            reconnect_timeout=10,
        )
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)

    @staticmethod
    async def configure(conn: AsyncConnection[Any]) -> None:
        # A paused job's pending chunks wait with available_at = infinity, which datetime cannot hold.
        conn.adapters.register_loader(TIMESTAMPTZ_OID, InfinityTimestamptzLoader)
        # A page that waits on a lock or a huge plan gives up instead of piling up requests.
        await conn.execute("SET statement_timeout = '10s'")

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.pool.open(wait=False)  # the server starts (and says 503) even while the database is down
        try:
            yield
        finally:
            await self.pool.close()

    @contextlib.asynccontextmanager
    async def repos(self) -> AsyncIterator[tuple[CrawlJobRepository, JobChunkRepository]]:
        async with self.pool.connection() as conn:
            yield CrawlJobRepository(conn), JobChunkRepository(conn)

    # -- rendering ------------------------------------------------------------------------------------------

    def render(self, request: Request, template: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        session = self.auth.session(request)
        html = self.templates.get_template(template).render(
            **context,
            path=request.url.path,
            actions=self.auth.enabled,
            signed_in=session is not None,
            csrf=session.csrf if session else "",
            refresh_ms=int(self.config.refresh * 1000),
        )
        return HTMLResponse(html, status_code=status)

    def error(self, request: Request, status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"status": status, "error": detail}, status_code=status, headers=headers)
        titles = {
            400: "Bad request",
            403: "Forbidden",
            404: "Not found",
            405: "Method not allowed",
            409: "Refused",
            413: "Request too large",
            503: "Database unavailable",
        }
        response = self.render(
            request, "error.html", {"status": status, "title": titles.get(status, "Error"), "detail": detail}, status
        )
        response.headers.update(headers or {})
        return response

    # -- pages and their live twins -------------------------------------------------------------------------

    async def jobs_data(self, filters: JobFilters) -> dict[str, Any]:
        async with self.repos() as (jobs, chunks):
            total = await jobs.count(filters.status, filters.name)
            rows = await jobs.search(
                filters.status, filters.name, limit=PAGE_SIZE, offset=(filters.page - 1) * PAGE_SIZE
            )
            summary = views.queue_summary(await chunks.metrics(top_jobs=0))
        return {"fields": summary, "rows": {"jobs": [views.job_row(job) for job in rows]}, "total": total}

    async def jobs_page(self, request: Request) -> Response:
        filters = JobFilters.parse(request)
        data = await self.jobs_data(filters)
        pages = max(1, -(-data["total"] // PAGE_SIZE))
        return self.render(
            request,
            "jobs.html",
            {
                **data,
                "filters": filters,
                "pages": pages,
                "statuses": list(JobStatus),
                "live": "/api/jobs" + filters.query(),
                "prev": filters.query(page=filters.page - 1) if filters.page > 1 else None,
                "next": filters.query(page=filters.page + 1) if filters.page < pages else None,
            },
        )

    async def jobs_api(self, request: Request) -> Response:
        return JSONResponse(await self.jobs_data(JobFilters.parse(request)))

    async def job_data(self, job_id: int) -> dict[str, Any]:
        async with self.repos() as (jobs, chunks):
            overview = await jobs.get_overview(job_id)
            if overview is None:
                raise HTTPException(404, f"there is no job {job_id}")
            blockers = await jobs.blockers(job_id)
            kinds = await jobs.failure_summary(job_id, limit=10)
        return {
            "fields": views.job_row(overview),
            "rows": {
                "blockers": [views.blocker_row(b) for b in blockers],
                "failures": [views.failure_row(k) for k in kinds],
            },
            "moving": not blockers,
        }

    async def job_page(self, request: Request) -> Response:
        job_id = path_id(request, "job_id")
        data = await self.job_data(job_id)
        async with self.repos() as (jobs, chunks):
            job = await jobs.get_by_id(job_id)
            failed = await chunks.list_for_job(job_id, "failed", limit=20)
        if job is None:
            raise HTTPException(404, f"there is no job {job_id}")
        done = DONE.get(request.query_params.get("done", ""))
        return self.render(
            request,
            "job.html",
            {
                **data,
                "job": job,
                "failed": failed,
                "done": done,
                "keywords": json.dumps(job.keywords, ensure_ascii=False),
                "live": f"/api/jobs/{job_id}",
            },
        )

    async def job_api(self, request: Request) -> Response:
        return JSONResponse(await self.job_data(path_id(request, "job_id")))

    async def chunk_page(self, request: Request) -> Response:
        chunk_id = path_id(request, "chunk_id")
        async with self.repos() as (_, chunks):
            chunk = await chunks.get_by_id(chunk_id)
            if chunk is None:
                raise HTTPException(404, f"there is no chunk {chunk_id}")
            history = await chunks.error_history(chunk_id)
        return self.render(request, "chunk.html", {"chunk": chunk, "history": history, "moment": views.moment})

    async def workers_data(self) -> dict[str, Any]:
        async with self.repos() as (_, chunks):
            workers = await chunks.live_workers()
            expired = await chunks.expired_leases()
            summary = views.queue_summary(await chunks.metrics(top_jobs=0))
        return {
            "fields": summary,
            "rows": {
                "workers": [views.worker_row(w) for w in workers],
                "expired": [
                    {
                        "key": str(e.chunk_id),
                        "chunk": str(e.chunk_id),
                        "url": f"/chunks/{e.chunk_id}",
                        "job": str(e.job_id),
                        "worker": e.worker_id or views.DASH,
                        "expired_for": views.duration(e.expired_for),
                    }
                    for e in expired[:50]
                ],
            },
        }

    async def workers_page(self, request: Request) -> Response:
        return self.render(request, "workers.html", {**await self.workers_data(), "live": "/api/workers"})

    async def workers_api(self, request: Request) -> Response:
        return JSONResponse(await self.workers_data())

    async def metrics(self, request: Request) -> Response:
        """The queue's gauges; chunkq_up 0 (and nothing else) while the database is unreachable."""
        started = time.perf_counter()
        try:
            async with self.repos() as (_, chunks):
                samples, up = await chunks.metrics(self.config.top_jobs), True
        except DATABASE_DOWN as exc:
            logger.warning("metrics: database unreachable: %s", one_line(exc))
            samples, up = [], False
        body = metrics.exposition(metrics.families(samples, up=up, seconds=time.perf_counter() - started))
        return Response(body, media_type=metrics.CONTENT_TYPE)

    async def health(self, request: Request) -> Response:
        return Response("ok\n", media_type="text/plain")

    async def no_icon(self, request: Request) -> Response:
        return Response(status_code=204)

    # -- signing in and acting ------------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", {"wrong": False})

    async def login(self, request: Request) -> Response:
        if not self.auth.enabled:
            raise HTTPException(403, "this dashboard is read-only: start it with $CHUNKQ_WEB_TOKEN or --token-file")
        form = await read_form(request)
        session_id = self.auth.sign_in(form.get("token", ""))
        if session_id is None:
            await asyncio.sleep(0.5)  # slows guessing down a little; the token's length does the rest
            return self.render(request, "login.html", {"wrong": True}, 403)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        form = await read_form(request)
        if not self.auth.may_act(request, form.get("csrf", "")):
            raise HTTPException(403, "sign out from the dashboard's own page")
        self.auth.sign_out(request)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def act(self, request: Request) -> Response:
        job_id = path_id(request, "job_id")
        action = request.path_params["action"]
        if action not in ACTIONS:
            raise HTTPException(404, f"no action {action!r}")
        if not self.auth.enabled:
            raise HTTPException(403, "this dashboard is read-only: actions need $CHUNKQ_WEB_TOKEN or --token-file")
        form = await read_form(request)
        if not self.auth.may_act(request, form.get("csrf", "")):
            raise HTTPException(
                403, "sign in first, and act from the dashboard's own pages (CSRF token missing or wrong)"
            )
        async with self.repos() as (jobs, chunks):
            if action == "pause":
                await jobs.pause(job_id)
            elif action == "resume":
                await jobs.resume(job_id)
            elif action == "cancel":
                await jobs.cancel(job_id)
            elif action == "retry-failed":
                await chunks.retry_failed(job_id)
            else:
                priority = form.get("priority", "")
                if not re.fullmatch(r"-?[0-9]{1,4}", priority):
                    raise HTTPException(400, "priority must be a whole number")
                await jobs.set_priority(job_id, int(priority))
        logger.info(
            "job %s: %s, by an operator signed in from %s",
            job_id,
            action,
            request.client.host if request.client else "?",
        )
        return RedirectResponse(f"/jobs/{job_id}?done={action}", status_code=303)

    # -- errors ---------------------------------------------------------------------------------------------

    def handlers(self) -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
        def handler(
            status: int, detail: Callable[[Exception], str]
        ) -> Callable[[Request, Exception], Awaitable[Response]]:
            async def handle(request: Request, exc: Exception) -> Response:
                return self.error(request, status, detail(exc))

            return handle

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            return self.error(request, exc.status_code, exc.detail, exc.headers)

        async def database_down(request: Request, exc: Exception) -> Response:
            logger.warning("database unreachable: %s", one_line(exc))
            return self.error(
                request, 503, "the database does not answer; this page works again once it does", {"retry-after": "5"}
            )

        return {
            HTTPException: http_error,
            NotFound: handler(404, str),
            ValidationError: handler(400, str),
            PermissionDenied: handler(403, lambda exc: f"the dashboard's database role may not do this: {exc}"),
            InvalidTransition: handler(409, str),
            **{kind: database_down for kind in DATABASE_DOWN},
        }


class Guard:
    """The outermost layer: bounds request bodies (413) and adds the security headers and a Server-Timing
    header (the server's own time, for bench/web.py) to every response, errors included."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [header for header in SECURITY_HEADERS if header[0] not in names]
                if b"cache-control" not in names and not scope["path"].startswith("/static/"):
                    headers.append((b"cache-control", b"no-store"))
                headers.append((b"server-timing", f"app;dur={(time.perf_counter() - started) * 1000:.2f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        body = await self.read_body(scope, receive)
        if body is None:
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await send({"type": "http.response.body", "body": b"request body too large\n"})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)

    async def read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None when it is larger than allowed (said by Content-Length or found reading)."""
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_body):
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def create_app(config: WebConfig) -> ASGIApp:
    board = Dashboard(config)
    routes = [
        Route("/", board.jobs_page),
        Route("/api/jobs", board.jobs_api),
        Route("/jobs/{job_id}", board.job_page),
        Route("/api/jobs/{job_id}", board.job_api),
        Route("/jobs/{job_id}/{action}", board.act, methods=["POST"]),
        Route("/chunks/{chunk_id}", board.chunk_page),
        Route("/workers", board.workers_page),
        Route("/api/workers", board.workers_api),
        Route("/login", board.login_page, methods=["GET"]),
        Route("/login", board.login, methods=["POST"]),
        Route("/logout", board.logout, methods=["POST"]),
        Route("/metrics", board.metrics),
        Route("/healthz", board.health),
        Route("/favicon.ico", board.no_icon),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers=board.handlers(), lifespan=board.lifespan)
    app.state.dashboard = board
    return Guard(app)
