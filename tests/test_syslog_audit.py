"""The audit trail's messages to a syslog collector: DICOM audit messages (PS3.15 A.5) validated against the
standard's schema, and their delivery by RFC 5424 over TLS (RFC 5425) to a real collector on loopback."""

from __future__ import annotations

import base64
import datetime as dt
import os
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from dicom_node.audit.dicom_message import dicom_audit_message
from dicom_node.audit.record import AuditEventKind, AuditObject, AuditObjectKind, AuditOutcome, AuditRecord
from dicom_node.audit.syslog import SyslogTlsSender, client_context, octet_counted, syslog_message
from tests.dicom_peers import free_port
from tests.syslog_collector import LOOPBACK, Certificates, SyslogCollector, make_certificates

SCHEMA = Path(__file__).parent / "data" / "dicom-audit-message.rng"
SOURCE_ID = "dicom-node-1"
AT = dt.datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=dt.UTC)
STUDY = AuditObject(AuditObjectKind.STUDY, "1.2.826.0.1.3680043.8.498.1")
INSTANCE = AuditObject(AuditObjectKind.INSTANCE, "1.2.826.0.1.3680043.8.498.1.1")
OTHER_STUDY = AuditObject(AuditObjectKind.STUDY, "1.2.826.0.1.3680043.8.498.2")

EXAMPLES = {
    AuditEventKind.AUDIT_LOG_READ: AuditRecord(
        AuditEventKind.AUDIT_LOG_READ,
        AT,
        "ada",
        address="10.1.2.5",
        role="admin",
        patients=("PAT-1",),
        detail="GET /api/audit",
    ),
    AuditEventKind.PATIENT_DATA_READ: AuditRecord(
        AuditEventKind.PATIENT_DATA_READ,
        AT,
        "alice",
        address="10.1.2.3",
        role="viewer",
        patients=("PAT-1",),
        objects=(STUDY, INSTANCE),
        detail="GET /api/studies/{study_uid}",
    ),
    AuditEventKind.PATIENT_DATA_CREATED: AuditRecord(
        AuditEventKind.PATIENT_DATA_CREATED,
        AT,
        "bob",
        address="10.1.2.4",
        role="operator",
        patients=("PAT-2",),
        objects=(STUDY, INSTANCE),
        detail="POST /predict",
    ),
    AuditEventKind.ASSOCIATION_RECEIVED: AuditRecord(
        AuditEventKind.ASSOCIATION_RECEIVED,
        AT,
        "MODALITY",
        address="10.9.8.7",
        patients=("PAT-3",),
        objects=(STUDY, INSTANCE),
        detail="C-STORE 1 instances",
        local_ae="AI_NODE",
        remote_ae="MODALITY",
    ),
    AuditEventKind.ASSOCIATION_SENT: AuditRecord(
        AuditEventKind.ASSOCIATION_SENT,
        AT,
        "PACS",
        address="pacs.hospital.example",
        patients=("PAT-3",),
        objects=(STUDY,),
        detail="C-STORE 2 instances",
        local_ae="AI_NODE",
        remote_ae="PACS",
    ),
    AuditEventKind.SIGN_IN: AuditRecord(AuditEventKind.SIGN_IN, AT, "alice", address="10.1.2.3", role="viewer"),
    AuditEventKind.SIGN_IN_FAILED: AuditRecord(
        AuditEventKind.SIGN_IN_FAILED,
        AT,
        "mallory",
        address="2001:db8::66",
        outcome=AuditOutcome.MINOR_FAILURE,
        detail="wrong password",
    ),
    AuditEventKind.SIGN_OUT: AuditRecord(AuditEventKind.SIGN_OUT, AT, "alice", address="10.1.2.3", role="viewer"),
    AuditEventKind.USER_CHANGED: AuditRecord(
        AuditEventKind.USER_CHANGED,
        AT,
        "root",
        address="10.1.2.5",
        role="admin",
        objects=(AuditObject(AuditObjectKind.USER, "alice"), AuditObject(AuditObjectKind.USER, "bob")),
        detail="role viewer -> admin",
    ),
}

# kind: (EventID, EventActionCode, EventTypeCode), the codes of PS3.15 A.5.3 and PS3.16 CID 400-403
EVENTS = {
    AuditEventKind.AUDIT_LOG_READ: (("110101", "DCM", "Audit Log Used"), "R", None),
    AuditEventKind.PATIENT_DATA_READ: (("110103", "DCM", "DICOM Instances Accessed"), "R", None),
    AuditEventKind.PATIENT_DATA_CREATED: (("110103", "DCM", "DICOM Instances Accessed"), "C", None),
    AuditEventKind.ASSOCIATION_RECEIVED: (("110104", "DCM", "DICOM Instances Transferred"), "C", None),
    AuditEventKind.ASSOCIATION_SENT: (("110104", "DCM", "DICOM Instances Transferred"), "R", None),
    AuditEventKind.SIGN_IN: (("110114", "DCM", "User Authentication"), "E", ("110122", "DCM", "Login")),
    AuditEventKind.SIGN_IN_FAILED: (("110114", "DCM", "User Authentication"), "E", ("110122", "DCM", "Login")),
    AuditEventKind.SIGN_OUT: (("110114", "DCM", "User Authentication"), "E", ("110123", "DCM", "Logout")),
    AuditEventKind.USER_CHANGED: (
        ("110113", "DCM", "Security Alert"),
        "E",
        ("110137", "DCM", "User Security Attributes Changed"),
    ),
}


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(SCHEMA))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("pki"), "collector")


@pytest.fixture
def collector(certificates: Certificates) -> Iterator[SyslogCollector]:
    with SyslogCollector(certificates) as running:
        yield running


def sender_for(collector: SyslogCollector, certificates: Certificates) -> SyslogTlsSender:
    return SyslogTlsSender(LOOPBACK, collector.port, client_context(certificates.ca_file, None, None), timeout=5)


def message_of(record: AuditRecord) -> ET.Element:
    return ET.fromstring(dicom_audit_message(record, SOURCE_ID))


def assert_valid(schema: etree.RelaxNG, message: bytes) -> None:
    assert schema.validate(etree.fromstring(message)), schema.error_log


def code(element: ET.Element | None) -> tuple[str, str, str]:
    assert element is not None
    return element.get("csd-code"), element.get("codeSystemName"), element.get("originalText")


def participants(message: ET.Element) -> list[ET.Element]:
    return message.findall("ActiveParticipant")


def objects_of(message: ET.Element, id_type: str) -> list[ET.Element]:
    return [
        item
        for item in message.findall("ParticipantObjectIdentification")
        if item.find("ParticipantObjectIDTypeCode").get("csd-code") == id_type
    ]


# The messages (PS3.15 A.5)


def test_every_event_kind_has_an_example() -> None:
    assert set(EXAMPLES) == set(EVENTS) == set(AuditEventKind)


@pytest.mark.parametrize("kind", list(AuditEventKind))
def test_every_kind_gives_a_message_the_schema_accepts(kind: AuditEventKind, schema: etree.RelaxNG) -> None:
    message = dicom_audit_message(EXAMPLES[kind], SOURCE_ID)

    assert message.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    assert_valid(schema, message)


@pytest.mark.parametrize("kind", list(AuditEventKind))
def test_event_identification_names_the_event(kind: AuditEventKind) -> None:
    record = EXAMPLES[kind]
    event_id, action, event_type = EVENTS[kind]

    event = message_of(record).find("EventIdentification")

    assert code(event.find("EventID")) == event_id
    assert event.get("EventActionCode") == action
    assert [code(item) for item in event.findall("EventTypeCode")] == ([event_type] if event_type else [])
    assert event.get("EventOutcomeIndicator") == str(int(record.outcome))
    assert dt.datetime.fromisoformat(event.get("EventDateTime")) == record.occurred_at
    assert event.findtext("EventOutcomeDescription", "") == record.detail


@pytest.mark.parametrize("kind", list(AuditEventKind))
def test_one_requestor_and_the_node_as_audit_source(kind: AuditEventKind) -> None:
    message = message_of(EXAMPLES[kind])

    # A.5.2: the system shall not identify multiple participants as UserIsRequestor
    assert [item.get("UserIsRequestor") for item in participants(message)].count("true") == 1
    source = message.find("AuditSourceIdentification")
    assert source.get("AuditSourceID") == SOURCE_ID
    assert source.find("AuditSourceTypeCode").get("csd-code") == "4"


def test_a_patient_read_without_studies_is_a_patient_record(schema: etree.RelaxNG) -> None:
    record = AuditRecord(AuditEventKind.PATIENT_DATA_READ, AT, "alice", patients=("PAT-1",), detail="GET /patients")

    message = dicom_audit_message(record, SOURCE_ID)

    assert_valid(schema, message)
    event = ET.fromstring(message).find("EventIdentification")
    assert code(event.find("EventID")) == ("110110", "DCM", "Patient Record")
    assert event.get("EventActionCode") == "R"
    [patient] = objects_of(ET.fromstring(message), "2")
    assert patient.get("ParticipantObjectID") == "PAT-1"


@pytest.mark.parametrize(
    "kind", [AuditEventKind.PATIENT_DATA_READ, AuditEventKind.PATIENT_DATA_CREATED, AuditEventKind.ASSOCIATION_RECEIVED]
)
def test_patient_and_study_objects(kind: AuditEventKind) -> None:
    record = EXAMPLES[kind]
    message = message_of(record)

    [patient] = objects_of(message, "2")
    assert patient.get("ParticipantObjectID") == record.patients[0]
    assert (patient.get("ParticipantObjectTypeCode"), patient.get("ParticipantObjectTypeCodeRole")) == ("1", "1")
    assert code(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
    [study] = objects_of(message, "110180")
    assert study.get("ParticipantObjectID") == STUDY.id
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert code(study.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")
    # the study's instances, in its description (A.5.2 SOPClass)
    sop_class = study.find("ParticipantObjectDescription/SOPClass")
    assert sop_class.get("NumberOfInstances") == "1"
    assert [item.get("UID") for item in sop_class.findall("Instance")] == [INSTANCE.id]
    assert len(message.findall("ParticipantObjectIdentification")) == 2


def test_instances_that_fit_no_single_study_are_objects_of_their_own(schema: etree.RelaxNG) -> None:
    record = AuditRecord(
        AuditEventKind.PATIENT_DATA_READ, AT, "alice", patients=("PAT-1",), objects=(STUDY, OTHER_STUDY, INSTANCE)
    )

    message = dicom_audit_message(record, SOURCE_ID)

    assert_valid(schema, message)
    parsed = ET.fromstring(message)
    assert [item.get("ParticipantObjectID") for item in objects_of(parsed, "110180")] == [STUDY.id, OTHER_STUDY.id]
    assert parsed.find(".//SOPClass") is None
    [instance] = objects_of(parsed, "SOPInstanceUID")
    assert instance.get("ParticipantObjectID") == INSTANCE.id
    assert code(instance.find("ParticipantObjectIDTypeCode")) == ("SOPInstanceUID", "99DICOMNODE", "SOP Instance UID")


@pytest.mark.parametrize(
    ("kind", "peer_role", "node_role"),
    [
        (
            AuditEventKind.ASSOCIATION_RECEIVED,
            ("110153", "DCM", "Source Role ID"),
            ("110152", "DCM", "Destination Role ID"),
        ),
        (
            AuditEventKind.ASSOCIATION_SENT,
            ("110152", "DCM", "Destination Role ID"),
            ("110153", "DCM", "Source Role ID"),
        ),
    ],
)
def test_a_transfer_names_source_and_destination(
    kind: AuditEventKind, peer_role: tuple[str, str, str], node_role: tuple[str, str, str]
) -> None:
    record = EXAMPLES[kind]

    source, destination = participants(message_of(record))

    # A.5.3.7: the process that sent the data, then the one that received it; the requestor opened the association
    received = kind is AuditEventKind.ASSOCIATION_RECEIVED
    peer, node = (source, destination) if received else (destination, source)
    assert (peer.get("UserID"), peer.get("AlternativeUserID")) == (record.remote_ae, f"AETITLES={record.remote_ae}")
    assert (node.get("UserID"), node.get("AlternativeUserID")) == ("AI_NODE", "AETITLES=AI_NODE")
    assert code(peer.find("RoleIDCode")) == peer_role
    assert code(node.find("RoleIDCode")) == node_role
    assert source.get("UserIsRequestor") == "true"
    assert destination.get("UserIsRequestor") == "false"
    assert peer.get("NetworkAccessPointID") == record.address
    assert peer.get("NetworkAccessPointTypeCode") == ("2" if received else "1")  # IP address, machine name
    assert node.get("NetworkAccessPointID") is None


@pytest.mark.parametrize("kind", [AuditEventKind.SIGN_IN, AuditEventKind.SIGN_IN_FAILED, AuditEventKind.SIGN_OUT])
def test_user_authentication_names_the_user_and_the_node(kind: AuditEventKind) -> None:
    record = EXAMPLES[kind]

    user, node = participants(message_of(record))

    assert (user.get("UserID"), user.get("UserIsRequestor")) == (record.user, "true")
    assert user.get("NetworkAccessPointID") == record.address
    assert user.get("NetworkAccessPointTypeCode") == "2"
    roles = [code(item) for item in user.findall("RoleIDCode")]
    assert roles == ([(record.role, "99DICOMNODE", record.role)] if record.role else [])
    assert (node.get("UserID"), node.get("UserIsRequestor")) == (SOURCE_ID, "false")
    assert message_of(record).find("ParticipantObjectIdentification") is None


@pytest.mark.parametrize(
    ("recorded", "reported"),
    [(AuditOutcome.SUCCESS, "4"), (AuditOutcome.MINOR_FAILURE, "4"), (AuditOutcome.SERIOUS_FAILURE, "8")],
)
def test_a_failed_sign_in_is_never_reported_as_a_success(recorded: AuditOutcome, reported: str) -> None:
    record = AuditRecord(AuditEventKind.SIGN_IN_FAILED, AT, "mallory", address="10.0.0.1", outcome=recorded)

    assert message_of(record).find("EventIdentification").get("EventOutcomeIndicator") == reported


def test_a_security_alert_names_each_changed_user_with_the_alert_description() -> None:
    record = EXAMPLES[AuditEventKind.USER_CHANGED]

    message = message_of(record)

    [admin, _node] = participants(message)
    assert (admin.get("UserID"), admin.get("UserIsRequestor")) == ("root", "true")
    subjects = message.findall("ParticipantObjectIdentification")
    assert [item.get("ParticipantObjectID") for item in subjects] == ["alice", "bob"]
    for subject in subjects:
        # A.5.3.11: a system object; A.5.1.2.2 Security User Entity; A.5.1.2.4 User Identifier
        assert (subject.get("ParticipantObjectTypeCode"), subject.get("ParticipantObjectTypeCodeRole")) == ("2", "11")
        assert code(subject.find("ParticipantObjectIDTypeCode")) == ("11", "RFC-3881", "User Identifier")
        detail = subject.find("ParticipantObjectDetail")
        assert detail.get("type") == "Alert Description"
        assert base64.b64decode(detail.get("value")).decode() == record.detail


def test_text_from_anyone_cannot_break_the_message(schema: etree.RelaxNG) -> None:
    user = "<eve>&\x00\x1b\ud800"
    record = AuditRecord(AuditEventKind.SIGN_IN_FAILED, AT, user, address="10.0.0.1", detail="name \x07 tried")

    message = dicom_audit_message(record, SOURCE_ID)

    assert_valid(schema, message)
    parsed = ET.fromstring(message)
    assert parsed.find("ActiveParticipant").get("UserID") == "<eve>&\ufffd\ufffd\ufffd"
    assert parsed.findtext("EventIdentification/EventOutcomeDescription") == "name \ufffd tried"


def test_a_time_without_a_zone_is_refused() -> None:
    record = AuditRecord(AuditEventKind.SIGN_OUT, dt.datetime(2025, 3, 14, 9, 26), "alice")

    with pytest.raises(ValueError, match="time zone"):
        dicom_audit_message(record, SOURCE_ID)


# The syslog messages (RFC 5424) and their frames (RFC 5425)


def test_syslog_message_header_and_body() -> None:
    at = dt.datetime(2025, 3, 14, 10, 26, 53, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))

    syslog_msg = syslog_message(b"<AuditMessage/>", at, hostname="node.example", app_name="dicom-node", procid="42")

    assert syslog_msg == (
        b"<85>1 2025-03-14T09:26:53.000005Z node.example dicom-node 42 IHE+RFC-3881 - \xef\xbb\xbf<AuditMessage/>"
    )
    assert octet_counted(b"hello") == b"5 hello"


def test_an_app_name_syslog_cannot_carry_is_refused() -> None:
    with pytest.raises(ValueError, match="APP-NAME"):
        SyslogTlsSender(LOOPBACK, 6514, client_context(None, None, None), app_name="dicom node")


# Delivery to a collector (RFC 5425)


def test_the_collector_receives_the_messages_on_one_connection(
    collector: SyslogCollector, certificates: Certificates
) -> None:
    sender = sender_for(collector, certificates)
    audit = dicom_audit_message(EXAMPLES[AuditEventKind.PATIENT_DATA_READ], SOURCE_ID)
    # PS3.15 A.6: collectors support at least 32768 octets; TLS carries this one in several records
    large = dicom_audit_message(
        AuditRecord(AuditEventKind.PATIENT_DATA_READ, AT, "alice", patients=("PAT-1",), detail="x" * 40_000),
        SOURCE_ID,
    )
    try:
        sender.send(audit, AT)
        sender.send(large, AT)
    finally:
        sender.close()

    first, second = collector.wait_for(2)
    assert collector.accepted == 1
    assert (first.pri, first.version, first.timestamp) == ("<85>", "1", "2025-03-14T09:26:53.589793Z")
    assert first.hostname == socket.getfqdn()
    assert (first.app_name, first.procid, first.msgid) == ("dicom-node", str(os.getpid()), "IHE+RFC-3881")
    assert first.structured_data == "-"
    assert first.msg.startswith(b"\xef\xbb\xbf")
    assert first.msg[3:] == audit
    assert code(ET.fromstring(first.msg[3:]).find("EventIdentification/EventID"))[0] == "110103"
    assert second.msg[3:] == large


def test_a_collector_that_asks_for_the_node_certificate_gets_it(tmp_path: Path, certificates: Certificates) -> None:
    node = make_certificates(tmp_path, "node")
    context = client_context(certificates.ca_file, node.cert_file, node.key_file)

    with SyslogCollector(certificates, client_ca=node.ca_file) as collector:
        sender = SyslogTlsSender(LOOPBACK, collector.port, context, timeout=5)
        try:
            sender.send(b"<AuditMessage/>", AT)
        finally:
            sender.close()
        [message] = collector.wait_for(1)

    assert message.msg == b"\xef\xbb\xbf<AuditMessage/>"


def test_a_collector_with_a_certificate_from_another_ca_is_refused(tmp_path: Path, certificates: Certificates) -> None:
    with SyslogCollector(make_certificates(tmp_path, "impostor")) as impostor:
        sender = sender_for(impostor, certificates)

        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            sender.send(b"<AuditMessage/>", AT)
        sender.close()

    assert impostor.accepted == 0
    assert impostor.frames == []


def test_a_collector_certificate_for_another_host_is_refused(tmp_path: Path, certificates: Certificates) -> None:
    other_host = make_certificates(tmp_path, "elsewhere", addresses=(), dns_names=("collector.example",))
    trusting_its_ca = client_context(other_host.ca_file, None, None)

    with SyslogCollector(other_host) as collector:
        sender = SyslogTlsSender(LOOPBACK, collector.port, trusting_its_ca, timeout=5)

        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            sender.send(b"<AuditMessage/>", AT)
        sender.close()

    assert collector.frames == []


def test_no_collector_raises_oserror(certificates: Certificates) -> None:
    sender = SyslogTlsSender(LOOPBACK, free_port(), client_context(certificates.ca_file, None, None), timeout=5)

    with pytest.raises(OSError):
        sender.send(b"<AuditMessage/>", AT)


def test_a_collector_gone_raises_oserror_and_back_receives_the_next_message(
    collector: SyslogCollector, certificates: Certificates
) -> None:
    sender = sender_for(collector, certificates)
    try:
        sender.send(b"<AuditMessage>1</AuditMessage>", AT)
        collector.wait_for(1)
        collector.stop()

        with pytest.raises(OSError):
            sender.send(b"<AuditMessage>2</AuditMessage>", AT)

        collector.start()  # on the same port
        sender.send(b"<AuditMessage>3</AuditMessage>", AT)
        messages = collector.wait_for(2)
    finally:
        sender.close()

    assert [message.msg[3:] for message in messages] == [
        b"<AuditMessage>1</AuditMessage>",
        b"<AuditMessage>3</AuditMessage>",
    ]
    assert collector.accepted == 2


def test_a_collector_restarted_between_messages_gets_the_next_one_on_a_new_connection(
    collector: SyslogCollector, certificates: Certificates
) -> None:
    sender = sender_for(collector, certificates)
    try:
        sender.send(b"<AuditMessage>1</AuditMessage>", AT)
        collector.wait_for(1)
        collector.stop()
        collector.start()

        sender.send(b"<AuditMessage>2</AuditMessage>", AT)  # the kept connection is dead: sent on a new one
        messages = collector.wait_for(2)
    finally:
        sender.close()

    assert [message.msg[3:] for message in messages] == [
        b"<AuditMessage>1</AuditMessage>",
        b"<AuditMessage>2</AuditMessage>",
    ]
    assert collector.accepted == 2
