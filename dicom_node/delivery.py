"""Delivery: the outbox of objects the node wrote, sent to the configured destinations by C-STORE.

Each ``deliveries`` row is one object to one destination. The sender, threads of its own so that it never
holds up ingest or inference, claims the due rows of one destination (up to ``objects_per_association``),
sends them in one association, and records each outcome. ``delivery.associations`` threads send side by side,
each its own batch: a destination stores each object before it answers (a PACS writes it to disk), and a second
association keeps the link busy meanwhile. Each records every outcome:

- success or warning (PS3.4 B.2.3): sent;
- a transient failure (the association cannot be made or breaks, no response, Refused: Out of Resources
  0xA7xx): retried with exponential backoff, up to ``delivery.max_attempts``;
- any other failure status (e.g. 0xA9xx, 0xCxxx, SOP class not supported 0x0122), or no accepted presentation
  context for the object's SOP class: failed at once, for sending the same object again cannot change the
  answer. An association the destination rejects counts as transient: it may be reconfigured meanwhile.

``dicom-node resend`` puts failed rows back in the queue. A row is marked ``sending`` while it is in flight; a
node stopped then finds it there at the next start and sends it again (the destination may have it twice, as
with any C-STORE retry after a lost response).

On PostgreSQL no sender thread polls: sending to a destination is a ``deliver`` job of the task engine, deferred
with the rows that need it (:func:`schedule_sending`), at most one waiting and one running per destination
(Procrastinate's queueing lock and lock), so a destination gets one association at a time from the whole
cluster. The job sends everything due (:meth:`DeliverySender.send_to`), first putting back the rows a job that
died left ``sending``, and defers the next one for when the earliest backoff ends.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import ssl
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import task_engine
from dicom_node.audit.associations import Transfer
from dicom_node.audit.record import AuditEventKind, AuditOutcome
from dicom_node.audit.trail import AuditTrail
from dicom_node.background import PollingThread
from dicom_node.config import Destination, OutputKind, Settings
from dicom_node.models import Delivery, DeliveryState, Instance, Patient, Series, Study
from dicom_node.storage import InstanceStore

log = logging.getLogger(__name__)

DELIVER_TASK = "deliver"
_MAX_ERROR_LENGTH = 2000
# PS3.4 Table B.2-1 and PS3.7 C.4.2: the failure statuses a later attempt may not get
_TRANSIENT_STATUSES = range(0xA700, 0xA800)  # Refused: Out of Resources
_WARNING_STATUSES = (0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007)


def destinations_for(settings: Settings, calling_ae: str | None, kind: OutputKind) -> list[str]:
    """The names of the destinations that get an output of ``kind`` made from an instance ``calling_ae`` sent:
    the first rule that matches the caller and the kind decides; without one, the output goes back to the
    caller when it is a known destination, else to the default destination (if any)."""
    for rule in settings.delivery.rules:
        if kind in rule.kinds and re.search(rule.calling_ae, calling_ae or "", re.IGNORECASE):
            return list(rule.destinations)
    for destination in settings.destinations:
        if calling_ae is not None and destination.ae_title == calling_ae:
            return [destination.name]
    default = settings.delivery.default_destination
    return [default] if default else []


def status_is_success(status: int) -> bool:
    return status == 0x0000 or status in _WARNING_STATUSES


def status_is_transient(status: int) -> bool:
    return status in _TRANSIENT_STATUSES


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    path: str  # relative to the storage root
    sop_class_uid: str
    sop_instance_uid: str
    patient_id: str  # the audit trail names whose data went out
    study_instance_uid: str


class DeliveryQueue:
    """The outbox rows: claim the due ones of one destination, and record what became of them."""

    def __init__(self, sessions: sessionmaker[Session], max_attempts: int, retry_backoff: float, max_backoff: float):
        self.sessions = sessions
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff

    def claim(self, destinations: Collection[str], limit: int) -> tuple[str, list[ClaimedDelivery]] | None:
        """Take up to ``limit`` due rows of the destination of the oldest due row, oldest first."""
        if not destinations:
            return None
        with self.sessions.begin() as session:
            due = (Delivery.state == DeliveryState.PENDING, Delivery.available_at <= _now())
            destination = session.scalar(
                select(Delivery.destination)
                .where(*due, Delivery.destination.in_(destinations))
                .order_by(Delivery.id)
                .limit(1)
            )
            if destination is None:
                return None
            rows = session.execute(
                select(
                    Delivery.id,
                    Instance.path,
                    Instance.sop_class_uid,
                    Instance.sop_instance_uid,
                    Patient.patient_id,
                    Study.study_instance_uid,
                )
                .join(Instance, Delivery.instance_pk == Instance.id)
                .join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .join(Patient, Study.patient_pk == Patient.id)
                .where(*due, Delivery.destination == destination)
                .order_by(Delivery.id)
                .limit(limit)
            ).all()
            claimed = []
            for row in rows:
                taken = session.execute(
                    update(Delivery)
                    .where(Delivery.id == row.id, Delivery.state == DeliveryState.PENDING)
                    .values(state=DeliveryState.SENDING, attempts=Delivery.attempts + 1, updated_at=_now())
                    .execution_options(synchronize_session=False)
                ).rowcount
                if taken:  # another sender may have taken it since the select
                    claimed.append(ClaimedDelivery(*row))
            return destination, claimed

    def sent(self, delivery_id: int, status: int) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(state=DeliveryState.SENT, last_status=status, last_error=None, sent_at=_now())
            )

    def failed(self, delivery_id: int, error: str, status: int | None = None, permanent: bool = False) -> DeliveryState:
        """Record a failed attempt: retry later with bounded exponential backoff, or mark the row failed after
        its last attempt (at once when ``permanent``)."""
        with self.sessions.begin() as session:
            row = session.get_one(Delivery, delivery_id)
            row.last_error, row.last_status = error[:_MAX_ERROR_LENGTH], status
            if permanent or row.attempts >= self.max_attempts:
                row.state = DeliveryState.FAILED
            else:
                row.state = DeliveryState.PENDING
                delay = min(self.retry_backoff * 2 ** (row.attempts - 1), self.max_backoff)
                row.available_at = _now() + dt.timedelta(seconds=delay)
            return row.state

    def resend(self, ids: Collection[int] = (), destination: str | None = None) -> int:
        """Queue failed deliveries again, with fresh attempts: those of ``ids``, or of ``destination``, or all."""
        conditions = [Delivery.state == DeliveryState.FAILED]
        if ids:
            conditions.append(Delivery.id.in_(ids))
        if destination is not None:
            conditions.append(Delivery.destination == destination)
        with self.sessions.begin() as session:
            destinations = session.scalars(select(Delivery.destination).where(*conditions).distinct()).all()
            queued = session.execute(
                update(Delivery)
                .where(*conditions)
                .values(state=DeliveryState.PENDING, attempts=0, available_at=_now())
                .execution_options(synchronize_session=False)
            ).rowcount
            schedule_sending(session, destinations)
            return queued

    def recover_interrupted(self, destination: str | None = None) -> int:
        """Rows left in flight by a stopped sender go back to pending: at start-up, or those of ``destination``
        when the one job that sends to it starts."""
        conditions = [Delivery.state == DeliveryState.SENDING]
        if destination is not None:
            conditions.append(Delivery.destination == destination)
        with self.sessions.begin() as session:
            return session.execute(update(Delivery).where(*conditions).values(state=DeliveryState.PENDING)).rowcount

    def schedule_waiting(self, configured: Collection[str]) -> None:
        """On PostgreSQL: a ``deliver`` job for each of the ``configured`` destinations with rows waiting, for when
        the first is due (a catch-up: the jobs that would send them may have failed with the index away)."""
        with self.sessions.begin() as session:
            waiting = session.execute(
                select(Delivery.destination, func.min(Delivery.available_at))
                .where(Delivery.state == DeliveryState.PENDING, Delivery.destination.in_(configured))
                .group_by(Delivery.destination)
            ).all()
            for destination, due in waiting:
                schedule_sending(session, [destination], at=due)

    def next_due(self, destination: str) -> dt.datetime | None:
        """When the earliest row of ``destination`` that waits out a backoff is due; None when none waits."""
        with self.sessions() as session:
            return session.scalar(
                select(func.min(Delivery.available_at)).where(
                    Delivery.state == DeliveryState.PENDING, Delivery.destination == destination
                )
            )


def schedule_sending(session: Session, destinations: Collection[str], at: dt.datetime | None = None) -> None:
    """On PostgreSQL, in ``session``'s transaction: a ``deliver`` job for each destination, unless one waits already;
    on SQLite the sender thread finds the rows itself."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for destination in destinations:
        task_engine.defer_unique(
            session,
            DELIVER_TASK,
            task_engine.DELIVER_QUEUE,
            queueing_lock=f"deliver:{destination}",
            lock=f"deliver:{destination}",
            schedule_at=at,
            destination=destination,
        )


def count_by_state(session: Session) -> dict[DeliveryState, int]:
    rows = session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
    return {DeliveryState(state): count for state, count in rows}


class DeliverySender(PollingThread):
    """Threads (``delivery.associations``) that send due deliveries, one association per batch: while one waits
    for a destination to store an object, another sends the next batch."""

    def __init__(self, settings: Settings, queue: DeliveryQueue, store: InstanceStore, trail: AuditTrail) -> None:
        super().__init__("delivery", settings.delivery.poll_interval, settings.delivery.associations)
        self.settings = settings
        self.queue = queue
        self.store = store
        self.trail = trail
        self.destinations = {destination.name: destination for destination in settings.destinations}

    def start(self) -> None:
        if self.destinations:
            super().start()

    def run_once(self) -> bool:
        """Send one batch to one destination; False when nothing was due."""
        claimed = self.queue.claim(self.destinations, self.settings.delivery.objects_per_association)
        if claimed is None:
            return False
        name, deliveries = claimed
        if deliveries:
            self._send(self.destinations[name], deliveries)
        return True

    def run_pass(self) -> bool:
        return self.run_once()

    def schedule_waiting(self) -> None:
        """The ``deliver`` jobs' catch-up on PostgreSQL (see :meth:`DeliveryQueue.schedule_waiting`)."""
        self.queue.schedule_waiting(self.destinations)

    def send_to(self, destination: str) -> None:
        """The ``deliver`` job on PostgreSQL: send everything due to ``destination``, then schedule the next job
        for the rows that wait out a backoff. The engine runs one such job at a time per destination, so rows
        found ``sending`` were left by a job that died."""
        if destination not in self.destinations:
            log.warning("deliveries to %r wait: it is not a configured destination", destination)
            return
        if self.queue.recover_interrupted(destination):
            log.info("deliveries to %s interrupted by a stopped worker are sent again", destination)
        while True:
            claimed = self.queue.claim([destination], self.settings.delivery.objects_per_association)
            if claimed is None or not claimed[1]:
                break
            self._send(self.destinations[destination], claimed[1])
        next_due = self.queue.next_due(destination)
        if next_due is not None:
            with self.queue.sessions.begin() as session:
                schedule_sending(session, [destination], at=next_due)

    def _send(self, destination: Destination, deliveries: list[ClaimedDelivery]) -> None:
        ae = AE(ae_title=self.settings.dicom.ae_title)
        timeout = self.settings.delivery.timeout
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        for sop_class_uid in sorted({delivery.sop_class_uid for delivery in deliveries}):
            ae.add_requested_context(sop_class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        try:
            association = ae.associate(
                destination.host,
                destination.port,
                ae_title=destination.ae_title,
                tls_args=_tls_arguments(destination),
                max_pdu=0,
            )
        except (OSError, ssl.SSLError) as error:
            self._all_failed(destination, deliveries, f"cannot connect: {type(error).__name__}: {error}")
            return  # no association: nothing went across (each delivery's error says why)
        transfer = Transfer(destination.ae_title, destination.host)
        try:
            if association.rejected_contexts and not association.accepted_contexts:
                self._all_failed(destination, deliveries, f"not accepted by {destination.name}: no SOP class", True)
                transfer.ending, transfer.outcome = "no SOP class accepted", AuditOutcome.SERIOUS_FAILURE
                return
            if not association.is_established:
                reason = "association rejected" if association.is_rejected else "association failed or aborted"
                self._all_failed(destination, deliveries, f"{reason} by {destination.name}")
                transfer.ending, transfer.outcome = reason, AuditOutcome.SERIOUS_FAILURE
                return
            for number, delivery in enumerate(deliveries):
                if not association.is_established:
                    self._all_failed(destination, deliveries[number:], "association ended before the object was sent")
                    transfer.ending, transfer.outcome = "aborted", AuditOutcome.SERIOUS_FAILURE
                    return
                # the patient's data went across even where the destination refused to store it
                transfer.add(delivery.patient_id, delivery.study_instance_uid)
                if not self._send_one(association, destination, delivery):
                    transfer.refused += 1
                    transfer.outcome = max(transfer.outcome, AuditOutcome.MINOR_FAILURE)
        finally:
            if association.is_established:
                association.release()
                transfer.ending = "released" if transfer.ending == "closed" else transfer.ending
            self.trail.record(transfer.record(AuditEventKind.ASSOCIATION_SENT, self.settings.dicom.ae_title))

    def _send_one(self, association, destination: Destination, delivery: ClaimedDelivery) -> bool:
        """Send one object; True where the destination stored it."""
        try:
            response = association.send_c_store(Path(self.store.absolute(delivery.path)))
        except ValueError as error:  # the destination accepted no presentation context for this SOP class
            state = self.queue.failed(delivery.id, f"not accepted by {destination.name}: {error}", permanent=True)
            log.warning("delivery %d: %s does not take its SOP class, now %s", delivery.id, destination.name, state)
            return False
        except OSError as error:  # the file cannot be read now
            state = self.queue.failed(delivery.id, f"{type(error).__name__}: {error}")
            log.warning("delivery %d to %s: cannot read the file, now %s", delivery.id, destination.name, state)
            return False
        status = int(response.Status) if "Status" in response else None
        if status is None:
            state = self.queue.failed(delivery.id, "no response (timeout or abort)")
        elif status_is_success(status):
            self.queue.sent(delivery.id, status)
            log.info("delivery %d sent to %s (0x%04X)", delivery.id, destination.name, status)
            return True
        else:
            permanent = not status_is_transient(status)
            error = f"{destination.name} answered 0x{status:04X}"
            comment = response.get("ErrorComment")
            state = self.queue.failed(delivery.id, f"{error}: {comment}" if comment else error, status, permanent)
        log.warning("delivery %d to %s failed, now %s", delivery.id, destination.name, state)
        return False

    def _all_failed(
        self, destination: Destination, deliveries: list[ClaimedDelivery], error: str, permanent: bool = False
    ) -> None:
        for delivery in deliveries:
            self.queue.failed(delivery.id, error, permanent=permanent)
        log.warning("%d deliveries to %s: %s", len(deliveries), destination.name, error)


def _tls_arguments(destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    """The client TLS context for ``destination`` (PS3.15 B.1: the peer's certificate verified)."""
    if destination.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls.ca_file))
    if destination.tls.cert_file is not None:
        context.load_cert_chain(
            str(destination.tls.cert_file), destination.tls.key_file and str(destination.tls.key_file)
        )
    return context, destination.host


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
