"""Who may act on the dashboard: the operator token, sign-in sessions and per-session CSRF tokens.

Without a configured token the dashboard is read-only. With one, an operator signs in by pasting it;
the server answers with an HttpOnly, SameSite=Strict session cookie, and every state-changing request
must carry the session's CSRF token in its form. Secrets are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request

COOKIE = "chunkq_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000  # oldest signed-in sessions are forgotten first
MIN_TOKEN_LENGTH = 16


class TokenError(ValueError):
    """The configured token is unusable; the message says why."""


def load_token(token_file: str | None) -> str | None:
    """The operator token: the first line of ``token_file``, else $CHUNKQ_WEB_TOKEN, else None (read-only)."""
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            raise TokenError(f"cannot read --token-file: {exc}") from exc
        token: str | None = text.strip().splitlines()[0].strip() if text.strip() else ""
    else:
        token = os.environ.get("CHUNKQ_WEB_TOKEN") or None  # set but empty (compose's default): read-only
    if token is None:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(
            f"the web token must have at least {MIN_TOKEN_LENGTH} characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


@dataclass
class Session:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    expires: float = field(default_factory=lambda: time.monotonic() + SESSION_SECONDS)


class Auth:
    def __init__(self, token: str | None) -> None:
        self.token = token
        self.sessions: OrderedDict[str, Session] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether actions exist at all (a token is configured)."""
        return self.token is not None

    def sign_in(self, candidate: str) -> str | None:
        """A new session id if ``candidate`` is the token, else None."""
        if self.token is None or not same(candidate, self.token):
            return None
        session_id = secrets.token_urlsafe(32)
        self.sessions[session_id] = Session()
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return session_id

    def session(self, request: Request) -> Session | None:
        """The request's live session, if it has one."""
        session_id = request.cookies.get(COOKIE)
        if not session_id or self.token is None:
            return None
        session = self.sessions.get(session_id)
        if session is None:
            return None
        if session.expires < time.monotonic():
            del self.sessions[session_id]
            return None
        return session

    def sign_out(self, request: Request) -> None:
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)

    def may_act(self, request: Request, form_csrf: str) -> bool:
        """True for a state-changing request from a signed-in session that carries its CSRF token and, when
        the browser says where it comes from, comes from this site."""
        session = self.session(request)
        return session is not None and same_origin(request) and same(form_csrf, session.csrf)


def same_origin(request: Request) -> bool:
    """False when the Origin (or, lacking it, the Referer) header names another site than the Host."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    return urlsplit(source).netloc == request.headers.get("host", "")
