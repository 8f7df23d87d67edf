"""Results back to the PACS, end to end against a real Orthanc: Orthanc sends X-rays to the node, and the node's
Secondary Captures, Parametric Maps and structured reports arrive in Orthanc in the same studies, each passing
dciodvfy (and the SR PixelMed's validator); a destination that is down gets its deliveries once it is back, each
once."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, ParametricMapStorage, SecondaryCaptureImageStorage
from sqlalchemy import func, select

from dicom_node.ai_tasks import bone_age as hand_task
from dicom_node.ai_tasks import hallux_valgus as foot_task
from dicom_node.config import InferenceSettings, Settings
from dicom_node.inference_jobs import InferenceModels
from dicom_node.models import Delivery, DeliveryState, Instance, Job
from dicom_node.node import Node
from dicom_node.outputs import codes
from dicom_node.phantoms.generator import render_phantom
from inference.predict import reported_foot_findings
from tests.dicom_peers import free_port, send_datasets
from tests.orthanc import Orthanc, orthanc
from tests.validators import dciodvfy_errors, sr_validator_errors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models() -> InferenceModels:
    return InferenceModels.load(InferenceSettings())  # the committed demo cards


def node_with_pacs(tmp_path: Path, models: InferenceModels, pacs_port: int, node_port: int, **delivery) -> Node:
    settings = Settings(
        dicom={"host": "127.0.0.1", "port": node_port},
        storage={"root": tmp_path / "storage"},
        workers={"count": 1, "poll_interval": 0.05},
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}],
        delivery={"default_destination": "pacs", "poll_interval": 0.05, **delivery},
    )
    return Node(settings, models=models)


@pytest.fixture
def pacs_and_node(tmp_path: Path, models: InferenceModels) -> Iterator[tuple[Orthanc, Node]]:
    node_port = free_port()
    with orthanc(tmp_path / "orthanc", modalities={"ainode": ("AINODE", "127.0.0.1", node_port)}) as pacs:
        node = node_with_pacs(tmp_path, models, pacs.dicom_port, node_port)
        node.start()
        try:
            yield pacs, node
        finally:
            node.stop()


def phantom_bytes(kind: str, index: int) -> tuple[Dataset, bytes]:
    ds, _ = render_phantom(77, index, kind)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ds, buffer.getvalue()


def content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def concept(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> tuple[str, str] | None:
    sequence = item.get(attribute)
    return (sequence[0].CodeValue, sequence[0].CodingSchemeDesignator) if sequence else None


def test_orthanc_gets_heatmaps_and_reports_in_the_studies_it_sent(pacs_and_node: tuple[Orthanc, Node]) -> None:
    pacs, node = pacs_and_node
    hand, hand_file = phantom_bytes("hand", 0)
    foot, foot_file = phantom_bytes("foot", 1)
    sent = [pacs.upload(hand_file), pacs.upload(foot_file)]
    pacs.send_to_modality("ainode", sent)

    def results_of(source: Dataset, images: int) -> list[dict] | None:
        """The study's instances once it has ``images`` Secondary Captures and as many Parametric Maps, and one
        report."""
        instances = pacs.instances_of_study(source.StudyInstanceUID)
        kinds = [instance["SOPClassUID"] for instance in instances]
        if (
            kinds.count(SecondaryCaptureImageStorage) == images
            and kinds.count(ParametricMapStorage) == images
            and kinds.count(Comprehensive3DSRStorage) == 1
        ):
            return instances
        return None

    hand_study = pacs.wait_for(lambda: results_of(hand, 2), timeout=60)
    foot_study = pacs.wait_for(lambda: results_of(foot, 1), timeout=60)

    [hand_report] = [i for i in hand_study if i["SOPClassUID"] == Comprehensive3DSRStorage]
    report = pydicom.dcmread(io.BytesIO(pacs.instance_file(hand_report["ID"])))
    assert report.StudyInstanceUID == hand.StudyInstanceUID and report.PatientID == hand.PatientID
    bone_ages = [
        item.MeasuredValueSequence[0]
        for item in content_items(report)
        if concept(item) == (hand_task.BONE_AGE.value, hand_task.BONE_AGE.scheme_designator)
        and "MeasuredValueSequence" in item
    ]
    assert len(bone_ages) >= 2, "a bone age from the male and from the female model"
    assert all(0 < float(value.NumericValue) < 240 for value in bone_ages)
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    referenced = {ref.ReferencedSOPInstanceUID for series in evidence for ref in series.ReferencedSOPSequence}
    assert hand.SOPInstanceUID in referenced

    [foot_report] = [i for i in foot_study if i["SOPClassUID"] == Comprehensive3DSRStorage]
    report = pydicom.dcmread(io.BytesIO(pacs.instance_file(foot_report["ID"])))
    findings = [
        concept(item, "ConceptCodeSequence") for item in content_items(report) if concept(item) == ("121071", "DCM")
    ]
    assert findings == [(code.value, code.scheme_designator) for code in foot_task.FINDINGS.values()]
    with node.sessions() as session:
        [foot_result] = [r for i in session.scalars(select(Instance)) for r in i.results if r.task == "hallux_valgus"]
        values = foot_result.values
    present = {
        name
        for name, code in foot_task.FINDINGS.items()
        for item in content_items(report)
        if concept(item) == (code.value, code.scheme_designator)
        and concept(item, "ConceptCodeSequence") == (codes.PRESENT.value, codes.PRESENT.scheme_designator)
    }
    assert present == reported_foot_findings(values["probabilities"], values["threshold"])

    for study, source in ((hand_study, hand), (foot_study, foot)):
        for stored in [i for i in study if i["SOPClassUID"] == ParametricMapStorage]:
            returned = pydicom.dcmread(io.BytesIO(pacs.instance_file(stored["ID"])))
            with node.sessions() as session:
                path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == returned.SOPInstanceUID))
            written = pydicom.dcmread(node.store.absolute(path))
            assert returned == written, "Orthanc gives the Parametric Map back as the node wrote it"
            assert (returned.Rows, returned.Columns) == (source.Rows, source.Columns)

    for study in (hand_study, foot_study):
        for kind in (SecondaryCaptureImageStorage, ParametricMapStorage):
            images = [i for i in study if i["SOPClassUID"] == kind]
            assert len({image["SeriesInstanceUID"] for image in images}) == len(images), "a series per output"
    with node.sessions() as session:
        deliveries = session.scalars(select(Delivery)).all()
        assert len(deliveries) == 8 and {d.state for d in deliveries} == {DeliveryState.SENT}
        written = session.scalars(select(Instance).where(Instance.source_instance_pk.is_not(None))).all()
    for instance in written:  # the judges of every object the node wrote
        path = node.store.absolute(instance.path)
        assert dciodvfy_errors(path) == [], instance.sop_class_uid
        if instance.sop_class_uid == Comprehensive3DSRStorage:
            assert sr_validator_errors(path) == []

    # our own Secondary Captures sent back to the node are not processed again
    captures = [i["ID"] for i in hand_study if i["SOPClassUID"] == SecondaryCaptureImageStorage]
    pacs.send_to_modality("ainode", captures)
    with node.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.kind == "inference")) == 2
        assert session.scalar(select(func.count()).select_from(Instance)) == 2 + len(written)


def test_deliveries_wait_for_a_destination_that_is_down_and_arrive_once(
    tmp_path: Path, models: InferenceModels
) -> None:
    pacs_port, node_port = free_port(), free_port()
    node = node_with_pacs(tmp_path, models, pacs_port, node_port, retry_backoff=0.2, max_backoff=0.5)
    node.start()
    try:
        foot, foot_file = phantom_bytes("foot", 2)
        send_datasets(node_port, [foot])

        def attempted_twice() -> list[Delivery] | None:
            with node.sessions() as session:
                rows = session.scalars(select(Delivery)).all()
            return rows if len(rows) == 3 and all(row.attempts >= 2 for row in rows) else None

        waiting = wait_until(attempted_twice, timeout=90)
        assert {row.state for row in waiting} <= {DeliveryState.PENDING, DeliveryState.SENDING}
        assert all("cannot connect" in row.last_error or "association" in row.last_error for row in waiting)

        with orthanc(tmp_path / "orthanc", dicom_port=pacs_port) as pacs:
            instances = pacs.wait_for(lambda: len(pacs.instances_of_study(foot.StudyInstanceUID)) == 3 or None)
            assert instances
            time.sleep(1.0)  # any second copy would have arrived by now
            stored = pacs.get("/statistics")["CountInstances"]
            assert stored == 3
        with node.sessions() as session:
            assert {row.state for row in session.scalars(select(Delivery))} == {DeliveryState.SENT}
            assert session.scalar(select(Instance).where(Instance.sop_class_uid == Comprehensive3DSRStorage))
    finally:
        node.stop()


def wait_until(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{predicate.__name__} did not hold within {timeout} s")
