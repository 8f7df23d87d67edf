"""A real OpenID Connect provider on loopback, to test the node's sign-in against (tests/oidc_provider).

:func:`oidc_provider` starts the npm package ``oidc-provider`` (``tests/oidc_provider/provider.mjs``, run by
``node``) with the given accounts, one confidential client and a resource server (the node's API) whose access
tokens are RS256 JWTs (RFC 9068) carrying the account's roles. :func:`sign_in` runs the authorization code flow
with PKCE the way a browser would, through the provider's development login form, and returns the token response;
:func:`access_token` is its access token. :func:`signed_access_token` signs claims of a test's choosing with the
provider's own key (an expired token, say, that is otherwise genuine).

Needs ``node`` 20.18 or later (oidc-provider 9 uses ``URL.parse`` and ``crypto.hash``: Debian 12's node 18 cannot
run it, Debian 13's 20.19 can) and ``npm``; the package's ``node_modules`` are installed from its lock file on first
use (:func:`ensure_node_modules`).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import queue
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
from authlib.jose import JsonWebKey, jwt

from tests.servers import stop

PROVIDER_DIR = Path(__file__).parent / "oidc_provider"
MIN_NODE = (20, 18)
STARTUP_TIMEOUT = 30.0
SCOPE = "openid profile roles"
CLIENT_ID = "dicom-node"


class OidcSignInError(RuntimeError):
    """The provider refused a sign-in: ``error`` is the OAuth error code it sent (``access_denied``, ...)."""

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description


@dataclass(frozen=True)
class OidcProvider:
    """A running provider: its issuer, the one client registered for the node, and its signing key."""

    issuer: str
    client_id: str
    client_secret: str
    audience: str
    private_jwk: dict[str, Any]
    roles_claim: str
    token_endpoint_auth_method: str = "client_secret_basic"

    @property
    def metadata_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    def metadata(self) -> dict[str, Any]:
        """The discovery document (endpoints, jwks_uri, supported scopes and claims)."""
        response = httpx.get(self.metadata_url, timeout=10)
        response.raise_for_status()
        return response.json()


def _node_version(node: str) -> tuple[int, ...]:
    output = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(part) for part in output.strip().lstrip("v").split(".")[:2])


def _installed_matches_lock() -> bool:
    """Whether node_modules holds the oidc-provider version that package-lock.json pins."""
    lock = json.loads((PROVIDER_DIR / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/oidc-provider"]["version"]
    installed = PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json"
    return installed.exists() and json.loads(installed.read_text())["version"] == pinned


def ensure_node_modules() -> str:
    """Install the provider's npm packages from the lock file unless they are there; returns the ``node`` path.

    A missing or too old node or npm is an error, not a skip: these tests are the only proof that the sign-in works
    against a real provider. An exclusive file lock keeps two pytest-xdist workers from running ``npm ci`` (which
    first deletes node_modules) at the same time.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise RuntimeError(
            "the OpenID Connect tests need node and npm (Debian packages nodejs and npm; make system-packages)"
        )
    if (version := _node_version(node)) < MIN_NODE:
        wanted, found = ".".join(map(str, MIN_NODE)), ".".join(map(str, version))
        raise RuntimeError(f"oidc-provider 9 needs node {wanted} or later; {node} is {found}")
    lock_path = Path(tempfile.gettempdir()) / f"dicom-node-npm-{hashlib.sha256(bytes(PROVIDER_DIR)).hexdigest()[:16]}"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed_matches_lock():
            subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=PROVIDER_DIR, check=True)
    return node


def _private_jwk() -> dict[str, Any]:
    key = JsonWebKey.generate_key("RSA", 2048, is_private=True).as_dict(is_private=True)
    return {**key, "kid": secrets.token_hex(8), "alg": "RS256", "use": "sig"}


def _issuer_from(process: subprocess.Popen[str], log: Path) -> str:
    """Wait for the ``listening <issuer>`` line; RuntimeError with the provider's stderr if it does not come."""
    lines: queue.Queue[str] = queue.Queue()
    # A thread reads (and keeps draining) stdout, so that the wait can have a deadline.
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if line.startswith("listening "):
            return line.split()[1]
    stop(process)
    raise RuntimeError(f"oidc-provider did not start (exit status {process.returncode}):\n{log.read_text()}")


@contextmanager
def oidc_provider(
    accounts: dict[str, list[str]],
    redirect_uris: list[str],
    audience: str,
    access_token_ttl: int = 300,
    *,
    roles_claim: str = "roles",
    token_endpoint_auth_method: str = "client_secret_basic",
    userinfo_tokens: bool = False,
) -> Iterator[OidcProvider]:
    """A provider on a free loopback port with ``accounts`` (user name -> roles) and one client, ``dicom-node``.

    Access tokens are JWTs for ``audience`` valid ``access_token_ttl`` seconds. The audience is the default
    resource, so a client that sends no ``resource`` parameter (Authlib's) still gets such a JWT; with
    ``userinfo_tokens`` it gets an opaque token for the userinfo endpoint instead (a JWT with an ``aud`` is not good
    there). The provider's stderr is printed if the block fails.
    """
    node = ensure_node_modules()
    private_jwk = _private_jwk()
    client = {
        "client_id": CLIENT_ID,
        "client_secret": secrets.token_urlsafe(24),
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": token_endpoint_auth_method,
    }
    config = {
        "clients": [client],
        "accounts": {name: {"roles": roles, "name": name.title()} for name, roles in accounts.items()},
        "roles_claim": roles_claim,
        "audience": audience,
        "access_token_ttl": access_token_ttl,
        "granted_resource": not userinfo_tokens,
        "jwks": {"keys": [private_jwk]},
    }
    with tempfile.TemporaryDirectory(prefix="oidc-provider-") as tmp:
        config_path, log = Path(tmp) / "config.json", Path(tmp) / "stderr.log"
        config_path.write_text(json.dumps(config))
        command = [node, "provider.mjs", str(config_path)]
        with open(log, "w") as stderr:
            process = subprocess.Popen(command, cwd=PROVIDER_DIR, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            issuer = _issuer_from(process, log)
            secret, method = client["client_secret"], token_endpoint_auth_method
            yield OidcProvider(issuer, CLIENT_ID, secret, audience, private_jwk, roles_claim, method)
        except BaseException:
            print(f"oidc-provider stderr:\n{log.read_text()}")
            raise
        finally:
            stop(process)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _login_form_action(html: str, page_url: str) -> str:
    match = re.search(r'<form[^>]*action="([^"]+)"', html)
    if not match:
        raise AssertionError(f"no login form at {page_url}:\n{html[:2000]}")
    return urljoin(page_url, match.group(1))


def follow_sign_in(browser: httpx.Client, url: str, username: str, stop_at: str) -> str:
    """Play the browser from ``url`` to the first redirect to ``stop_at``, signing in as ``username``; its Location.

    ``url`` is the provider's authorization endpoint or a relying party's page that redirects there (the node's
    login route, say). Redirects are followed by hand and the provider's login form is submitted (any password);
    the redirect back to ``stop_at`` is returned, not fetched: nothing need listen there, and a test can fetch it
    with the same ``browser`` (its cookies) to finish a relying party's sign-in.
    """
    response = browser.get(url)
    for _ in range(10):
        if response.is_redirect:
            location = urljoin(str(response.url), response.headers["location"])
            if location.startswith(stop_at):
                return location
            response = browser.get(location)
        elif response.status_code == 200 and 'name="login"' in response.text:
            action = _login_form_action(response.text, str(response.url))
            response = browser.post(action, data={"prompt": "login", "login": username, "password": "any"})
        else:
            raise AssertionError(f"unexpected {response.status_code} from {response.url}:\n{response.text[:2000]}")
    raise AssertionError(f"no redirect to {stop_at} after 10 steps from {url}")


def sign_in(
    provider: OidcProvider, username: str, redirect_uri: str, *, resource: str | None = None, scope: str = SCOPE
) -> dict[str, Any]:
    """The token response (access_token, id_token, ...) of a code flow with PKCE in which ``username`` signs in.

    Plays the browser: the authorization request, the provider's login form (any password), then the redirects up
    to ``redirect_uri?code=...`` (which is not fetched: nothing need listen there); then the code is exchanged as a
    confidential client with the PKCE verifier and ``resource``, if given. Raises :class:`OidcSignInError` if the
    provider redirects back with an error (an unknown user gets ``access_denied``). The response has the request's
    ``nonce`` added, to check the ID token's against.
    """
    metadata = provider.metadata()
    verifier = secrets.token_urlsafe(48)
    params = {
        "client_id": provider.client_id,
        "response_type": "code",
        "scope": scope,
        "redirect_uri": redirect_uri,
        "state": secrets.token_urlsafe(16),
        "nonce": secrets.token_urlsafe(16),
        "code_challenge": _b64url(hashlib.sha256(verifier.encode()).digest()),
        "code_challenge_method": "S256",
    }
    with httpx.Client(timeout=10) as browser:
        url = str(httpx.URL(metadata["authorization_endpoint"], params=params))
        location = follow_sign_in(browser, url, username, redirect_uri)
    query = parse_qs(urlsplit(location).query)
    if "error" in query:
        raise OidcSignInError(query["error"][0], query.get("error_description", [""])[0])
    assert query["state"] == [params["state"]], query
    form = {"grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": redirect_uri}
    form |= {"code_verifier": verifier} | ({"resource": resource} if resource else {})
    auth: tuple[str, str] | None = (provider.client_id, provider.client_secret)
    if provider.token_endpoint_auth_method == "client_secret_post":
        form |= {"client_id": provider.client_id, "client_secret": provider.client_secret}
        auth = None
    token = httpx.post(metadata["token_endpoint"], data=form, auth=auth, timeout=10)
    if token.is_error:
        raise AssertionError(f"token endpoint: {token.status_code} {token.text}")
    return {**token.json(), "nonce": params["nonce"]}


def access_token(provider: OidcProvider, username: str, redirect_uri: str) -> str:
    """A genuine JWT access token for ``username``, for the provider's audience (a code flow, as in :func:`sign_in`)."""
    return sign_in(provider, username, redirect_uri, resource=provider.audience)["access_token"]


def signed_access_token(provider: OidcProvider, claims: dict[str, Any]) -> str:
    """``claims`` signed as an RFC 9068 access token with the provider's own key (RS256, its kid, typ at+jwt)."""
    header = {"alg": "RS256", "kid": provider.private_jwk["kid"], "typ": "at+jwt"}
    return jwt.encode(header, claims, provider.private_jwk).decode()
