"""The DICOM listener against real peers: DCMTK's echoscu/storescu and pynetdicom's SCU, on loopback."""

from __future__ import annotations

import datetime as dt
import errno
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom import uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage, Verification
from sqlalchemy import select, update

from dicom_node.models import Instance, Job, JobState, Patient
from dicom_node.node import Node
from dicom_node.part10 import encoded_dataset
from dicom_node.status import StoreStatus
from dicom_node.storage import InstanceStore
from dicom_node.synthetic import synthetic_dx, write_synthetic_dx
from tests.conftest import NodeFactory, files_under_patients, stored_instances, stored_jobs
from tests.dicom_peers import NODE_AE, dcmtk, send_datasets, send_files


def write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_echoscu_gets_an_answer(node: Node) -> None:
    result = dcmtk("echoscu", "-aec", NODE_AE, "127.0.0.1", node.settings.dicom.port)
    assert result.returncode == 0, result.stderr


def test_storescu_instance_is_stored_byte_for_byte_and_indexed(node: Node, tmp_path: Path) -> None:
    [source] = write_synthetic_dx(tmp_path / "in", 1, side=300)
    result = dcmtk("storescu", "-aet", "MODALITY1", "-aec", NODE_AE, "127.0.0.1", node.settings.dicom.port, source)
    assert result.returncode == 0, result.stderr

    [instance] = stored_instances(node)
    stored = node.store.absolute(instance.path)
    assert encoded_dataset(stored) == encoded_dataset(source)
    original = pydicom.dcmread(source)
    assert pydicom.dcmread(stored) == original

    with node.sessions() as session:
        instance = session.scalars(select(Instance)).one()
        series, study, patient = instance.series, instance.series.study, instance.series.study.patient
        assert (patient.patient_id, patient.name, patient.sex) == ("SYNTH-0000", "Synthetic^Patient", "F")
        assert patient.birth_date == dt.date(2015, 3, 1)
        assert (study.study_instance_uid, study.study_date, study.accession_number) == (
            original.StudyInstanceUID,
            dt.date(2026, 1, 15),
            "ACC000000",
        )
        assert (series.series_instance_uid, series.modality, series.body_part_examined) == (
            original.SeriesInstanceUID,
            "DX",
            "HAND",
        )
        assert instance.sop_instance_uid == original.SOPInstanceUID
        assert instance.sop_class_uid == original.SOPClassUID
        assert instance.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
        assert (instance.rows, instance.columns) == (300, 300)
        assert instance.size_bytes == stored.stat().st_size
        assert instance.calling_ae == "MODALITY1"
        assert instance.received_at is not None
    [job] = stored_jobs(node)
    assert (job.instance_pk, job.kind, job.state) == (instance.id, "inference", JobState.PENDING)


def test_files_are_kept_under_patient_study_series(node: Node) -> None:
    ds = synthetic_dx("PAT-7")
    send_datasets(node.settings.dicom.port, [ds])
    [path] = files_under_patients(node)
    relative = path.relative_to(node.store.root)
    assert relative.parts[0] == "patients"
    assert relative.parts[1].startswith("PAT_7-")
    assert relative.parts[2:] == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID + ".dcm")
    assert not list(node.store.incoming.iterdir()), "no temporary file may stay behind"


def test_eight_concurrent_associations_of_twenty_instances_all_land(node: Node) -> None:
    batches = [[synthetic_dx(f"P{sender}", side=128, seed=sender * 100 + n) for n in range(20)] for sender in range(8)]
    statuses: list[int] = []
    lock = threading.Lock()

    def send(batch: list[pydicom.Dataset]) -> None:
        responses = send_datasets(node.settings.dicom.port, batch)
        with lock:
            statuses.extend(response.Status for response in responses)

    threads = [threading.Thread(target=send, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert statuses == [StoreStatus.SUCCESS] * 160
    expected = {ds.SOPInstanceUID for batch in batches for ds in batch}
    assert {instance.sop_instance_uid for instance in stored_instances(node)} == expected
    assert len(files_under_patients(node)) == 160
    assert len(stored_jobs(node)) == 160


def test_resend_keeps_the_first_copy_and_queues_one_job(node: Node, tmp_path: Path) -> None:
    ds = synthetic_dx("PAT-DUP")
    path = write(ds, tmp_path / "dup.dcm")
    first = dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", node.settings.dicom.port, path)
    ds.PatientName = "Changed^Name"
    write(ds, path)
    second = dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", node.settings.dicom.port, path)

    assert first.returncode == second.returncode == 0
    [instance] = stored_instances(node)
    assert len(stored_jobs(node)) == 1
    assert pydicom.dcmread(node.store.absolute(instance.path)).PatientName != "Changed^Name"


def test_replace_policy_overwrites_and_queues_the_one_job_again(start_node: NodeFactory) -> None:
    node = start_node(duplicate_policy="replace")
    ds = synthetic_dx("PAT-REPL")
    send_datasets(node.settings.dicom.port, [ds])
    with node.sessions.begin() as session:  # as if a worker had finished it
        session.execute(update(Job).values(state=JobState.DONE, attempts=1))
    ds.BodyPartExamined = "FOOT"
    [response] = send_datasets(node.settings.dicom.port, [ds])

    assert response.Status == StoreStatus.SUCCESS
    [instance] = stored_instances(node)
    assert pydicom.dcmread(node.store.absolute(instance.path)).BodyPartExamined == "FOOT"
    assert len(files_under_patients(node)) == 1
    [job] = stored_jobs(node)
    assert (job.state, job.attempts) == (JobState.PENDING, 0)


def test_concurrent_replaces_of_one_instance_keep_one_row_and_one_job(start_node: NodeFactory) -> None:
    node = start_node(duplicate_policy="replace")
    ds = synthetic_dx("PAT-RACE")

    def send() -> None:
        send_datasets(node.settings.dicom.port, [ds] * 5)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(stored_instances(node)) == 1
    assert len(stored_jobs(node)) == 1
    assert len(files_under_patients(node)) == 1


@pytest.mark.parametrize("keyword", ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_identifier_is_refused_and_nothing_is_written(node: Node, tmp_path: Path, keyword: str) -> None:
    ds = synthetic_dx("PAT-MISSING")
    delattr(ds, keyword)
    [response] = send_files(node.settings.dicom.port, [write(ds, tmp_path / "missing.dcm")])

    assert response.Status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert keyword in response.ErrorComment
    assert_nothing_stored(node)


@pytest.mark.parametrize("bad_uid", ["../../../../tmp/x", "1.2.3/4", "1." * 40 + "1"])
def test_uid_that_could_name_a_path_is_refused(node: Node, tmp_path: Path, bad_uid: str) -> None:
    ds = synthetic_dx("PAT-UID")
    ds.SeriesInstanceUID = bad_uid
    [response] = send_files(node.settings.dicom.port, [write(ds, tmp_path / "bad_uid.dcm")])

    assert response.Status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "SeriesInstanceUID" in response.ErrorComment
    assert_nothing_stored(node)


def test_dataset_of_another_sop_class_is_refused(node: Node, tmp_path: Path) -> None:
    ds = synthetic_dx("PAT-CLASS")
    ds.SOPClassUID = ComputedRadiographyImageStorage
    path = tmp_path / "class.dcm"
    ds.save_as(path, enforce_file_format=False)  # keeps the file meta's DX class: sent under the DX context
    [response] = send_files(node.settings.dicom.port, [path])

    assert response.Status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert_nothing_stored(node)


def dataset_followed_by(tmp_path: Path, name: str, cut: int = 0, extra: bytes = b"") -> tuple[Path, Path]:
    """A whole synthetic file, and a copy whose dataset loses its last ``cut`` bytes and gains ``extra``."""
    source = write(synthetic_dx("PAT-BROKEN"), tmp_path / "whole.dcm")
    raw = source.read_bytes()
    broken = tmp_path / name
    broken.write_bytes(raw[: len(raw) - cut] + extra)
    return source, broken


@pytest.mark.parametrize(
    ("case", "cut", "extra", "reason"),
    [
        ("cut-in-pixel-data", 1000, b"", "dataset is truncated"),
        (
            "garbage-after-header",
            0,
            b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10",
            "cannot be decoded",
        ),
    ],
)
def test_malformed_dataset_is_refused_and_the_node_keeps_serving(
    node: Node, tmp_path: Path, case: str, cut: int, extra: bytes, reason: str
) -> None:
    source, broken = dataset_followed_by(tmp_path, f"{case}.dcm", cut, extra)
    [response] = send_files(node.settings.dicom.port, [broken])

    assert response.Status == StoreStatus.CANNOT_UNDERSTAND
    assert reason in response.ErrorComment
    assert_nothing_stored(node)
    assert dcmtk("echoscu", "-aec", NODE_AE, "127.0.0.1", node.settings.dicom.port).returncode == 0
    [later] = send_files(node.settings.dicom.port, [source])
    assert later.Status == StoreStatus.SUCCESS


def test_out_of_disk_is_answered_with_out_of_resources(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: InstanceStore, chunks: object) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(InstanceStore, "write_temporary", disk_full)
    [response] = send_datasets(node.settings.dicom.port, [synthetic_dx("PAT-FULL")])

    assert response.Status == StoreStatus.OUT_OF_RESOURCES
    assert "No space left on device" in response.ErrorComment
    assert_nothing_stored(node)


@pytest.mark.parametrize("patient_id", ["../../etc", "A/B", "A_B", "..", "/abs/path", "Émile\\x"])
def test_path_traversing_patient_id_is_contained_and_shown_as_itself(node: Node, patient_id: str) -> None:
    ds = synthetic_dx(patient_id)
    [response] = send_datasets(node.settings.dicom.port, [ds])

    assert response.Status == StoreStatus.SUCCESS
    [path] = files_under_patients(node)
    assert path.resolve().is_relative_to(node.store.root / "patients")
    assert len(path.relative_to(node.store.root / "patients").parts) == 4
    with node.sessions() as session:
        assert session.scalars(select(Patient.patient_id)).one() == patient_id


def test_patient_ids_that_sanitise_alike_do_not_collide(node: Node) -> None:
    datasets = [synthetic_dx(patient_id, seed=n) for n, patient_id in enumerate(["A/B", "A_B", "A?B"])]
    send_datasets(node.settings.dicom.port, datasets)

    patient_directories = {path.relative_to(node.store.root).parts[1] for path in files_under_patients(node)}
    assert len(patient_directories) == 3


def test_unknown_calling_ae_is_rejected_at_association(start_node: NodeFactory) -> None:
    node = start_node(allowed_calling_aets=["ORTHANC"])
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(Verification)
    association = stranger.associate("127.0.0.1", node.settings.dicom.port, ae_title=NODE_AE)
    assert association.is_rejected

    assert dcmtk("echoscu", "-aet", "STRANGER", "-aec", NODE_AE, "127.0.0.1", node.settings.dicom.port).returncode != 0
    assert dcmtk("echoscu", "-aet", "ORTHANC", "-aec", NODE_AE, "127.0.0.1", node.settings.dicom.port).returncode == 0


def test_ct_is_accepted_only_when_all_storage_is_enabled(start_node: NodeFactory) -> None:
    ct = synthetic_dx("PAT-CT")
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, uid.ExplicitVRLittleEndian)

    xray_only = start_node()
    association = ae.associate("127.0.0.1", xray_only.settings.dicom.port, ae_title=NODE_AE)
    assert not association.accepted_contexts
    association.release()

    everything = start_node(accept_all_storage=True)
    [response] = send_datasets(everything.settings.dicom.port, [ct])
    assert response.Status == StoreStatus.SUCCESS


def test_beyond_max_associations_is_refused(start_node: NodeFactory) -> None:
    node = start_node(max_associations=1)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", node.settings.dicom.port, ae_title=NODE_AE)
    second = ae.associate("127.0.0.1", node.settings.dicom.port, ae_title=NODE_AE)
    try:
        assert first.is_established
        assert second.is_rejected
    finally:
        first.release()


def assert_nothing_stored(node: Node) -> None:
    assert stored_instances(node) == []
    assert stored_jobs(node) == []
    assert files_under_patients(node) == []
    assert not list(node.store.incoming.iterdir())
