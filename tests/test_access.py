"""Sign-in and roles over a node's real state: every route of the OpenAPI document (and every viewer page) with
each role, personal tokens, password sessions (cookie flags, CSRF, logout, rate limit, a reset password), the
start-up rule for a node without users, the upgrade from the shared token, and the audit table's chain."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.exc import DatabaseError

from dicom_node.audit.record import AuditEventKind
from dicom_node.cli import main
from dicom_node.config import ConfigError, OidcSettings, Settings, load_settings
from dicom_node.models import ApiToken, AuditEvent, UserRole
from dicom_node.users import UserError
from tests.accounts import PASSWORD, accounts
from tests.node_state import HAND_PATIENT, Received, received_node
from web.app import check_sign_in, create_app
from web.dependencies import WebContext

# The role each route needs, as designed (docs/security.md); None: open, for it holds no patient data.
EXPECTED_ROLES = {
    ("get", "/health"): None,
    ("get", "/metrics"): None,
    ("get", "/model_info"): None,
    ("get", "/api/patients"): "viewer",
    ("get", "/api/patients/{patient_id}"): "viewer",
    ("get", "/api/studies/{study_uid}"): "viewer",
    ("get", "/api/instances/{sop_uid}"): "viewer",
    ("get", "/api/instances/{sop_uid}/image.png"): "viewer",
    ("get", "/api/results/{result_id}/heatmap.png"): "viewer",
    ("get", "/results/{patient_id}"): "viewer",
    ("get", "/api/jobs"): "operator",
    ("post", "/api/jobs/{job_id}/rerun"): "operator",
    ("get", "/api/deliveries"): "operator",
    ("post", "/api/deliveries/{delivery_id}/retry"): "operator",
    ("post", "/predict"): "operator",
    ("post", "/predict_base64"): "operator",
    ("get", "/api/users"): "admin",
    ("get", "/api/configuration"): "admin",
    ("get", "/api/audit"): "admin",
}
VIEWER_PAGES = ["/patients", f"/patients/{quote(HAND_PATIENT, safe='')}", "/instances/{uid}"]


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Received]:
    state = received_node(tmp_path_factory.mktemp("access"))
    yield state
    state.node.engine.dispose()


def app_for(received: Received, settings: Settings | None = None):
    context = WebContext(settings or received.node.settings, received.node.sessions, lambda: True)
    return create_app(context)


@pytest.fixture
def tokens(received: Received) -> Iterator[dict[UserRole, str]]:
    with accounts(received.node) as issued:
        yield issued


def _filled(path: str, received: Received) -> str:
    values = {
        "patient_id": quote(HAND_PATIENT, safe=""),
        "study_uid": received.hand.StudyInstanceUID,
        "sop_uid": received.hand.SOPInstanceUID,
        "result_id": "1",
        "delivery_id": str(received.failed_delivery),
        "job_id": "999999",
    }
    return re.sub(r"\{(\w+)(:path)?\}", lambda match: values[match.group(1)], path)


def _declared_role(operation: dict) -> str | None:
    requirements = operation.get("security") or []
    roles = {role for requirement in requirements for scopes in requirement.values() for role in scopes}
    assert len(roles) <= 1, f"one role per route: {roles}"
    return roles.pop() if roles else None


def test_every_route_of_the_openapi_document_asks_for_its_role(received: Received, tokens) -> None:
    client = TestClient(app_for(received))
    spec = client.get("/openapi.json").json()
    declared = {
        (method, path): _declared_role(operation)
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }
    assert declared == EXPECTED_ROLES
    for (method, path), needed in declared.items():
        url = _filled(path, received)
        anonymous = client.request(method, url)
        if needed is None:
            assert anonymous.status_code not in (401, 403), (method, path)
            continue
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        assert anonymous.headers["www-authenticate"] == "Bearer"
        for role, header in tokens.items():
            answer = client.request(method, url, headers={"Authorization": header})
            if role.allows(UserRole(needed)):
                assert answer.status_code not in (401, 403), (method, path, role, answer.text)
            else:
                assert answer.status_code == 403, (method, path, role)
                assert f"needs the role {needed}" in answer.json()["detail"]


def test_the_viewer_pages_send_a_browser_to_sign_in_and_show_nothing_of_a_patient(received: Received, tokens) -> None:
    client = TestClient(app_for(received))
    for page in VIEWER_PAGES:
        url = page.format(uid=received.hand.SOPInstanceUID)
        response = client.get(url, follow_redirects=False)
        assert response.status_code == 303 and urlsplit(response.headers["location"]).path == "/login", url
        assert HAND_PATIENT not in response.text and received.hand.PatientName.family_name not in response.text
        assert client.get(url, headers={"Authorization": tokens[UserRole.VIEWER]}).status_code == 200


def test_personal_tokens_expire_and_are_revoked(received: Received) -> None:
    client = TestClient(app_for(received))
    with accounts(received.node, UserRole.VIEWER) as tokens:
        header = {"Authorization": tokens[UserRole.VIEWER]}
        assert client.get("/api/patients", headers=header).status_code == 200
        for wrong in ("Bearer dnt_not-a-token", "Bearer not.a.jwt", tokens[UserRole.VIEWER].replace("Bearer", "Basic")):
            assert client.get("/api/patients", headers={"Authorization": wrong}).status_code == 401
        with received.node.sessions.begin() as session:
            session.execute(update(ApiToken).values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
        refused = client.get("/api/patients", headers=header)
        assert refused.status_code == 401 and "expired" in refused.json()["detail"]
        with received.node.sessions.begin() as session:
            session.execute(update(ApiToken).values(expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1)))
        assert client.get("/api/patients", headers=header).status_code == 200
        context = WebContext(received.node.settings, received.node.sessions, lambda: True)
        with received.node.sessions() as session:
            token_id = session.scalar(select(ApiToken.id))
        context.users.revoke_token(token_id, actor="test")
        assert client.get("/api/patients", headers=header).status_code == 401
        with pytest.raises(UserError, match="no working token"):
            context.users.revoke_token(token_id, actor="test")


def _csrf(page_html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page_html).group(1)


def _sign_in(client: TestClient, username: str, password: str, next_page: str = "/patients"):
    form = client.get(f"/login?next={next_page}")
    assert form.status_code == 200, form.text
    data = {"username": username, "password": password, "next": next_page, "csrf_token": _csrf(form.text)}
    return client.post("/login", data=data, follow_redirects=False)


def test_a_password_session_its_cookie_csrf_and_sign_out(received: Received) -> None:
    client = TestClient(app_for(received))
    with accounts(received.node, UserRole.VIEWER, UserRole.OPERATOR):
        form = client.get("/login").text
        missing_csrf = client.post("/login", data={"username": "viewer", "password": PASSWORD}, follow_redirects=False)
        assert missing_csrf.status_code == 403 and client.get("/api/patients").status_code == 401
        assert _csrf(form)
        response = _sign_in(client, "operator", PASSWORD, f"/patients/{quote(HAND_PATIENT, safe='')}")
        assert (
            response.status_code == 303 and response.headers["location"] == f"/patients/{quote(HAND_PATIENT, safe='')}"
        )
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
        page = client.get("/patients")
        assert page.status_code == 200 and 'data-testid="signed-in">operator (operator)' in page.text
        # a state-changing API call with the session's cookie needs the CSRF token in a header
        retry = f"/api/deliveries/{received.failed_delivery}/retry"
        assert client.post(retry).status_code == 403
        csrf = _csrf(page.text)
        assert client.post(retry, headers={"X-CSRF-Token": csrf}).status_code in (200, 409)
        assert client.post("/logout", data={"csrf_token": "wrong"}).status_code == 403
        assert client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
        assert client.get("/patients", follow_redirects=False).status_code == 303
        assert client.get("/api/patients").status_code == 401

        over_tls = TestClient(app_for(received), base_url="https://testserver")
        assert "secure" in _sign_in(over_tls, "viewer", PASSWORD).headers["set-cookie"].lower()
        # a new password ends the sessions signed in before it
        assert over_tls.get("/api/patients").status_code == 200
        context = WebContext(received.node.settings, received.node.sessions, lambda: True)
        context.users.reset_password("viewer", "another long password", actor="test")
        assert over_tls.get("/api/patients").status_code == 401
        for target in ("//evil.example.org/", "https://evil.example.org/", "/\\evil.example.org"):
            signed_in = _sign_in(TestClient(app_for(received)), "operator", PASSWORD, quote(target, safe=""))
            assert signed_in.headers["location"] == "/patients", "no redirect off the site"


def test_a_session_ends_after_web_session_hours(received: Received) -> None:
    settings = received.node.settings
    brief = settings.model_copy(update={"web": settings.web.model_copy(update={"session_hours": 1 / 3600})})
    client = TestClient(app_for(received, brief))
    with accounts(received.node, UserRole.VIEWER):
        assert _sign_in(client, "viewer", PASSWORD).status_code == 303
        assert client.get("/api/patients").status_code == 200
        time.sleep(1.1)
        assert client.get("/api/patients").status_code == 401


def test_an_issuer_is_https_except_on_loopback() -> None:
    base = {"client_id": "node", "client_secret": "secret"}
    assert OidcSettings.model_validate(base | {"issuer": "https://idp.example.org/realms/x/"}).issuer == (
        "https://idp.example.org/realms/x"
    )
    assert OidcSettings.model_validate(base | {"issuer": "http://127.0.0.1:8080"}).issuer == "http://127.0.0.1:8080"
    for issuer in ("http://idp.example.org", "ftp://idp.example.org", "idp.example.org"):
        with pytest.raises(ValueError, match="an issuer is an https URL"):
            OidcSettings.model_validate(base | {"issuer": issuer})


def test_failed_sign_ins_are_limited_and_recorded(received: Received) -> None:
    settings = received.node.settings
    limited = settings.model_copy(update={"web": settings.web.model_copy(update={"sign_in_attempts": 3})})
    client = TestClient(app_for(received, limited))
    with accounts(received.node, UserRole.VIEWER):
        for _ in range(3):
            wrong = _sign_in(client, "viewer", "not the password at all")
            assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
        refused = _sign_in(client, "viewer", PASSWORD)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
        assert _sign_in(client, "operator-who-does-not-exist", PASSWORD).status_code == 401, "per user name"
    with received.node.sessions() as session:
        kinds = session.scalars(select(AuditEvent.kind).where(AuditEvent.user == "viewer")).all()
    assert kinds.count(AuditEventKind.SIGN_IN_FAILED) >= 4


def test_the_last_admin_stays_and_names_are_checked(received: Received) -> None:
    with accounts(received.node, UserRole.ADMIN):
        users = WebContext(received.node.settings, received.node.sessions, lambda: True).users
        with pytest.raises(UserError, match="last admin"):
            users.remove("admin", actor="test")
        with pytest.raises(UserError, match="last admin"):
            users.set_role("admin", UserRole.VIEWER, actor="test")
        with pytest.raises(UserError, match="at least 12"):
            users.add("shorty", UserRole.VIEWER, "short", actor="test")
        with pytest.raises(UserError, match="user name"):
            users.add("../etc", UserRole.VIEWER, PASSWORD, actor="test")
        with pytest.raises(UserError, match="already"):
            users.add("admin", UserRole.VIEWER, PASSWORD, actor="test")


def test_the_configuration_view_hides_secrets(received: Received, tokens) -> None:
    settings = received.node.settings
    oidc = {"issuer": "http://127.0.0.1:9", "client_id": "node", "client_secret": "s3cret-value-of-the-client"}
    configured = settings.model_copy(
        update={"web": settings.web.model_copy(update={"oidc": OidcSettings.model_validate(oidc)})}
    )
    shown = TestClient(app_for(received, configured)).get(
        "/api/configuration", headers={"Authorization": tokens[UserRole.ADMIN]}
    )
    assert shown.status_code == 200
    assert (
        "s3cret-value-of-the-client" not in shown.text and shown.json()["web"]["oidc"]["client_secret"] == "**********"
    )


def test_without_users_or_provider_the_node_serves_loopback_only(received: Received) -> None:
    users = WebContext(received.node.settings, received.node.sessions, lambda: True).users
    assert not users.any()
    client = TestClient(app_for(received))
    assert client.get("/api/patients").status_code == 200, "open on loopback"
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        assert client.get("/api/patients", headers={header: "192.0.2.7"}).status_code == 401, "not through a proxy"
    exposed = received.node.settings.model_copy(
        update={"web": received.node.settings.web.model_copy(update={"host": "0.0.0.0"})}
    )
    assert TestClient(app_for(received, exposed)).get("/api/patients").status_code == 401, "not when it listens wide"
    # no CSRF token without sign-in: a browser's post from a page of another site is refused
    retry = f"/api/deliveries/{received.failed_delivery}/retry"
    for header in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example.org"}):
        assert client.post(retry, headers=header).status_code == 403
    with pytest.raises(ConfigError, match="nobody can sign in: create the first user with `dicom-node users add"):
        check_sign_in(exposed, users)
    with accounts(received.node, UserRole.ADMIN):
        check_sign_in(exposed, users)


def test_a_configuration_with_the_shared_token_says_how_to_go_on(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("web:\n  api_token: 0123456789abcdef-old-token\n")
    for path in (config, None):
        if path is None:
            monkeypatch.setenv("DICOM_NODE_WEB__API_TOKEN", "0123456789abcdef-old-token")
        with pytest.raises(ConfigError) as error:
            load_settings(path)
        message = str(error.value)
        assert "\n" not in message and "dicom-node users add NAME --role admin" in message, message
        assert "0123456789abcdef" not in message


def test_the_users_command_and_the_audit_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"storage:\n  root: {tmp_path / 'storage'}\n")
    monkeypatch.setenv("NEW_USER_PASSWORD", PASSWORD)

    def command(*arguments: str) -> subprocess.CompletedProcess[str]:
        """``dicom-node`` in this process (each started process would import torch again)."""
        capsys.readouterr()
        returncode = main([*arguments, "--config", str(config)])
        output = capsys.readouterr()
        return subprocess.CompletedProcess(arguments, returncode, output.out, output.err)

    assert command("users", "add", "ada", "--role", "admin").returncode == 0
    assert command("users", "add", "ben", "--role", "viewer").returncode == 0
    issued = command("users", "token", "ben", "--days", "7")
    assert issued.returncode == 0 and re.search(r"^dnt_\S{40,}$", issued.stdout, re.M)
    tokens = command("users", "tokens", "ben").stdout
    assert re.fullmatch(r"1\tapi\texpires \d{4}-\d{2}-\d{2}\tworks\n", tokens), tokens
    listed = command("users", "list").stdout
    assert re.search(r"^ada\tadmin\t0 working", listed, re.M) and re.search(r"^ben\tviewer\t1 working", listed, re.M)
    refused = command("users", "remove", "ada")
    assert refused.returncode == 2 and "last admin" in refused.stderr
    assert command("users", "set-role", "ben", "admin").returncode == 0
    assert command("audit", "verify").returncode == 0

    index = tmp_path / "storage" / "index.sqlite3"
    with sqlite3.connect(index) as database, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        database.execute("UPDATE audit_events SET detail = 'nothing happened' WHERE id = 2")
    with sqlite3.connect(index) as database, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        database.execute("DELETE FROM audit_events WHERE id = 2")
    # around the triggers, as someone with the database file could
    with sqlite3.connect(index) as database:
        database.execute("DROP TRIGGER audit_events_no_update")
        database.execute("UPDATE audit_events SET detail = 'nothing happened' WHERE id = 2")
    broken = command("audit", "verify")
    assert broken.returncode == 1 and "event 2: its content does not match its digest (changed)" in broken.stdout
    with sqlite3.connect(index) as database:
        database.execute("DROP TRIGGER audit_events_no_delete")
        database.execute("DELETE FROM audit_events WHERE id = 3")
    assert "event 4: the events before it are missing (3)" in command("audit", "verify").stdout


def test_the_trail_refuses_changes_through_the_node_too(received: Received) -> None:
    with accounts(received.node, UserRole.VIEWER):  # a user added: an event
        pass
    with pytest.raises(DatabaseError, match="append-only"), received.node.sessions.begin() as session:
        session.execute(update(AuditEvent).values(detail="rewritten"))
    assert received.node.trail.verify()[1] == []


def test_an_operator_runs_a_finished_job_again(received: Received, tokens) -> None:
    client = TestClient(app_for(received))
    operator = {"Authorization": tokens[UserRole.OPERATOR]}
    jobs = client.get("/api/jobs?state=done", headers=operator).json()["items"]
    job = jobs[0]
    again = client.post(f"/api/jobs/{job['id']}/rerun", headers=operator)
    assert again.status_code == 200 and again.json()["state"] == "pending" and again.json()["attempts"] == 0
    busy = client.post(f"/api/jobs/{job['id']}/rerun", headers=operator)
    assert busy.status_code == 409 and "only a failed or finished job" in busy.json()["detail"]
    assert client.post("/api/jobs/999999/rerun", headers=operator).status_code == 404
    assert (
        client.post(f"/api/jobs/{job['id']}/rerun", headers={"Authorization": tokens[UserRole.VIEWER]}).status_code
        == 403
    )
