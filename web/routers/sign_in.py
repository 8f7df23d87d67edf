"""Signing in and out of the viewer: a local user's password, or the hospital's OpenID Connect provider.

Every sign-in, failed sign-in and sign-out writes an audit event. Failed attempts are limited per address and
user name (``web.sign_in_attempts`` in 15 minutes, then 429). The forms carry the session's CSRF token.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from authlib.integrations.base_client.errors import OAuthError
from fastapi import APIRouter, Request, status
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

MAX_FORM_BYTES = 4096


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, context: ContextDep, next: str | None = None) -> Response:
    target = local_path(next)
    if is_open(context) or session_principal(request, context) is not None:
        return RedirectResponse(target, status.HTTP_303_SEE_OTHER)
    return _login_page(request, context, target)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, context: ContextDep) -> Response:
    """Check a local user's password and start a session."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return _login_page(request, context, "/patients", "The form is too large.", status.HTTP_413_CONTENT_TOO_LARGE)
    form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    field = {name: (values or [""])[0] for name, values in form.items()}
    target = local_path(field.get("next"))
    try:
        check_csrf(request, field.get("csrf_token"))
    except StarletteHTTPException:
        return _login_page(request, context, target, "The form expired: try again.", status.HTTP_403_FORBIDDEN)
    username, password = field.get("username", "").strip(), field.get("password", "")
    address = client_address(request)
    limiter: SignInLimiter = request.app.state.sign_in_limiter
    wait = limiter.retry_after(address, username)
    if wait:
        record_sign_in(
            context, None, address, "password: too many failed attempts", AuditOutcome.MINOR_FAILURE, user=username
        )
        message = f"Too many failed sign-ins: try again in {wait // 60 + 1} minutes."
        response = _login_page(request, context, target, message, status.HTTP_429_TOO_MANY_REQUESTS)
        response.headers["Retry-After"] = str(wait)
        return response
    account = context.users.check_password(username, password) if username and password else None
    if account is None:
        limiter.failed(address, username)
        record_sign_in(
            context, None, address, "password: wrong user name or password", AuditOutcome.MINOR_FAILURE, user=username
        )
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
    except OAuthError as error:
        record_sign_in(context, None, address, f"provider: {error.error}", AuditOutcome.MINOR_FAILURE)
        message = f"The sign-in through the identity provider failed ({error.error})."
        return _login_page(request, context, target, message, status.HTTP_401_UNAUTHORIZED)
    identity = context.oidc.identity(token.get("userinfo") or {})
    if identity.role is None:
        detail = f"provider: {context.settings.web.oidc.roles_claim} names no role of this node"
        record_sign_in(context, None, address, detail, AuditOutcome.MINOR_FAILURE, user=identity.username)
        message = f"{identity.username} has no role on this node (viewer, operator or admin): ask an admin."
        return _login_page(request, context, target, message, status.HTTP_403_FORBIDDEN)
    start_session(request, identity.username, identity.role, "oidc")
    record_sign_in(context, Principal(identity.username, identity.role, "oidc", address), address, "provider")
    return RedirectResponse(target, status.HTTP_303_SEE_OTHER)


@router.post("/logout")
async def logout(request: Request, context: ContextDep) -> Response:
    form = parse_qs((await request.body())[:MAX_FORM_BYTES].decode("utf-8", "replace"), max_num_fields=4)
    check_csrf(request, (form.get("csrf_token") or [""])[0])
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
