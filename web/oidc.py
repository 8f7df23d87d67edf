"""Sign-in through the hospital's OpenID Connect provider (``web.oidc``); the libraries do the protocol.

- The viewer: the authorization code flow with PKCE (S256), by Authlib's Starlette client, which also checks the
  ID token (signature against the provider's keys, ``iss``, ``aud``, ``exp``, ``nonce``).
- The API: the provider's access tokens, JWTs (RFC 9068), checked by joserfc (Authlib's JOSE library) against the
  keys at the provider's ``jwks_uri``: signature, ``iss``, ``aud`` (``web.oidc.audience``, else the client id)
  and ``exp``.

The user's role is the highest of the node's roles named in ``web.oidc.roles_claim``; a user with none of them
signs in to nothing.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from dicom_node.config import OidcSettings
from dicom_node.models import UserRole

if TYPE_CHECKING:
    from authlib.integrations.starlette_client import StarletteOAuth2App

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"]
CLOCK_SKEW_S = 30
# The provider's keys are fetched again for a token signed by an unknown key (rotation), at most this often.
KEYS_REFRESH_S = 60.0
HTTP_TIMEOUT_S = 10.0


class TokenRefused(Exception):
    """An access token that is not the provider's, not for this node, or expired; the message says which."""


@dataclass(frozen=True)
class Identity:
    username: str
    role: UserRole | None


def role_of(claims: dict, roles_claim: str) -> UserRole | None:
    """The highest of the node's roles in the claim (a list, or a space-separated string)."""
    named = claims.get(roles_claim) or []
    if isinstance(named, str):
        named = named.split()
    known = [UserRole(value) for value in named if value in UserRole._value2member_map_]
    return max(known, key=list(UserRole).index, default=None)


class OidcClient:
    """The provider of ``settings``: the viewer's client and the check of the API's access tokens."""

    def __init__(self, settings: OidcSettings) -> None:
        with warnings.catch_warnings():
            # Authlib 1.9 announces on import that it will move from httpx to httpx2: its business, not a
            # problem of this node's, and it would print a warning in every dicom-node command
            warnings.filterwarnings("ignore", message="The httpx module is deprecated")
            from authlib.integrations.starlette_client import OAuth

        self.settings = settings
        self._oauth = OAuth()
        self._oauth.register(
            "provider",
            client_id=settings.client_id,
            client_secret=settings.client_secret.get_secret_value(),
            server_metadata_url=f"{settings.issuer}/.well-known/openid-configuration",
            client_kwargs={"scope": settings.scopes, "code_challenge_method": "S256", "timeout": HTTP_TIMEOUT_S},
        )
        self._claims = jwt.JWTClaimsRegistry(
            leeway=CLOCK_SKEW_S,
            iss={"essential": True, "value": settings.issuer},
            aud={"essential": True, "value": settings.audience or settings.client_id},
            exp={"essential": True},
        )
        self._keys: KeySet | None = None
        self._keys_fetched_at = 0.0
        self._lock = threading.Lock()

    @property
    def client(self) -> StarletteOAuth2App:
        return self._oauth.provider

    def identity(self, claims: dict) -> Identity:
        username = claims.get(self.settings.username_claim) or claims.get("sub") or ""
        return Identity(str(username), role_of(claims, self.settings.roles_claim))

    def verify_access_token(self, token: str) -> Identity:
        try:
            decoded = self._decode(token, refresh=False)
        except (JoseError, ValueError):
            decoded = self._decode(token, refresh=True)  # the provider may have rotated its keys
        try:
            self._claims.validate(decoded.claims)
        except JoseError as error:
            raise TokenRefused(str(error)) from None
        if _is_id_token(decoded):
            raise TokenRefused("an ID token is not an access token (RFC 9068: typ at+jwt)")
        return self.identity(decoded.claims)

    def _decode(self, token: str, refresh: bool) -> jwt.Token:
        keys = self._key_set(refresh)
        try:
            return jwt.decode(token, keys, algorithms=ALGORITHMS)
        except (JoseError, ValueError) as error:
            if refresh:
                raise TokenRefused(f"not signed by the provider's keys ({error})") from None
            raise

    def _key_set(self, refresh: bool) -> KeySet:
        with self._lock:
            due = self._keys is None or (refresh and time.monotonic() - self._keys_fetched_at > KEYS_REFRESH_S)
            if due:
                try:
                    self._keys = KeySet.import_key_set(self._fetch_keys())
                except (httpx.HTTPError, ValueError, KeyError) as error:
                    if self._keys is None:
                        raise TokenRefused(f"the provider's keys cannot be read ({error})") from None
                self._keys_fetched_at = time.monotonic()
            return self._keys

    def _fetch_keys(self) -> dict:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            metadata = http.get(f"{self.settings.issuer}/.well-known/openid-configuration").raise_for_status().json()
            if metadata.get("issuer") != self.settings.issuer:  # OpenID Connect Discovery 1.0, section 4.3
                raise ValueError(f"the discovery document names issuer {metadata.get('issuer')!r}")
            return http.get(metadata["jwks_uri"]).raise_for_status().json()


def _is_id_token(token: jwt.Token) -> bool:
    """An ID token sent as a bearer token: its audience is the client, as an access token's may be. Access tokens
    say so in their header (RFC 9068 section 2.1); providers that type neither say what an ID token is by its
    claims (a nonce; Keycloak's ``typ`` claim ID)."""
    if str(token.header.get("typ", "")).lower() in ("at+jwt", "application/at+jwt"):
        return False
    return "nonce" in token.claims or token.claims.get("typ") == "ID"
