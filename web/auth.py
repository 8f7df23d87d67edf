"""Who makes a request, and whether their role allows the route (docs/security.md).

A request is made by a :class:`Principal`, found in this order:

1. ``Authorization: Bearer``: a personal API token (``dnt_...``, :mod:`dicom_node.users`), or, with
   ``web.oidc`` set, an access token of the provider (a JWT checked against its keys, :mod:`web.oidc`);
2. the viewer's session cookie (signed; set at sign-in by :mod:`web.routers.sign_in`);
3. nobody: 401. Only while the index has no user and no provider is configured, the node answers everyone as
   ``anonymous``, and only on loopback (:func:`is_open`; :func:`web.app.check_sign_in` refuses to start otherwise).

Each route declares the role it needs with ``Security(authenticated, scopes=[role])``, which also puts the role
into the OpenAPI document (``security: [{HTTPBearer: [role]}]``). A route without it is public.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import quote, urlencode, urlsplit

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from dicom_node.audit.record import AuditEventKind, AuditOutcome, AuditRecord
from dicom_node.audit.trail import now
from dicom_node.config import Settings
from dicom_node.models import UserRole
from dicom_node.users import TOKEN_PREFIX, Users
from web.dependencies import ContextDep, WebContext
from web.oidc import TokenRefused
from web.schemas import Problem

Via = Literal["token", "oidc-token", "password", "oidc", "open"]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
FORWARDED_HEADERS = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip"})
CSRF_HEADER = "X-CSRF-Token"
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    """Who makes the request, with what role, signed in how, from which address."""

    user: str
    role: UserRole
    via: Via
    address: str | None


class NotSignedIn(HTTPException):
    def __init__(self, reason: str) -> None:
        super().__init__(status.HTTP_401_UNAUTHORIZED, reason, headers={"WWW-Authenticate": "Bearer"})


_bearer = HTTPBearer(
    auto_error=False, description="A personal API token (dicom-node users token NAME) or the provider's access token"
)


def client_address(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def authenticated(
    scopes: SecurityScopes,
    request: Request,
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The request's principal, where its role allows the route's (``scopes``: one role); else 401 or 403."""
    principal = _bearer_principal(request, context, credentials.credentials) if credentials is not None else None
    if principal is None:
        principal = session_principal(request, context)
    if principal is None and is_open(context, request):
        principal = Principal(ANONYMOUS, UserRole.ADMIN, "open", client_address(request))
    if principal is None:
        raise NotSignedIn("sign in first: a bearer token (Authorization: Bearer ...) or the viewer's session")
    needed = UserRole(scopes.scopes[0]) if scopes.scopes else UserRole.VIEWER
    if not principal.role.allows(needed):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"this needs the role {needed}; {principal.user} is {principal.role}"
        )
    if principal.via in ("password", "oidc") and request.method not in SAFE_METHODS:
        check_csrf(request, request.headers.get(CSRF_HEADER))
    if principal.via == "open" and request.method not in SAFE_METHODS and _from_another_site(request):
        # without sign-in there is no CSRF token: a page of another site must not make a browser post here
        raise HTTPException(status.HTTP_403_FORBIDDEN, "a request sent by a page of another site")
    request.state.principal = principal
    return principal


def is_open(context: WebContext, request: Request) -> bool:
    """No sign-in exists yet and the request cannot come from beyond this machine: the server listens on
    loopback, and no proxy forwarded the request (a proxy on this machine would make the node reachable from the
    network)."""
    return (
        is_loopback_host(context.settings.web.host)
        and not FORWARDED_HEADERS & {name.lower() for name in request.headers}
        and not anyone_can_sign_in(context.settings, context.users)
    )


def anyone_can_sign_in(settings: Settings, users: Users) -> bool:
    """A provider is configured, or the index has a local user."""
    return settings.web.oidc is not None or users.any()


def _from_another_site(request: Request) -> bool:
    """What browsers say of a request that a page of another origin made (Fetch Metadata, Origin)."""
    origin = request.headers.get("origin")
    return request.headers.get("sec-fetch-site") in ("cross-site", "same-site") or (
        origin is not None and urlsplit(origin).netloc != request.headers.get("host")
    )


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _bearer_principal(request: Request, context: WebContext, token: str) -> Principal:
    address = client_address(request)
    if token.startswith(TOKEN_PREFIX):
        account = context.users.check_token(token)
        if account is not None:
            return Principal(account.username, account.role, "token", address)
        reason = "unknown, revoked or expired personal token"
    elif context.oidc is not None:
        try:
            identity = context.oidc.verify_access_token(token)
        except TokenRefused as error:
            reason = f"access token refused: {error}"
        else:
            if identity.role is not None:
                return Principal(identity.username, identity.role, "oidc-token", address)
            reason = f"the access token of {identity.username} names no role of this node"
    else:
        reason = "not a personal token, and no provider is configured"
    record_sign_in(context, None, address, f"bearer token: {reason}", AuditOutcome.MINOR_FAILURE)
    raise NotSignedIn(reason)


# --- the viewer's session --------------------------------------------------------------------------------------


def session_principal(request: Request, context: WebContext) -> Principal | None:
    """The principal of the session cookie, while the session lasts: ``web.session_hours`` from sign-in (the
    cookie is signed again on every answer, so its own age says nothing), and for a provider's user no longer
    than the ID token. A local user's role is read again on each request, and a session signed in before the
    user's password or role changed has ended."""
    session = request.scope.get("session")
    if not session or "user" not in session:
        return None
    signed_in_at = session.get("at", 0)
    ends_at = min(signed_in_at + context.settings.web.session_hours * 3600, session.get("until") or float("inf"))
    if time.time() >= ends_at:
        session.clear()
        return None
    address = client_address(request)
    if session.get("via") == "oidc":
        return Principal(session["user"], UserRole(session["role"]), "oidc", address)
    account = context.users.account(session["user"])
    if account is None or account.credentials_changed_at.timestamp() > signed_in_at:
        session.clear()
        return None
    return Principal(account.username, account.role, "password", address)


def start_session(
    request: Request, user: str, role: UserRole, via: Literal["password", "oidc"], expires_at: float | None = None
) -> None:
    """A new session (a new CSRF token too: nothing of the session before sign-in carries over), ending at
    ``expires_at`` (epoch seconds) if that comes before ``web.session_hours``."""
    request.session.clear()
    request.session.update(
        user=user, role=role.value, via=via, at=time.time(), until=expires_at, csrf=secrets.token_urlsafe(32)
    )


def csrf_token(request: Request) -> str:
    """The session's CSRF token, for the forms of the pages (made when the session has none)."""
    return request.session.setdefault("csrf", secrets.token_urlsafe(32))


def check_csrf(request: Request, given: str | None) -> None:
    expected = request.session.get("csrf", "")
    if not given or not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the form's CSRF token is missing or wrong: reload the page")


# --- sign-in records and limits --------------------------------------------------------------------------------


def record_sign_in(
    context: WebContext,
    principal: Principal | None,
    address: str | None,
    detail: str,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
    kind: AuditEventKind | None = None,
    user: str | None = None,
) -> None:
    if kind is None:
        kind = AuditEventKind.SIGN_IN if outcome is AuditOutcome.SUCCESS else AuditEventKind.SIGN_IN_FAILED
    context.trail.record(
        AuditRecord(
            kind=kind,
            occurred_at=now(),
            user=principal.user if principal is not None else (user or ANONYMOUS),
            role=principal.role.value if principal is not None else None,
            address=address,
            outcome=outcome,
            detail=detail,
        )
    )


class SignInLimiter:
    """At most ``attempts`` failed sign-ins per address and user name in a sliding ``window`` (seconds). Kept in
    the web process's memory: with several web processes each counts its own. Only failures are kept, and only
    for the window, at most :data:`MAX_TRACKED` keys (beyond that the oldest go: a flood of made-up names cannot
    fill the memory)."""

    MAX_TRACKED = 10_000

    def __init__(self, attempts: int, window: float = 15 * 60) -> None:
        self._attempts = attempts
        self._window = window
        self._failures: dict[tuple[str, str], collections.deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, address: str | None, username: str) -> int:
        """0 where another attempt may be made; else the seconds until one may."""
        with self._lock:
            failures = self._recent(_key(address, username))
            if len(failures) < self._attempts:
                return 0
            return max(1, int(failures[0] + self._window - time.monotonic()) + 1)

    def failed(self, address: str | None, username: str) -> None:
        with self._lock:
            key = _key(address, username)
            failures = self._recent(key)
            if not failures and len(self._failures) >= self.MAX_TRACKED:
                self._failures.pop(next(iter(self._failures)))  # the oldest key
            self._failures[key] = failures
            failures.append(time.monotonic())

    def succeeded(self, address: str | None, username: str) -> None:
        with self._lock:
            self._failures.pop(_key(address, username), None)

    def _recent(self, key: tuple[str, str]) -> collections.deque[float]:
        failures = self._failures.get(key, collections.deque())
        while failures and failures[0] <= time.monotonic() - self._window:
            failures.popleft()
        if not failures:
            self._failures.pop(key, None)
        return failures


def _key(address: str | None, username: str) -> tuple[str, str]:
    return address or "", username[:64].lower()


def page_access(
    scopes: SecurityScopes,
    request: Request,
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """As :func:`authenticated`, for the viewer's pages: a browser that has not signed in is sent to ``/login``."""
    try:
        return authenticated(scopes, request, context, credentials)
    except NotSignedIn:
        raw_path = request.scope.get("raw_path")  # as sent: a PatientID's "/" stays encoded
        path = raw_path.decode("latin-1") if raw_path else quote(request.url.path)
        target = path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(
            status.HTTP_303_SEE_OTHER, "sign in first", headers={"Location": "/login?" + urlencode({"next": target})}
        ) from None


# --- what the routes declare ------------------------------------------------------------------------------------

# documented on every route that declares a role
AUTH_RESPONSES: dict[int | str, dict] = {
    status.HTTP_401_UNAUTHORIZED: {"model": Problem, "description": "Not signed in, or the token was refused."},
    status.HTTP_403_FORBIDDEN: {"model": Problem, "description": "The role does not allow this route."},
}
VIEWER = [Security(authenticated, scopes=[UserRole.VIEWER.value])]
OPERATOR = [Security(authenticated, scopes=[UserRole.OPERATOR.value])]
ADMIN = [Security(authenticated, scopes=[UserRole.ADMIN.value])]
PAGE_VIEWER = [Security(page_access, scopes=[UserRole.VIEWER.value])]
