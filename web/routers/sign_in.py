"""Signing in and out of the viewer: a local user's password, or the hospital's OpenID Connect provider.

Every sign-in, failed sign-in and sign-out writes an audit event. Failed attempts are limited per address and
user name (``web.sign_in_attempts`` in 15 minutes, then 429). The forms carry the session's CSRF token.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
from authlib.common.errors import AuthlibBaseError
from fastapi import APIRouter, Form, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node.audit.record import AuditEventKind, AuditOutcome
from web.auth import (
    Principal,
    SignInLimiter,
    check_csrf,
    client_address,
    is_open,
    record_sign_in,
    session_principal,
    start_session,
)
from web.dependencies import ContextDep, WebContext
from web.viewer_pages import local_path, render

router = APIRouter(include_in_schema=False)

MAX_USERNAME = 64
MAX_PASSWORD = 1024  # argon2 takes any length; a bound keeps a request from making it hash megabytes
MAX_NEXT = 2048


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, context: ContextDep, next: str | None = None) -> Response:
    target = local_path(next)
    if is_open(context, request) or session_principal(request, context) is not None:
        return RedirectResponse(target, status.HTTP_303_SEE_OTHER)
    return _login_page(request, context, target)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    context: ContextDep,
    username: Annotated[str, Form(max_length=MAX_USERNAME)] = "",
    password: Annotated[str, Form(max_length=MAX_PASSWORD)] = "",
    next: Annotated[str, Form(max_length=MAX_NEXT)] = "",
    csrf_token: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Check a local user's password and start a session (a plain function: argon2 runs in a worker thread)."""
    target = local_path(next)
    try:
        check_csrf(request, csrf_token)
    except StarletteHTTPException:
        return _login_page(request, context, target, "The form expired: try again.", status.HTTP_403_FORBIDDEN)
    username = username.strip()
    address = client_address(request)
    limiter: SignInLimiter = request.app.state.sign_in_limiter
    wait = limiter.retry_after(address, username)
    if wait:
        detail = "password: too many failed attempts"
        record_sign_in(context, None, address, detail, AuditOutcome.MINOR_FAILURE, user=username)
        message = f"Too many failed sign-ins: try again in {wait // 60 + 1} minutes."
        response = _login_page(request, context, target, message, status.HTTP_429_TOO_MANY_REQUESTS)
        response.headers["Retry-After"] = str(wait)
        return response
    account = context.users.check_password(username, password)
    if account is None:
        limiter.failed(address, username)
        detail = "password: wrong user name or password"
        record_sign_in(context, None, address, detail, AuditOutcome.MINOR_FAILURE, user=username)
        return _login_page(request, context, target, "Wrong user name or password.", status.HTTP_401_UNAUTHORIZED)
    limiter.succeeded(address, username)
    start_session(request, account.username, account.role, "password")
    record_sign_in(context, Principal(account.username, account.role, "password", address), address, "password")
    return RedirectResponse(target, status.HTTP_303_SEE_OTHER)


@router.get("/login/oidc")
async def login_through_provider(request: Request, context: ContextDep, next: str | None = None) -> Response:
    """Send the browser to the provider (authorization code flow with PKCE)."""
    if context.oidc is None:
        return RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    request.session["next"] = local_path(next)
    redirect_uri = context.settings.web.oidc.redirect_uri or str(request.url_for("provider_callback"))
    return await context.oidc.client.authorize_redirect(request, redirect_uri)


@router.get("/login/oidc/callback", name="provider_callback")
async def provider_callback(request: Request, context: ContextDep) -> Response:
    """The provider's answer: Authlib exchanges the code and checks the ID token; the role comes from its claim."""
    if context.oidc is None:
        return RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    address = client_address(request)
    target = local_path(request.session.pop("next", None))
    try:
        token = await context.oidc.client.authorize_access_token(request)
    # the provider refused, the ID token failed Authlib's checks (both AuthlibBaseError), or the provider is away
    except (AuthlibBaseError, httpx.HTTPError) as error:
        reason = getattr(error, "error", None) or type(error).__name__
        await run_in_threadpool(
            record_sign_in, context, None, address, f"provider: {reason}", AuditOutcome.MINOR_FAILURE
        )
        message = f"The sign-in through the identity provider failed ({reason})."
        return await run_in_threadpool(_login_page, request, context, target, message, status.HTTP_401_UNAUTHORIZED)
    identity = context.oidc.identity(token.get("userinfo") or {})
    if identity.role is None:
        detail = f"provider: {context.settings.web.oidc.roles_claim} names no role of this node"
        await run_in_threadpool(
            record_sign_in, context, None, address, detail, AuditOutcome.MINOR_FAILURE, user=identity.username
        )
        message = f"{identity.username} has no role on this node (viewer, operator or admin): ask an admin."
        return await run_in_threadpool(_login_page, request, context, target, message, status.HTTP_403_FORBIDDEN)
    start_session(request, identity.username, identity.role, "oidc", expires_at=token.get("userinfo", {}).get("exp"))
    principal = Principal(identity.username, identity.role, "oidc", address)
    await run_in_threadpool(record_sign_in, context, principal, address, "provider")
    return RedirectResponse(target, status.HTTP_303_SEE_OTHER)


@router.post("/logout")
def logout(request: Request, context: ContextDep, csrf_token: Annotated[str, Form(max_length=64)] = "") -> Response:
    check_csrf(request, csrf_token)
    principal = session_principal(request, context)
    if principal is not None:
        record_sign_in(context, principal, principal.address, principal.via, kind=AuditEventKind.SIGN_OUT)
    request.session.clear()
    return RedirectResponse("/login", status.HTTP_303_SEE_OTHER)


def _login_page(
    request: Request, context: WebContext, target: str, error: str | None = None, status_code: int = 200
) -> HTMLResponse:
    page: dict[str, Any] = {
        "next": target,
        "error": error,
        "login_page": True,
        "provider": context.oidc is not None,
        "local_users": context.users.any(),
    }
    return render(request, context.settings, "login.html", page, status_code)
