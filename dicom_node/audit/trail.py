"""The audit trail in the index: events appended as a keyed hash chain, verified, and exported by patient.

Each row's ``digest`` is an HMAC-SHA256 of its content and of the previous row's digest, keyed by
``<storage root>/audit.key``; the rows' ids are 1, 2, 3... So a row changed or removed in the database, around the
triggers that refuse UPDATE and DELETE, breaks the chain at that row and :func:`verify` names it, unless whoever
changed it also holds the key file (kept outside the database, readable by the node's user only). Rows removed
from the end leave a shorter valid chain: the copy at the syslog collector (:mod:`dicom_node.audit.forwarding`)
is the witness for those.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_node.audit.record import AuditEventKind, AuditObject, AuditObjectKind, AuditOutcome, AuditRecord
from dicom_node.config import DatabaseSettings
from dicom_node.database import create_index_engine, session_factory
from dicom_node.models import AuditEvent, as_utc
from dicom_node.secret_file import kept_secret

GENESIS_DIGEST = "0" * 64
KEY_FILE = "audit.key"  # under the storage root
# Appends that lose the race for the next id to another process (its row committed first) try again this often.
APPEND_ATTEMPTS = 20


class AuditTrail:
    """The trail of one index. Appends are serialised within the process (one connection of the trail's own, so
    that a request holding a connection of the node's pool never waits for another to record its read);
    processes that share the index take turns through the ids."""

    def __init__(self, database: DatabaseSettings, storage_root: Path) -> None:
        self._key = kept_secret(Path(storage_root) / KEY_FILE)
        self._engine = create_index_engine(database.url, database.busy_timeout)
        self.sessions = session_factory(self._engine)
        self._lock = threading.Lock()

    def record(self, record: AuditRecord) -> None:
        """Append ``record``; raises where the index cannot take it (a read of patient data then fails too)."""
        with self._lock:
            for attempt in range(APPEND_ATTEMPTS):
                try:
                    with self.sessions.begin() as session:
                        session.add(self._chained(session, record))
                    return
                except IntegrityError:  # another process appended the same id first
                    if attempt == APPEND_ATTEMPTS - 1:
                        raise

    def verify(self, batch: int = 1000) -> tuple[int, list[ChainBreak]]:
        """The number of events read and every place where the chain does not hold."""
        breaks: list[ChainBreak] = []
        expected_id, previous = 1, GENESIS_DIGEST
        count = 0
        with self.sessions() as session:
            for row in _rows(session, batch):
                count += 1
                if row.id != expected_id:
                    missing = f"{expected_id}" if row.id == expected_id + 1 else f"{expected_id} to {row.id - 1}"
                    breaks.append(ChainBreak(row.id, f"the events before it are missing ({missing})"))
                if row.previous_digest != previous:
                    breaks.append(ChainBreak(row.id, "it does not follow the event before it (removed or changed)"))
                if not hmac.compare_digest(self._digest(row), row.digest):
                    breaks.append(ChainBreak(row.id, "its content does not match its digest (changed)"))
                expected_id, previous = row.id + 1, row.digest
        return count, breaks

    def close(self) -> None:
        self._engine.dispose()

    def _chained(self, session: Session, record: AuditRecord) -> AuditEvent:
        row = _row(session, record)
        row.digest = self._digest(row)
        return row

    def _digest(self, row: AuditEvent) -> str:
        canonical = json.dumps(_content(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hmac.new(self._key, (row.previous_digest + canonical).encode(), hashlib.sha256).hexdigest()


def _row(session: Session, record: AuditRecord) -> AuditEvent:
    last = session.execute(select(AuditEvent.id, AuditEvent.digest).order_by(AuditEvent.id.desc()).limit(1)).first()
    return AuditEvent(
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


@dataclass(frozen=True)
class ChainBreak:
    event_id: int
    problem: str

    def __str__(self) -> str:
        return f"event {self.event_id}: {self.problem}"


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


def utc_time(text: str) -> dt.datetime:
    """A date or ISO 8601 time (UTC unless it names its zone) as an aware UTC time, to compare with the index's
    times (SQLite compares them without their zones). ValueError where ``text`` is neither."""
    return as_utc(dt.datetime.fromisoformat(text))


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
