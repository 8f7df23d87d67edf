"""Sign-in through a real OpenID Connect provider (npm's oidc-provider, started on loopback by tests/oidc.py):
a viewer signs in through the viewer in Debian's headless Chromium; an operator and a viewer call the API with
the provider's access tokens, each allowed what their role allows; an expired token, one signed by another key
and one for another audience are refused; a user the provider gives no role of the node gets nothing."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy import select

from dicom_node.models import AuditEvent
from tests.dicom_peers import free_port
from tests.node_state import HAND_PATIENT, Received, received_node
from tests.oidc import OidcProvider, access_token, follow_sign_in, oidc_provider, sign_in, signed_access_token
from tests.servers import serving
from web.app import create_app
from web.dependencies import WebContext

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
AUDIENCE = "urn:dicom-node:api"  # a resource indicator is an absolute URI (RFC 8707)
ACCOUNTS = {"alice": ["viewer"], "oscar": ["operator", "some-other-app-role"], "mallory": ["guest"]}


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Received]:
    state = received_node(tmp_path_factory.mktemp("oidc"))
    yield state
    state.node.engine.dispose()


@pytest.fixture(scope="module")
def site(received: Received) -> Iterator[tuple[str, OidcProvider]]:
    """The provider, and the node's viewer and API served by uvicorn, configured with it; yields the base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with oidc_provider(ACCOUNTS, [f"{base}/login/oidc/callback"], AUDIENCE) as provider:
        settings = received.node.settings
        oidc = {
            "issuer": provider.issuer,
            "client_id": provider.client_id,
            "client_secret": provider.client_secret,
            "audience": AUDIENCE,
        }
        web = type(settings.web).model_validate(settings.web.model_dump() | {"oidc": oidc, "port": port})
        app = create_app(WebContext(settings.model_copy(update={"web": web}), received.node.sessions, lambda: True))
        with serving(app, port):
            yield base, provider


def _api(base: str, token: str, path: str) -> httpx.Response:
    return httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_the_api_takes_the_providers_access_tokens_by_role(site, received: Received) -> None:
    base, provider = site
    callback = f"{base}/login/oidc/callback"
    patient = f"/api/patients/{quote(HAND_PATIENT, safe='')}"
    viewer, operator = access_token(provider, "alice", callback), access_token(provider, "oscar", callback)
    assert _api(base, viewer, patient).status_code == 200
    assert _api(base, viewer, "/api/jobs").status_code == 403
    assert _api(base, operator, "/api/jobs").status_code == 200
    assert _api(base, operator, "/api/users").status_code == 403
    assert _api(base, access_token(provider, "mallory", callback), patient).status_code == 401
    id_token = sign_in(provider, "oscar", callback)["id_token"]
    assert _api(base, id_token, patient).status_code == 401, "an ID token's audience is the client"

    now = int(time.time())
    claims = {"iss": provider.issuer, "aud": AUDIENCE, "sub": "alice", "roles": ["admin"], "iat": now - 600}
    expired = signed_access_token(provider, claims | {"exp": now - 300})
    refused = _api(base, expired, patient)
    assert refused.status_code == 401 and "expired" in refused.json()["detail"]
    assert _api(base, signed_access_token(provider, claims | {"exp": now + 300}), "/api/users").status_code == 200
    other_audience = signed_access_token(provider, claims | {"exp": now + 300, "aud": "another-service"})
    assert _api(base, other_audience, patient).status_code == 401
    # an ID token for the API's audience (a provider that issues one so): the provider's key, a nonce, no at+jwt
    own_key = RSAKey.import_key(provider.private_jwk)
    like_an_id_token = jwt.encode(
        {"alg": "RS256", "kid": own_key.kid}, claims | {"exp": now + 300, "nonce": "n"}, own_key
    )
    refused = _api(base, like_an_id_token, patient)
    assert refused.status_code == 401 and "ID token" in refused.json()["detail"]
    foreign_key = RSAKey.generate_key(2048, parameters={"kid": provider.private_jwk["kid"]}, private=True)
    forged = jwt.encode({"alg": "RS256", "kid": foreign_key.kid}, claims | {"exp": now + 300}, foreign_key)
    assert _api(base, forged, patient).status_code == 401

    with received.node.sessions() as session:
        refusals = session.scalars(select(AuditEvent.detail).where(AuditEvent.kind == "sign-in-failed")).all()
    assert any("expired" in detail for detail in refusals) and any("signed" in detail for detail in refusals)
    assert any("names no role" in detail for detail in refusals)


def test_a_user_without_a_role_of_the_node_signs_in_to_nothing(site) -> None:
    base, provider = site
    with httpx.Client(timeout=30) as browser:
        back = follow_sign_in(browser, f"{base}/login/oidc?next=/patients", "mallory", f"{base}/login/oidc/callback")
        page = browser.get(back)
        assert page.status_code == 403 and "has no role on this node" in page.text
        assert browser.get(f"{base}/patients", follow_redirects=False).status_code == 303


def _signed_in_through_the_provider(page, base: str, provider: OidcProvider, target: str, username: str):
    """``page`` opens ``target``, is sent to the sign-in page (nothing of the patient shown), signs in as
    ``username`` on the provider's login form, and is back at ``target``."""
    page.set_default_timeout(15_000)
    page.goto(f"{base}{target}")
    assert urlsplit(page.url).path == "/login" and HAND_PATIENT not in page.content()
    page.get_by_test_id("sign-in-provider").click()
    page.wait_for_url(f"{provider.issuer}/**")
    page.fill("input[name=login]", username)
    page.fill("input[name=password]", "any")
    page.locator("button[type=submit]").first.click()
    page.wait_for_url(f"{base}{target}")
    return page


def test_a_viewer_and_an_operator_sign_in_through_the_provider_in_a_browser(
    site, received: Received, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM} (Debian's chromium package; scripts/install-system-packages.sh installs it)")
    base, provider = site
    started = dt.datetime.now(dt.UTC)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            target = f"/patients/{quote(HAND_PATIENT, safe='')}"
            page = _signed_in_through_the_provider(browser.new_page(), base, provider, target, "alice")
            assert page.get_by_test_id("signed-in").inner_text() == "alice (viewer)"
            assert page.get_by_test_id("patient-id").inner_text() == HAND_PATIENT
            page.screenshot(path=str(tmp_path / "signed-in.png"))
            # the viewer role does not reach an operator's routes, with the browser's session either
            assert page.request.get(f"{base}/api/jobs").status == 403
            page.get_by_role("button", name="Sign out").click()
            page.wait_for_url(f"{base}/login")
            page.goto(f"{base}{target}")
            assert urlsplit(page.url).path == "/login"

            # a second user, of another role, in a fresh context (the provider would remember alice's sign-in)
            page = _signed_in_through_the_provider(browser.new_page(), base, provider, target, "oscar")
            assert page.get_by_test_id("signed-in").inner_text() == "oscar (operator)"
            assert page.request.get(f"{base}/api/jobs").status == 200
        finally:
            browser.close()
    with received.node.sessions() as session:
        events = session.execute(
            select(AuditEvent.kind, AuditEvent.user, AuditEvent.detail)
            .where(AuditEvent.occurred_at >= started, AuditEvent.user == "alice")
            .order_by(AuditEvent.id)
        ).all()
    kinds = [kind for kind, _, _ in events]
    assert kinds[0] == "sign-in" and events[0].detail == "provider" and kinds[-1] == "sign-out"
    assert ("patient-data-read", "alice", "GET /patients/{patient_id:path}") in events
