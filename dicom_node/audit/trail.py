"""The audit trail in the index: events appended as a hash chain, verified, and exported by patient.

Each row's ``digest`` is the SHA-256 of its content and of the previous row's digest; the rows' ids are 1, 2, 3...
So a row changed or removed in the database, around the triggers that refuse UPDATE and DELETE, breaks the chain
at that row, and :func:`verify` names it. Rows removed from the end leave a shorter valid chain: the copy at the
syslog collector (:mod:`dicom_node.audit.forwarding`) is the witness for those.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.record import AuditEventKind, AuditObject, AuditObjectKind, AuditOutcome, AuditRecord
from dicom_node.models import AuditEvent, as_utc

log = logging.getLogger(__name__)

GENESIS_DIGEST = "0" * 64
# Appends that lose a race for the next id (another process appended first) try again this often.
APPEND_ATTEMPTS = 20


class AuditTrail:
    """Appends events to the index. Thread-safe; processes that share the index take turns through the ids."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()

    def record(self, record: AuditRecord) -> None:
        """Append ``record``; raises where the index cannot take it (a read of patient data then fails too)."""
        with self._lock:
            for attempt in range(APPEND_ATTEMPTS):
                try:
                    with self._sessions.begin() as session:
                        session.add(_chained(session, record))
                    return
                except (IntegrityError, OperationalError):  # another process took the id, or held the write lock
                    if attempt == APPEND_ATTEMPTS - 1:
                        raise


def _chained(session: Session, record: AuditRecord) -> AuditEvent:
    last = session.execute(select(AuditEvent.id, AuditEvent.digest).order_by(AuditEvent.id.desc()).limit(1)).first()
    row = AuditEvent(
        id=last.id + 1 if last else 1,
        occurred_at=record.occurred_at,
        kind=record.kind.value,
        outcome=int(record.outcome),
        user=record.user[:128],
        role=record.role,
        address=record.address,
        patients=list(record.patients),
        objects=[[item.kind.value, item.id] for item in record.objects],
        detail=record.detail,
        local_ae=record.local_ae,
        remote_ae=record.remote_ae,
        previous_digest=last.digest if last else GENESIS_DIGEST,
    )
    row.digest = digest_of(row)
    return row


def _content(row: AuditEvent) -> dict[str, object]:
    return {
        "id": row.id,
        "occurred_at": as_utc(row.occurred_at).isoformat(timespec="microseconds"),
        "kind": row.kind,
        "outcome": row.outcome,
        "user": row.user,
        "role": row.role,
        "address": row.address,
        "patients": row.patients,
        "objects": row.objects,
        "detail": row.detail,
        "local_ae": row.local_ae,
        "remote_ae": row.remote_ae,
    }


def digest_of(row: AuditEvent) -> str:
    canonical = json.dumps(_content(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((row.previous_digest + canonical).encode()).hexdigest()


@dataclass(frozen=True)
class ChainBreak:
    event_id: int
    problem: str

    def __str__(self) -> str:
        return f"event {self.event_id}: {self.problem}"


def verify(session: Session, batch: int = 1000) -> tuple[int, list[ChainBreak]]:
    """The number of events read and every place where the chain does not hold."""
    breaks: list[ChainBreak] = []
    expected_id, previous = 1, GENESIS_DIGEST
    count = 0
    for row in _rows(session, batch):
        count += 1
        if row.id != expected_id:
            missing = f"{expected_id}" if row.id == expected_id + 1 else f"{expected_id} to {row.id - 1}"
            breaks.append(ChainBreak(row.id, f"the events before it are missing ({missing})"))
        if row.previous_digest != previous:
            breaks.append(ChainBreak(row.id, "it does not follow the event before it (removed or changed)"))
        if digest_of(row) != row.digest:
            breaks.append(ChainBreak(row.id, "its content does not match its digest (changed)"))
        expected_id, previous = row.id + 1, row.digest
    return count, breaks


def _rows(session: Session, batch: int) -> Iterator[AuditEvent]:
    after = 0
    while True:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.id > after).order_by(AuditEvent.id).limit(batch))
        page = list(rows)
        if not page:
            return
        yield from page
        after = page[-1].id
        session.expunge_all()


def events_of_patient(
    session: Session, patient_id: str, since: dt.datetime, until: dt.datetime | None = None
) -> list[AuditEvent]:
    """The events that touched ``patient_id``'s data from ``since`` on, oldest first."""
    query = select(AuditEvent).where(AuditEvent.occurred_at >= since).order_by(AuditEvent.id)
    if until is not None:
        query = query.where(AuditEvent.occurred_at < until)
    return [row for row in session.scalars(query) if patient_id in row.patients]


def as_record(row: AuditEvent) -> AuditRecord:
    """The event a row holds, as it was recorded."""
    return AuditRecord(
        kind=AuditEventKind(row.kind),
        occurred_at=as_utc(row.occurred_at),
        user=row.user,
        address=row.address,
        outcome=AuditOutcome(row.outcome),
        role=row.role,
        patients=tuple(row.patients),
        objects=tuple(AuditObject(AuditObjectKind(kind), id) for kind, id in row.objects),
        detail=row.detail,
        local_ae=row.local_ae,
        remote_ae=row.remote_ae,
    )


def exported(row: AuditEvent) -> dict[str, object]:
    """A row as one line of ``dicom-node audit export`` (JSON)."""
    return _content(row) | {"digest": row.digest}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
