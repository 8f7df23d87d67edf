"""The outbox and its sender against a destination that answers with chosen statuses: transient failures are
retried with backoff, other failures fail at once, `dicom-node resend` queues them again; and where outputs go."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import CTImageStorage, DigitalXRayImageStorageForPresentation
from pynetdicom import AE, evt
from sqlalchemy import select

from dicom_node.cli import main
from dicom_node.config import Settings
from dicom_node.delivery import destinations_for
from dicom_node.models import Delivery, DeliveryState, Instance
from dicom_node.node import Node
from dicom_node.part10 import encoded_dataset
from dicom_node.synthetic import synthetic_dx
from tests.dicom_peers import free_port
from tests.tls import certificate_authority


class AnsweringPeer:
    """A C-STORE SCP (pynetdicom) that answers with ``statuses`` in turn (the last one from then on) and keeps
    the SOP Instance UIDs it accepted."""

    def __init__(
        self,
        statuses: list[int],
        ssl_context: ssl.SSLContext | None = None,
        sop_class: str = DigitalXRayImageStorageForPresentation,
    ) -> None:
        self.statuses = list(statuses)
        self.port = free_port()
        self.accepted: list[str] = []
        ae = AE(ae_title="PEER")
        ae.add_supported_context(sop_class)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
            ssl_context=ssl_context,
        )

    def _store(self, event) -> int:
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status == 0x0000:
            self.accepted.append(event.request.AffectedSOPInstanceUID)
        return status


@pytest.fixture
def peer_statuses() -> list[int]:
    return [0x0000]


@pytest.fixture
def peer(peer_statuses: list[int]) -> Iterator[AnsweringPeer]:
    answering = AnsweringPeer(peer_statuses)
    yield answering
    answering.server.shutdown()


def settings_for(tmp_path: Path, peer_port: int, tls: dict | None = None) -> Settings:
    return Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path / "storage"},
        workers={"count": 0},
        destinations=[{"name": "peer", "ae_title": "PEER", "host": "127.0.0.1", "port": peer_port, "tls": tls}],
        delivery={"default_destination": "peer", "max_attempts": 3, "retry_backoff": 0.01, "max_backoff": 0.01},
    )


def queued_delivery(node: Node, tmp_path: Path, patient_id: str = "OUTBOX") -> int:
    """An indexed object (of a patient of its own) with one delivery to the peer, as the outputs job leaves it."""
    path = tmp_path / "object.dcm"
    synthetic_dx(patient_id, side=64).save_as(path, enforce_file_format=True)
    node.ingestor.ingest(pydicom.filereader.read_file_meta_info(path), [encoded_dataset(path)])
    with node.sessions.begin() as session:
        instance = session.scalars(select(Instance).order_by(Instance.id.desc()).limit(1)).one()
        delivery = Delivery(instance_pk=instance.id, destination="peer")
        session.add(delivery)
        session.flush()
        return delivery.id


def delivery(node: Node, delivery_id: int) -> Delivery:
    with node.sessions() as session:
        return session.get_one(Delivery, delivery_id)


def send_until_idle(node: Node) -> None:
    """Run the sender until nothing is due, waiting out the (short) backoffs."""
    for _ in range(200):
        if not node.sender.run_once():
            with node.sessions() as session:
                if not session.scalar(select(Delivery.id).where(Delivery.state == DeliveryState.PENDING)):
                    return
            time.sleep(0.02)


@pytest.mark.parametrize("peer_statuses", [[0xA700, 0xA702, 0x0000]])
def test_out_of_resources_is_retried_until_the_object_is_accepted_once(peer: AnsweringPeer, tmp_path: Path) -> None:
    node = Node(settings_for(tmp_path, peer.port))
    delivery_id = queued_delivery(node, tmp_path)
    send_until_idle(node)
    row = delivery(node, delivery_id)
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.SENT, 3, 0x0000)
    assert len(peer.accepted) == 1


@pytest.mark.parametrize("peer_statuses", [[0xA900]])
def test_a_refusal_that_a_retry_cannot_change_fails_at_once_and_resend_queues_it(
    peer: AnsweringPeer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(tmp_path, peer.port)
    node = Node(settings)
    delivery_id = queued_delivery(node, tmp_path)
    send_until_idle(node)
    row = delivery(node, delivery_id)
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.FAILED, 1, 0xA900)
    assert "answered 0xA900" in row.last_error and peer.accepted == []

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    assert main(["resend", "--config", str(config), "--destination", "nowhere"]) == 2
    assert main(["resend", "--config", str(config), "--id", str(delivery_id)]) == 0
    assert "1 failed deliveries queued again" in capsys.readouterr().out
    assert (delivery(node, delivery_id).state, delivery(node, delivery_id).attempts) == (DeliveryState.PENDING, 0)

    peer.statuses = [0x0000]  # the destination's problem is fixed
    send_until_idle(node)
    assert delivery(node, delivery_id).state == DeliveryState.SENT and len(peer.accepted) == 1


def test_a_destination_that_does_not_take_the_sop_class_fails_at_once(tmp_path: Path) -> None:
    peer = AnsweringPeer([0x0000], sop_class=CTImageStorage)
    try:
        node = Node(settings_for(tmp_path, peer.port))
        delivery_id = queued_delivery(node, tmp_path)
        send_until_idle(node)
        row = delivery(node, delivery_id)
        assert (row.state, row.attempts) == (DeliveryState.FAILED, 1)
        assert row.last_error.startswith("not accepted by peer")
    finally:
        peer.server.shutdown()


def test_a_destination_that_is_down_uses_up_its_attempts_then_fails(tmp_path: Path) -> None:
    node = Node(settings_for(tmp_path, free_port()))  # nothing listens there
    delivery_id = queued_delivery(node, tmp_path)
    send_until_idle(node)
    row = delivery(node, delivery_id)
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.FAILED, 3, None)
    assert "association" in row.last_error or "cannot connect" in row.last_error


def test_a_tls_destination_gets_the_object_only_when_its_certificate_verifies(tmp_path: Path) -> None:
    ca, certificate, key = certificate_authority(tmp_path / "pki", "test CA")
    other_ca, _, _ = certificate_authority(tmp_path / "other", "other CA")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificate, key)
    peer = AnsweringPeer([0x0000], server_context)
    try:
        for trusted, expected in ((other_ca, DeliveryState.FAILED), (ca, DeliveryState.SENT)):
            node = Node(settings_for(tmp_path / expected, peer.port, tls={"ca_file": str(trusted)}))
            delivery_id = queued_delivery(node, tmp_path / expected)
            send_until_idle(node)
            assert delivery(node, delivery_id).state == expected
        assert len(peer.accepted) == 1, "only over the verified connection"
    finally:
        peer.server.shutdown()


def test_outputs_go_by_rule_then_back_to_a_known_caller_then_to_the_default() -> None:
    def peer(name: str, ae_title: str) -> dict:
        return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": 104}

    settings = Settings(
        destinations=[peer("pacs", "PACS"), peer("ris", "RIS"), peer("modality", "CR1")],
        delivery={
            "default_destination": "pacs",
            "rules": [{"calling_ae": "^CT", "kinds": ["structured_report"], "destinations": ["ris", "pacs"]}],
        },
    )
    assert destinations_for(settings, "CT_7", "structured_report") == ["ris", "pacs"]
    assert destinations_for(settings, "CT_7", "secondary_capture") == ["pacs"], "no rule for this kind: default"
    assert destinations_for(settings, "CR1", "secondary_capture") == ["modality"], "back to a known caller"
    assert destinations_for(settings, "UNKNOWN", "structured_report") == ["pacs"]
    assert destinations_for(Settings(), "CR1", "secondary_capture") == [], "no destinations: nowhere"


class SlowPeer(AnsweringPeer):
    """A peer that takes ``seconds`` to store each object, as a PACS writing to its disk, and counts the stores
    in progress at once."""

    def __init__(self, seconds: float) -> None:
        super().__init__([0x0000])
        self.seconds = seconds
        self.in_progress = self.most_at_once = 0
        self.lock = threading.Lock()

    def _store(self, event) -> int:
        with self.lock:
            self.in_progress += 1
            self.most_at_once = max(self.most_at_once, self.in_progress)
        time.sleep(self.seconds)
        with self.lock:
            self.in_progress -= 1
        return super()._store(event)


def test_the_sender_keeps_delivery_associations_busy_side_by_side(tmp_path: Path) -> None:
    peer = SlowPeer(0.2)
    try:
        settings = settings_for(tmp_path, peer.port).model_copy(deep=True)
        settings.delivery.objects_per_association = 2
        settings.delivery.associations = 2
        node = Node(settings)
        ids = [queued_delivery(node, tmp_path, f"OUTBOX{number}") for number in range(6)]
        node.sender.start()
        try:
            deadline = time.monotonic() + 30
            while {delivery(node, delivery_id).state for delivery_id in ids} != {DeliveryState.SENT}:
                assert time.monotonic() < deadline, "the six objects were not all sent"
                time.sleep(0.05)
        finally:
            node.sender.stop()
        assert len(set(peer.accepted)) == 6
        assert peer.most_at_once == 2, "two associations stored side by side"
    finally:
        peer.server.shutdown()
