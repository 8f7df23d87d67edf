"""A node's recorded state for the web tests: two phantoms received, processed and written out, one delivery
failed. The API, the viewer and the OpenAPI fuzz test read the same kind of state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select, update

from dicom_node.config import InferenceSettings, Settings
from dicom_node.inference_jobs import InferenceModels
from dicom_node.models import Delivery, DeliveryState
from dicom_node.node import Node
from dicom_node.part10 import encoded_dataset
from dicom_node.phantoms.generator import render_phantom

HAND_PATIENT = "AB/12 34"  # free text: a slash and a space
FOOT_PATIENT = "CD-5678"


@dataclass(frozen=True)
class Received:
    node: Node
    hand: pydicom.Dataset
    foot: pydicom.Dataset
    failed_delivery: int
    pending_delivery: int


def received_node(root: Path, seed: int = 11) -> Received:
    """A node without workers (the demo models on torch) that received a hand of HAND_PATIENT and a foot of
    FOOT_PATIENT, ran their inference and outputs jobs, and whose first delivery, to a PACS that is never up,
    failed. The caller disposes of ``node.engine``."""
    settings = Settings(
        storage={"root": root / "storage"},
        workers={"count": 0},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
        delivery={"default_destination": "pacs"},
    )
    node = Node(settings, models=InferenceModels.load(InferenceSettings(runtime="torch")))  # the demo cards
    phantoms = []
    for index, (kind, patient_id, name) in enumerate(
        [("hand", HAND_PATIENT, "DOE^JANE"), ("foot", FOOT_PATIENT, "ROE^RICHARD")]
    ):
        ds, _ = render_phantom(seed, index, kind)
        ds.PatientID, ds.PatientName = patient_id, name
        path = root / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        node.ingestor.ingest(pydicom.filereader.read_file_meta_info(path), [encoded_dataset(path)], "MODALITY")
        phantoms.append(ds)
    while node.workers.run_once():  # inference, then the outputs it queues
        pass
    with node.sessions.begin() as session:
        first, second = session.scalars(select(Delivery.id).order_by(Delivery.id).limit(2)).all()
        session.execute(
            update(Delivery)
            .where(Delivery.id == first)
            .values(state=DeliveryState.FAILED, attempts=8, last_status=0xA900, last_error="pacs answered 0xA900")
        )
    return Received(node, *phantoms, first, second)
