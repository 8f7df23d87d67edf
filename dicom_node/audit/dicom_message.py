"""DICOM audit messages (PS3.15 Annex A.5) made from the node's :class:`~dicom_node.audit.record.AuditRecord`.

Each :class:`~dicom_node.audit.record.AuditEventKind` becomes one of the DICOM Specific Audit Messages of A.5.3:

=====================  ===================================================  ======  =========================
record kind            EventID (EventTypeCode)                              action  PS3.15
=====================  ===================================================  ======  =========================
patient-data-read      (110103, DCM, "DICOM Instances Accessed"), or        R       A.5.3.6, A.5.3.14
                       (110110, DCM, "Patient Record") without studies
                       or instances
patient-data-created   (110103, DCM, "DICOM Instances Accessed")            C       A.5.3.6
association-received   (110104, DCM, "DICOM Instances Transferred")         C       A.5.3.7
association-sent       (110104, DCM, "DICOM Instances Transferred")         R       A.5.3.7
sign-in, -failed       (110114, DCM, "User Authentication") (110122 Login)  E       A.5.3.12
sign-out               (110114, DCM, "User Authentication") (110123 Logout) E       A.5.3.12
user-changed           (110113, DCM, "Security Alert") (110137, DCM,        E       A.5.3.11
                       "User Security Attributes Changed")
=====================  ===================================================  ======  =========================

The record's ``detail`` is the EventOutcomeDescription (free text in the A.5.1 schema), and for a Security Alert
also the "Alert Description" ParticipantObjectDetail that A.5.3.11 requires of each alert subject.

A.5.3.6, A.5.3.7 and A.5.3.14 describe one patient per message; a record that names several patients gives one
message naming them all, since the record does not say which study is whose.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import xml.etree.ElementTree as ET
from typing import NamedTuple

from dicom_node.audit.record import AuditEventKind, AuditObjectKind, AuditOutcome, AuditRecord

# The node's own coding scheme (a private Coding Scheme Designator begins with "99", PS3.16 Section 8): the users'
# roles in its role-based access control, and the identifier type of a SOP Instance UID, for which DCM has no code.
NODE_SCHEME = "99DICOMNODE"

# AuditSourceTypeCode (A.5.1.2.1): an application server process.
APPLICATION_SERVER = "4"

# NetworkAccessPointTypeCode (A.5.1)
MACHINE_NAME = "1"
IP_ADDRESS = "2"

# ParticipantObjectTypeCode (A.5.1)
PERSON = "1"
SYSTEM_OBJECT = "2"

# ParticipantObjectTypeCodeRole (A.5.1.2.2)
ROLE_PATIENT = "1"
ROLE_REPORT = "3"
ROLE_SECURITY_USER_ENTITY = "11"
ROLE_SECURITY_RESOURCE = "13"

# Characters that XML 1.0 (Section 2.2) does not allow: a user name tried at sign-in is anyone's input.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class Code(NamedTuple):
    """A coded value (the schema's CodedValueType, A.5.1): ``csd-code``, ``codeSystemName``, ``originalText``."""

    value: str
    scheme: str
    meaning: str


# EventID (PS3.16 CID 400)
AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
# EventTypeCode (PS3.16 CID 401 Audit Event Type Code, CID 403 Security Alert Type Code)
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", "DCM", "User Security Attributes Changed")
# RoleIDCode (PS3.16 CID 402 Audit Active Participant Role ID Code)
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
# ParticipantObjectIDTypeCode (A.5.1.2.4, PS3.16 CID 404)
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
USER_IDENTIFIER = Code("11", "RFC-3881", "User Identifier")
URI = Code("12", "RFC-3881", "URI")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
SOP_INSTANCE_UID = Code("SOPInstanceUID", NODE_SCHEME, "SOP Instance UID")


def dicom_audit_message(record: AuditRecord, source_id: str) -> bytes:
    """The DICOM audit message (PS3.15 A.5) that reports ``record``: UTF-8 XML with its declaration.

    ``source_id`` is the AuditSourceID (A.5.2), the name of this node in the audit repository; it is also the UserID
    of the node as the process taking part in a user's event.

    ValueError where ``record.occurred_at`` has no time zone: A.5.2.5 requires one in EventDateTime.
    """
    if record.occurred_at.utcoffset() is None:
        raise ValueError(f"the audit record's time has no time zone: {record.occurred_at.isoformat()}")
    match record.kind:
        case AuditEventKind.PATIENT_DATA_READ | AuditEventKind.PATIENT_DATA_CREATED:
            message = _patient_data(record, source_id)
        case AuditEventKind.ASSOCIATION_RECEIVED | AuditEventKind.ASSOCIATION_SENT:
            message = _instances_transferred(record, source_id)
        case AuditEventKind.SIGN_IN | AuditEventKind.SIGN_IN_FAILED | AuditEventKind.SIGN_OUT:
            message = _user_authentication(record, source_id)
        case AuditEventKind.USER_CHANGED:
            message = _security_alert(record, source_id)
        case AuditEventKind.AUDIT_LOG_READ:
            message = _audit_log_used(record, source_id)
    return ET.tostring(message, encoding="utf-8", xml_declaration=True)


def _patient_data(record: AuditRecord, source_id: str) -> ET.Element:
    """DICOM Instances Accessed (A.5.3.6), or Patient Record (A.5.3.14) where no study or instance was touched."""
    if record.kind is AuditEventKind.PATIENT_DATA_CREATED:
        message = _event(record, INSTANCES_ACCESSED, "C")
    elif any(item.kind in (AuditObjectKind.STUDY, AuditObjectKind.INSTANCE) for item in record.objects):
        message = _event(record, INSTANCES_ACCESSED, "R")
    else:
        message = _event(record, PATIENT_RECORD, "R")
    _user(message, record)
    _node_process(message, source_id)
    _audit_source(message, source_id)
    _patients_and_studies(message, record)
    return message


def _instances_transferred(record: AuditRecord, source_id: str) -> ET.Element:
    """DICOM Instances Transferred (A.5.3.7): the process that sent the instances and the process that received them.

    The node records the instances it received as created ("C"), for it keeps each instance once, and those it sent
    as read ("R"), which A.5.3.7 asks of a source that does not know what the receiver held.
    """
    peer_ae = record.remote_ae or record.user
    local_ae = record.local_ae or source_id
    if record.kind is AuditEventKind.ASSOCIATION_RECEIVED:
        message = _event(record, INSTANCES_TRANSFERRED, "C")
        _application(message, peer_ae, SOURCE_ROLE, requestor=True, address=record.address)
        _application(message, local_ae, DESTINATION_ROLE, requestor=False)
    else:
        message = _event(record, INSTANCES_TRANSFERRED, "R")
        _application(message, local_ae, SOURCE_ROLE, requestor=True)
        _application(message, peer_ae, DESTINATION_ROLE, requestor=False, address=record.address)
    _audit_source(message, source_id)
    _patients_and_studies(message, record)
    return message


def _user_authentication(record: AuditRecord, source_id: str) -> ET.Element:
    """User Authentication (A.5.3.12): the user who signed in or out, and the node that authenticated them.

    A failed sign-in recorded as a success is reported as a minor failure (A.5.2: "invalid password with first
    retry"), so that a collector never counts it as a sign-in.
    """
    outcome = record.outcome
    if record.kind is AuditEventKind.SIGN_IN_FAILED and outcome is AuditOutcome.SUCCESS:
        outcome = AuditOutcome.MINOR_FAILURE
    event_type = LOGOUT if record.kind is AuditEventKind.SIGN_OUT else LOGIN
    message = _event(record, USER_AUTHENTICATION, "E", event_type=event_type, outcome=outcome)
    _user(message, record)
    _node_process(message, source_id)
    _audit_source(message, source_id)
    return message


def _security_alert(record: AuditRecord, source_id: str) -> ET.Element:
    """Security Alert (A.5.3.11): the user who changed users or tokens, the node, and each user changed as a subject.

    A.5.3.11 requires each alert subject to be a system object (2) with an "Alert Description"; a user account is
    the Security User Entity (11) of A.5.1.2.2, identified by its User Identifier (A.5.1.2.4).
    """
    message = _event(record, SECURITY_ALERT, "E", event_type=USER_SECURITY_ATTRIBUTES_CHANGED)
    _user(message, record)
    _node_process(message, source_id)
    _audit_source(message, source_id)
    description = record.detail or USER_SECURITY_ATTRIBUTES_CHANGED.meaning
    for changed in record.objects:
        if changed.kind is AuditObjectKind.USER:
            subject = _participant_object(
                message, changed.id, SYSTEM_OBJECT, ROLE_SECURITY_USER_ENTITY, USER_IDENTIFIER
            )
            _value_pair(subject, "Alert Description", description)
    return message


def _audit_log_used(record: AuditRecord, source_id: str) -> ET.Element:
    """Audit Log Used (A.5.3.2): who read the trail, and the trail as a Security Resource identified by its URI;
    the patients whose events were read follow as patient objects."""
    message = _event(record, AUDIT_LOG_USED, "R")
    _user(message, record)
    _node_process(message, source_id)
    _audit_source(message, source_id)
    _participant_object(message, f"urn:dicom-node:{source_id}:audit-trail", SYSTEM_OBJECT, ROLE_SECURITY_RESOURCE, URI)
    _patients_and_studies(message, record)
    return message


def _event(
    record: AuditRecord,
    event_id: Code,
    action: str,
    *,
    event_type: Code | None = None,
    outcome: AuditOutcome | None = None,
) -> ET.Element:
    """An AuditMessage holding its EventIdentification (A.5.1, A.5.2)."""
    message = ET.Element("AuditMessage")
    event = ET.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": record.occurred_at.isoformat(),
            "EventOutcomeIndicator": str(int(record.outcome if outcome is None else outcome)),
        },
    )
    _code(event, "EventID", event_id)
    if event_type is not None:
        _code(event, "EventTypeCode", event_type)
    if record.detail:
        ET.SubElement(event, "EventOutcomeDescription").text = _xml_text(record.detail)
    return message


def _user(message: ET.Element, record: AuditRecord) -> None:
    """The user who acted, the requestor (A.5.2), with their role in the node's access control as RoleIDCode."""
    user = _participant(message, record.user, requestor=True, address=record.address)
    if record.role:
        _code(user, "RoleIDCode", Code(record.role, NODE_SCHEME, record.role))


def _node_process(message: ET.Element, source_id: str) -> None:
    """The node as the process that took part in a user's event, not the requestor."""
    _participant(message, source_id, requestor=False)


def _application(
    message: ET.Element, ae_title: str, role: Code, *, requestor: bool, address: str | None = None
) -> None:
    """A DICOM application in a transfer: its AE title is its UserID, and its AlternativeUserID as A.5.2.2 writes it."""
    participant = _participant(
        message, ae_title, requestor=requestor, address=address, alternative_user_id=f"AETITLES={ae_title}"
    )
    _code(participant, "RoleIDCode", role)


def _participant(
    message: ET.Element,
    user_id: str,
    *,
    requestor: bool,
    address: str | None = None,
    alternative_user_id: str | None = None,
) -> ET.Element:
    """An ActiveParticipant (A.5.2); NetworkAccessPointTypeCode tells an IP address from a machine name."""
    attributes = {"UserID": _xml_text(user_id)}
    if alternative_user_id is not None:
        attributes["AlternativeUserID"] = _xml_text(alternative_user_id)
    attributes["UserIsRequestor"] = "true" if requestor else "false"
    if address:
        attributes["NetworkAccessPointID"] = _xml_text(address)
        attributes["NetworkAccessPointTypeCode"] = IP_ADDRESS if _is_ip_address(address) else MACHINE_NAME
    return ET.SubElement(message, "ActiveParticipant", attributes)


def _audit_source(message: ET.Element, source_id: str) -> None:
    source = ET.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": _xml_text(source_id)})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": APPLICATION_SERVER})


def _patients_and_studies(message: ET.Element, record: AuditRecord) -> None:
    """The patients and the studies of A.5.3.6, A.5.3.7 and A.5.3.14.

    A study lists the record's instances in its ParticipantObjectDescription (A.5.2, SOPClass) where the record
    names that one study; instances that cannot be placed in a study are participant objects of their own, with the
    node's identifier type for a SOP Instance UID (an extension, A.5.1.2.4 allows implementation-defined codes).
    """
    for patient_id in record.patients:
        _participant_object(message, patient_id, PERSON, ROLE_PATIENT, PATIENT_NUMBER)
    studies = [item.id for item in record.objects if item.kind is AuditObjectKind.STUDY]
    instances = [item.id for item in record.objects if item.kind is AuditObjectKind.INSTANCE]
    for study_uid in studies:
        study = _participant_object(message, study_uid, SYSTEM_OBJECT, ROLE_REPORT, STUDY_INSTANCE_UID)
        if instances and len(studies) == 1:
            description = ET.SubElement(study, "ParticipantObjectDescription")
            sop_class = ET.SubElement(description, "SOPClass", {"NumberOfInstances": str(len(instances))})
            for instance_uid in instances:
                ET.SubElement(sop_class, "Instance", {"UID": _xml_text(instance_uid)})
    if len(studies) != 1:
        for instance_uid in instances:
            _participant_object(message, instance_uid, SYSTEM_OBJECT, ROLE_REPORT, SOP_INSTANCE_UID)


def _participant_object(message: ET.Element, object_id: str, type_code: str, role: str, id_type: Code) -> ET.Element:
    """A ParticipantObjectIdentification (A.5.2).

    The A.5.1 schema requires a ParticipantObjectName or a ParticipantObjectQuery in every participant object
    (though the table of A.5.2 makes both optional); the node records identifiers only, so the identifier is also
    the name.
    """
    participant_object = ET.SubElement(
        message,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": _xml_text(object_id),
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    _code(participant_object, "ParticipantObjectIDTypeCode", id_type)
    ET.SubElement(participant_object, "ParticipantObjectName").text = _xml_text(object_id)
    return participant_object


def _value_pair(participant_object: ET.Element, kind: str, value: str) -> None:
    """A ParticipantObjectDetail: a type and a base64-encoded value (A.5.1 ValuePair)."""
    encoded = base64.b64encode(_xml_text(value).encode("utf-8")).decode("ascii")
    ET.SubElement(participant_object, "ParticipantObjectDetail", {"type": kind, "value": encoded})


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {"csd-code": _xml_text(code.value), "codeSystemName": code.scheme, "originalText": _xml_text(code.meaning)},
    )


def _is_ip_address(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _xml_text(value: str) -> str:
    """``value`` with each character that XML 1.0 cannot carry (controls, lone surrogates) replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", value)
