"""One audit event per DICOM association the listener saw: released, aborted by the caller, or rejected by the
node's own admission check; each names the peer's AE title and address, the patients and studies it carried,
and how it ended."""

from __future__ import annotations

import time

from pynetdicom import AE
from sqlalchemy import select

from dicom_node.models import AuditEvent
from dicom_node.node import Node
from dicom_node.synthetic import synthetic_dx
from tests.conftest import NodeFactory
from tests.dicom_peers import NODE_AE, associate, send_datasets


def _received(node: Node, count: int, timeout: float = 10) -> list[AuditEvent]:
    """The association events once ``count`` exist: an event is written as its association ends."""
    deadline = time.monotonic() + timeout
    while True:
        with node.sessions() as session:
            events = session.scalars(
                select(AuditEvent).where(AuditEvent.kind == "association-received").order_by(AuditEvent.id)
            ).all()
        if len(events) >= count or time.monotonic() > deadline:
            return list(events)
        time.sleep(0.05)


def test_a_released_and_an_aborted_association(node: Node) -> None:
    first, second = synthetic_dx("AUD-1", side=64), synthetic_dx("AUD-2", side=64, seed=1)
    assert [int(status.Status) for status in send_datasets(node.settings.dicom.port, [first], calling_aet="CT1")] == [0]

    ae = AE(ae_title="CT2")
    ae.add_requested_context(second.SOPClassUID, second.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", node.settings.dicom.port, ae_title=NODE_AE)
    assert int(association.send_c_store(second).Status) == 0
    association.abort()

    released, aborted = _received(node, 2)
    assert (released.user, released.remote_ae, released.local_ae, released.address) == (
        "CT1",
        "CT1",
        NODE_AE,
        "127.0.0.1",
    )
    assert released.patients == ["AUD-1"] and released.objects == [["study", first.StudyInstanceUID]]
    assert (released.outcome, released.detail) == (0, "C-STORE: 1 instance(s) received; released")
    assert aborted.user == "CT2" and aborted.patients == ["AUD-2"]
    assert (aborted.outcome, aborted.detail) == (8, "C-STORE: 1 instance(s) received; aborted")


def test_an_association_the_node_refuses_is_recorded(start_node: NodeFactory) -> None:
    node = start_node(calling_ae_addresses={"BOUND": ["10.0.0.0/8"]}, allowed_calling_aets=["BOUND", "ECHO"])
    assert associate(node.settings.dicom.port, calling_aet="BOUND").is_rejected
    assert associate(node.settings.dicom.port, calling_aet="ECHO").is_established is False  # released at once
    rejected, echo = _received(node, 2)
    assert (rejected.user, rejected.outcome, rejected.patients) == ("BOUND", 4, [])
    assert rejected.detail == "C-STORE: no instance received; rejected"
    assert (echo.user, echo.outcome, echo.detail) == ("ECHO", 0, "C-STORE: no instance received; released")
