"""One audit event, as the node records it and as it is sent to a collector.

The events follow the DICOM audit message vocabulary (PS3.15 Annex A.5.3): each :class:`AuditEventKind` names
the message it becomes (:mod:`dicom_node.audit.dicom_message`).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field


class AuditEventKind(enum.StrEnum):
    """What happened."""

    PATIENT_DATA_READ = "patient-data-read"  # a page, an API read, an image or heatmap of patients' data
    PATIENT_DATA_CREATED = "patient-data-created"  # an upload (POST /predict) stored a new image
    ASSOCIATION_RECEIVED = "association-received"  # a DICOM association that sent us instances
    ASSOCIATION_SENT = "association-sent"  # a DICOM association on which the node sent instances
    SIGN_IN = "sign-in"
    SIGN_IN_FAILED = "sign-in-failed"
    SIGN_OUT = "sign-out"
    USER_CHANGED = "user-changed"  # a user or a personal token added, removed, its role or password changed
    AUDIT_LOG_READ = "audit-log-read"  # the trail itself read: GET /api/audit, dicom-node audit export


class AuditOutcome(enum.IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1, RFC 3881)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class AuditObjectKind(enum.StrEnum):
    STUDY = "study"  # id: the StudyInstanceUID
    INSTANCE = "instance"  # id: the SOPInstanceUID
    USER = "user"  # id: the user name (a user or token changed)


@dataclass(frozen=True)
class AuditObject:
    kind: AuditObjectKind
    id: str


@dataclass(frozen=True)
class AuditRecord:
    """An event. ``user`` is who acted: a user name, or for an association the peer's AE title."""

    kind: AuditEventKind
    occurred_at: dt.datetime  # aware, UTC
    user: str
    address: str | None = None  # the network address the user or peer acted from
    outcome: AuditOutcome = AuditOutcome.SUCCESS
    role: str | None = None  # the user's role: viewer, operator, admin; None for a DICOM peer
    patients: tuple[str, ...] = ()  # the PatientIDs whose data the event touched
    objects: tuple[AuditObject, ...] = field(default=())
    # what was done, in words: "GET /api/patients/{patient_id}", "C-STORE 3 instances", "role viewer -> admin"
    detail: str = ""
    # associations: the AE titles of the node and of the peer
    local_ae: str | None = None
    remote_ae: str | None = None
