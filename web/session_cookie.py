"""The viewer's session: Starlette's signed cookie (HttpOnly, SameSite=Lax), marked Secure on requests that
came over TLS, directly or through a proxy that uvicorn trusts (``X-Forwarded-Proto``)."""

from __future__ import annotations

from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

SESSION_COOKIE = "dicom_node_session"


class SessionCookie:
    """SameSite=Lax, not Strict: the provider's redirect back to /login/oidc/callback is a top-level navigation
    from another site, and must carry the session that holds the sign-in's state and PKCE verifier."""

    def __init__(self, app: ASGIApp, secret_key: str, max_age: int) -> None:
        options = {"secret_key": secret_key, "session_cookie": SESSION_COOKIE, "max_age": max_age, "same_site": "lax"}
        self._plain = SessionMiddleware(app, https_only=False, **options)
        self._tls = SessionMiddleware(app, https_only=True, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        middleware = self._tls if scope.get("scheme") in ("https", "wss") else self._plain
        await middleware(scope, receive, send)
