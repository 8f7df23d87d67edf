"""The audit trail of a running node (``dicom-node serve``): an image sent by DCMTK's storescu, its results
delivered to a storescp, a viewer who opens the patient in the viewer and an operator who calls the API; then
``dicom-node audit export`` lists exactly those events of the patient with the right users, ``audit verify``
holds, and a TLS syslog collector got every event as a DICOM audit message (PS3.15 A.5), those queued while it
was away included."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from lxml import etree
from sqlalchemy import func, select, text

from dicom_node.audit.trail import AuditTrail
from dicom_node.cli import main
from dicom_node.config import DatabaseSettings
from dicom_node.database import open_index, session_factory
from dicom_node.models import AuditEvent, UserRole
from dicom_node.synthetic import synthetic_dx
from dicom_node.users import Users
from tests.accounts import PASSWORD
from tests.dicom_peers import dcmtk, free_port
from tests.serve_process import SHIPPED_CONFIG, ServeProcess
from tests.syslog_collector import SyslogCollector, make_certificates
from tests.test_orthanc_peer import storescp

pytestmark = pytest.mark.slow

PATIENT = "AUDIT-0001"
OTHER_PATIENT = "AUDIT-0002"
SCHEMA = Path(__file__).parent / "data" / "dicom-audit-message.rng"
EVENT_IDS = {  # PS3.15 A.5.3: the EventID of each kind
    "association-received": "110104",
    "association-sent": "110104",
    "patient-data-read": "110103",  # 110110 Patient Record where no study is named (the patient list)
    "patient-data-created": "110103",
    "sign-in": "110114",
    "sign-in-failed": "110114",
    "sign-out": "110114",
    "user-changed": "110113",
    "audit-log-read": "110101",
}


def _events(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(AuditEvent))


def _wait(condition, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_who_touched_a_patient(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    engine = open_index(DatabaseSettings(url=f"sqlite:///{storage / 'index.sqlite3'}"))
    sessions = session_factory(engine)
    trail = AuditTrail(DatabaseSettings(url=f"sqlite:///{storage / 'index.sqlite3'}"), storage)
    users = Users(sessions, trail)
    users.add("alice", UserRole.VIEWER, PASSWORD, actor="test")
    users.add("oscar", UserRole.OPERATOR, PASSWORD, actor="test")
    oscar = {"Authorization": f"Bearer {users.issue_token('oscar', 'test', 1, actor='test').secret}"}

    certificates = make_certificates(tmp_path / "tls", "audit collector")
    collector = SyslogCollector(certificates).start()
    pacs_port = free_port()
    environment = {
        "DICOM_NODE_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}]
        ),
        "DICOM_NODE_DELIVERY__DEFAULT_DESTINATION": "pacs",
        "DICOM_NODE_OUTPUTS__PARAMETRIC_MAPS": "false",
        "DICOM_NODE_AUDIT__SYSLOG__HOST": "127.0.0.1",
        "DICOM_NODE_AUDIT__SYSLOG__PORT": str(collector.port),
        "DICOM_NODE_AUDIT__SYSLOG__CA_FILE": str(certificates.ca_file),
    }
    with storescp(pacs_port, tmp_path / "pacs"):
        node = ServeProcess(storage, environment=environment)
        try:
            node.wait_until_ready()
            image = synthetic_dx(PATIENT, "Audit^Alice", side=256, body_part="HAND")
            other = synthetic_dx(OTHER_PATIENT, "Audit^Other", side=256, body_part="HAND", seed=1)
            for number, ds in enumerate((image, other)):
                ds.save_as(tmp_path / f"{number}.dcm", enforce_file_format=True)
            sent = dcmtk(
                "storescu",
                "-aet",
                "MODALITY",
                "-aec",
                "AINODE",
                "127.0.0.1",
                node.dicom_port,
                tmp_path / "0.dcm",
                tmp_path / "1.dcm",
            )
            assert sent.returncode == 0, sent.stderr
            api = httpx.Client(base_url=f"http://127.0.0.1:{node.web_port}", timeout=30, follow_redirects=True)

            def delivered() -> list[dict]:
                items = api.get("/api/deliveries?limit=500", headers=oscar).json()["items"]
                return items if items and all(item["state"] == "sent" for item in items) else []

            node.jobs_when_finished(4)
            _wait(delivered, "the deliveries")
            _wait(lambda: len(collector.frames) >= _events(sessions), "the collector to catch up")
            collector.stop()  # the collector goes away; the events of the reads wait in the index

            form = api.get("/login").text
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
            signed_in = api.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf})
            assert signed_in.status_code == 200 and "alice (viewer)" in signed_in.text
            patient_page = api.get(f"/patients/{quote(PATIENT, safe='')}")
            assert patient_page.status_code == 200 and PATIENT in patient_page.text
            api.cookies.clear()
            assert api.get(f"/api/patients/{quote(PATIENT, safe='')}", headers=oscar).status_code == 200
            assert api.get(f"/results/{quote(PATIENT, safe='')}", headers=oscar).status_code == 200
            assert api.get(f"/api/patients/{quote(PATIENT, safe='')}").status_code == 401

            waiting = _events(sessions) - len(collector.frames)
            assert waiting >= 4, "sign-in, three reads and a failed call wait for the collector"
            collector.start()
            _wait(lambda: len(collector.frames) >= _events(sessions), "the queued events to arrive", 30)
        finally:
            node.stop()
            node.ensure_stopped()
    collector.stop()

    with sessions() as session:
        kinds = session.scalars(select(AuditEvent.kind).order_by(AuditEvent.id)).all()
    exported = _cli(storage, "audit", "export", "--patient", PATIENT, "--since", dt.date.today().isoformat())
    events = [json.loads(line) for line in exported.stdout.splitlines()]
    received, *rest = events
    assert (received["kind"], received["user"], received["remote_ae"], received["local_ae"]) == (
        "association-received",
        "MODALITY",
        "MODALITY",
        "AINODE",
    )
    assert received["address"] == "127.0.0.1" and received["patients"] == [PATIENT, OTHER_PATIENT]
    assert received["detail"] == "C-STORE: 2 instance(s) received; released" and received["outcome"] == 0
    sending = [event for event in rest if event["kind"] == "association-sent"]
    reads = [event for event in rest if event["kind"] != "association-sent"]
    assert sending and all(event["user"] == "STORESCP" and event["outcome"] == 0 for event in sending)
    with sessions() as session:
        every_sending = session.scalars(select(AuditEvent.detail).where(AuditEvent.kind == "association-sent")).all()
        sent = session.execute(text("SELECT count(*) FROM deliveries WHERE state = 'sent'")).scalar()
    assert sum(int(re.match(r"C-STORE: (\d+) instance", detail).group(1)) for detail in every_sending) == sent
    assert [(event["kind"], event["user"], event["role"], event["detail"], event["patients"]) for event in reads] == [
        # signed in, the viewer lands on the patient list: a read of both patients
        ("patient-data-read", "alice", "viewer", "GET /patients", [OTHER_PATIENT, PATIENT]),
        ("patient-data-read", "alice", "viewer", "GET /patients/{patient_id:path}", [PATIENT]),
        ("patient-data-read", "oscar", "operator", "GET /api/patients/{patient_id:path}", [PATIENT]),
        ("patient-data-read", "oscar", "operator", "GET /results/{patient_id:path}", [PATIENT]),
    ]
    assert all(event["address"] == "127.0.0.1" for event in reads)
    assert ["study", image.StudyInstanceUID] in reads[1]["objects"]

    with sessions() as session:
        last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).one()
    assert (last.kind, last.patients) == ("audit-log-read", [PATIENT]), "the export is an event of its own"
    assert _cli(storage, "audit", "verify").returncode == 0

    schema = etree.RelaxNG(etree.parse(str(SCHEMA)))
    messages = collector.messages
    assert len(messages) == len(kinds), "each event once"
    for kind, message in zip(kinds, messages, strict=True):
        assert message.msgid == "IHE+RFC-3881" and message.msg.startswith(b"\xef\xbb\xbf")
        xml = message.msg[3:]
        schema.assertValid(etree.fromstring(xml))
        event_id = ET.fromstring(xml).find("EventIdentification/EventID").get("csd-code")
        assert event_id == EVENT_IDS[kind] or (kind, event_id) == ("patient-data-read", "110110")
    trail.close()
    engine.dispose()


def _cli(storage: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``dicom-node`` on the node's index, in this process (a started one would import torch again, seconds)."""
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(output):
        patch.setenv("DICOM_NODE_STORAGE__ROOT", str(storage))
        returncode = main([*arguments, "--config", str(SHIPPED_CONFIG)])
    return subprocess.CompletedProcess(arguments, returncode, output.getvalue(), "")
