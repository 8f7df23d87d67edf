"""The OpenID Connect provider of the sign-in tests (tests/oidc.py) is real and gives what the node relies on.

Access tokens: RS256 JWTs from the provider's JWKS with iss, aud, exp and the roles. ID tokens: RS256, with the
roles, and accepted by Authlib's Starlette client (the viewer's sign-in) in a full browser round trip. Unknown users
and authorization requests without PKCE are refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.integrations.starlette_client import OAuth
from authlib.jose import JsonWebKey, jwt
from authlib.jose.errors import ExpiredTokenError
from authlib.oidc.core import CodeIDToken
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.dicom_peers import free_port
from tests.oidc import (
    OidcProvider,
    OidcSignInError,
    access_token,
    follow_sign_in,
    oidc_provider,
    sign_in,
    signed_access_token,
)
from tests.servers import serving

APP_PORT = free_port()
APP = f"http://127.0.0.1:{APP_PORT}"
CALLBACK = f"{APP}/login/oidc/callback"
AUDIENCE = f"{APP}/api"


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    with oidc_provider({"alice": ["viewer"], "bob": ["viewer", "admin"]}, [CALLBACK], AUDIENCE) as running:
        yield running


def _keys(provider: OidcProvider):
    return JsonWebKey.import_key_set(httpx.get(provider.metadata()["jwks_uri"]).json())


def test_discovery_names_the_issuer_pkce_and_the_roles_scope(provider: OidcProvider) -> None:
    metadata = provider.metadata()
    assert metadata["issuer"] == provider.issuer
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert "roles" in metadata["scopes_supported"] and "roles" in metadata["claims_supported"]


def test_an_access_token_is_a_jwt_for_the_audience_with_the_roles(provider: OidcProvider) -> None:
    token = access_token(provider, "bob", CALLBACK)
    options = {"iss": {"essential": True, "value": provider.issuer}, "aud": {"essential": True, "value": AUDIENCE}}
    claims = jwt.decode(token, _keys(provider), claims_options={**options, "exp": {"essential": True}})
    claims.validate()
    assert claims.header["alg"] == "RS256" and claims.header["typ"] == "at+jwt"
    assert claims[provider.roles_claim] == ["viewer", "admin"]
    assert claims["preferred_username"] == claims["sub"] == "bob"


def test_the_id_token_is_rs256_with_the_roles(provider: OidcProvider) -> None:
    tokens = sign_in(provider, "alice", CALLBACK)
    # As Authlib's parse_id_token checks it: the signature, iss, aud (the client), nonce, at_hash, exp, iat.
    params = {"nonce": tokens["nonce"], "client_id": provider.client_id, "access_token": tokens["access_token"]}
    options = {"iss": {"values": [provider.issuer]}}
    claims = jwt.decode(tokens["id_token"], _keys(provider), CodeIDToken, options, params)
    claims.validate()
    assert claims.header["alg"] == "RS256"
    assert claims[provider.roles_claim] == ["viewer"] and claims["preferred_username"] == "alice"


def test_an_unknown_user_cannot_sign_in(provider: OidcProvider) -> None:
    with pytest.raises(OidcSignInError) as refused:
        sign_in(provider, "mallory", CALLBACK)
    assert refused.value.error == "access_denied"


def test_pkce_is_required(provider: OidcProvider) -> None:
    params = {"client_id": provider.client_id, "response_type": "code", "scope": "openid", "redirect_uri": CALLBACK}
    response = httpx.get(provider.metadata()["authorization_endpoint"], params=params)
    assert response.is_redirect and response.headers["location"].startswith(CALLBACK)
    assert parse_qs(urlsplit(response.headers["location"]).query)["error"] == ["invalid_request"]


def test_a_token_signed_with_the_providers_key_verifies_but_can_expire(provider: OidcProvider) -> None:
    now = int(time.time())
    claims = {"iss": provider.issuer, "aud": AUDIENCE, "sub": "alice", "iat": now - 600, "exp": now - 300}
    decoded = jwt.decode(signed_access_token(provider, claims), _keys(provider))
    with pytest.raises(ExpiredTokenError):
        decoded.validate()


def test_userinfo_has_the_roles_where_tokens_are_for_it() -> None:
    accounts = {"alice": ["viewer"]}
    with oidc_provider(accounts, [CALLBACK], AUDIENCE, roles_claim="groups", userinfo_tokens=True) as provider:
        tokens = sign_in(provider, "alice", CALLBACK)
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        userinfo = httpx.get(provider.metadata()["userinfo_endpoint"], headers=bearer).json()
        id_token = jwt.decode(tokens["id_token"], _keys(provider))
    assert userinfo["groups"] == ["viewer"] and userinfo["sub"] == "alice"
    # An access token good at userinfo would leave the ID token with `sub` only, were it not for conformIdTokenClaims.
    assert id_token["groups"] == ["viewer"]


def _authlib_app(provider: OidcProvider) -> Starlette:
    """A relying party as the viewer's: Authlib's Starlette client, scope "openid profile roles", PKCE S256."""
    oauth = OAuth()
    oauth.register(
        "oidc",
        client_id=provider.client_id,
        client_secret=provider.client_secret,
        server_metadata_url=provider.metadata_url,
        client_kwargs={"scope": "openid profile roles", "code_challenge_method": "S256"},
    )

    async def login(request: Request):
        return await oauth.oidc.authorize_redirect(request, CALLBACK)

    async def callback(request: Request):
        token = await oauth.oidc.authorize_access_token(request)
        return JSONResponse({"userinfo": dict(token["userinfo"]), "access_token": token["access_token"]})

    routes = [Route("/login", login), Route("/login/oidc/callback", callback)]
    return Starlette(routes=routes, middleware=[Middleware(SessionMiddleware, secret_key="test")])


def test_authlibs_starlette_client_signs_in(provider: OidcProvider) -> None:
    with serving(_authlib_app(provider), APP_PORT), httpx.Client(timeout=10) as browser:
        back = follow_sign_in(browser, f"{APP}/login", "alice", CALLBACK)
        signed_in = browser.get(back)
    assert signed_in.status_code == 200, signed_in.text
    assert signed_in.json()["userinfo"][provider.roles_claim] == ["viewer"]
    # No `resource` parameter was sent, yet the access token is the API's JWT (the audience is the default resource).
    claims = jwt.decode(signed_in.json()["access_token"], _keys(provider))
    assert claims["aud"] == AUDIENCE and claims[provider.roles_claim] == ["viewer"]
