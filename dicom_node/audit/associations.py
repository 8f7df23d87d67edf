"""One audit event per DICOM association: received by the listener, or opened by the node to send results.

The event names the peer's AE title and address, the node's AE title, the patients and studies of the instances
that went across, and how it ended (PS3.15 A.5.3.4, DICOM Instances Transferred).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pynetdicom import evt
from pynetdicom.events import Event

from dicom_node.audit.record import AuditEventKind, AuditObject, AuditObjectKind, AuditOutcome, AuditRecord
from dicom_node.audit.trail import AuditTrail, now


@dataclass
class Transfer:
    """What went across one association, and how it ended."""

    peer_ae: str
    address: str | None
    studies_of_patients: dict[str, set[str]] = field(default_factory=dict)
    transferred: int = 0  # received: stored by the node; sent: sent, stored by the destination or refused
    refused: int = 0
    ending: str = "closed"
    outcome: AuditOutcome = AuditOutcome.SUCCESS

    def add(self, patient_id: str, study_instance_uid: str) -> None:
        self.studies_of_patients.setdefault(patient_id, set()).add(study_instance_uid)
        self.transferred += 1

    def record(self, kind: AuditEventKind, local_ae: str) -> AuditRecord:
        verb = "received" if kind is AuditEventKind.ASSOCIATION_RECEIVED else "sent"
        stored = self.transferred if verb == "received" else self.transferred - self.refused
        counts = f"{stored} instance(s) {verb}" + (f", {self.refused} refused" if self.refused else "")
        if self.transferred == self.refused == 0:
            counts = f"no instance {verb}"
        return AuditRecord(
            kind=kind,
            occurred_at=now(),
            user=self.peer_ae,
            address=self.address,
            outcome=self.outcome,
            patients=tuple(sorted(self.studies_of_patients)),
            objects=tuple(
                AuditObject(AuditObjectKind.STUDY, study)
                for patient in sorted(self.studies_of_patients)
                for study in sorted(self.studies_of_patients[patient])
            ),
            detail=f"C-STORE: {counts}; {self.ending}",
            local_ae=local_ae,
            remote_ae=self.peer_ae,
        )


class ReceivedAssociations:
    """The listener's notification handlers (:meth:`handlers`) and the store handler's :meth:`stored`.

    An established association ends with exactly one of EVT_RELEASED and EVT_ABORTED (a dropped connection is an
    A-P-ABORT), both fired in the association's own thread after its last C-STORE: the event is written then.
    EVT_REJECTED covers the associations refused before they were established, the node's own refusals included
    (:func:`dicom_node.scp.make_association_check` fires it as pynetdicom does)."""

    def __init__(self, trail: AuditTrail, local_ae: str) -> None:
        self._trail = trail
        self._local_ae = local_ae
        self._open: dict[int, Transfer] = {}
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_ESTABLISHED, self._established),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_RELEASED, lambda event: self._ended(event, "released", AuditOutcome.SUCCESS)),
            (evt.EVT_ABORTED, lambda event: self._ended(event, "aborted", AuditOutcome.SERIOUS_FAILURE)),
        ]

    def stored(self, event: Event, patient_id: str, study_instance_uid: str) -> None:
        transfer = self._open.get(id(event.assoc))
        if transfer is not None:
            transfer.add(patient_id, study_instance_uid)

    def refused(self, event: Event) -> None:
        transfer = self._open.get(id(event.assoc))
        if transfer is not None:
            transfer.refused += 1
            transfer.outcome = max(transfer.outcome, AuditOutcome.MINOR_FAILURE)

    def _established(self, event: Event) -> None:
        with self._lock:
            self._open[id(event.assoc)] = _transfer_of(event)

    def _rejected(self, event: Event) -> None:
        transfer = _transfer_of(event)
        transfer.ending, transfer.outcome = "rejected", AuditOutcome.MINOR_FAILURE
        self._trail.record(transfer.record(AuditEventKind.ASSOCIATION_RECEIVED, self._local_ae))

    def _ended(self, event: Event, ending: str, outcome: AuditOutcome) -> None:
        with self._lock:
            transfer = self._open.pop(id(event.assoc), None)
        if transfer is not None:
            transfer.ending, transfer.outcome = ending, max(transfer.outcome, outcome)
            self._trail.record(transfer.record(AuditEventKind.ASSOCIATION_RECEIVED, self._local_ae))


def _transfer_of(event: Event) -> Transfer:
    requestor = event.assoc.requestor
    # before negotiation (a rejection) the calling AE title is only in the request
    peer_ae = requestor.ae_title or (requestor.primitive.calling_ae_title if requestor.primitive else "")
    return Transfer(peer_ae=peer_ae.strip(), address=requestor.address)
