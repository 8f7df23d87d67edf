"""What the node does when storage, the index or the input misbehaves: a failure status, no lost image,
no patient data in the logs."""

from __future__ import annotations

import logging
import threading
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom import uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dicom_node import ingest
from dicom_node.models import Instance, Study
from dicom_node.node import Node
from dicom_node.status import StoreStatus
from dicom_node.synthetic import synthetic_dx
from tests.conftest import NodeFactory, files_under_patients, stored_instances, stored_jobs
from tests.dicom_peers import NODE_AE, send_datasets, send_files

SECRET_ID, SECRET_NAME = "MRN-SECRET-4711", "Doe^Jane^Secretname"


def fail_commit_once(monkeypatch: pytest.MonkeyPatch, *, after_commit: bool) -> list[int]:
    """Make the next index commit report an error, before or after it really commits."""
    calls: list[int] = []
    real_commit = Session.commit

    def commit(self: Session) -> None:
        calls.append(1)
        if len(calls) == 1:
            if after_commit:
                real_commit(self)
            raise OperationalError("COMMIT", {}, Exception("connection lost"))
        real_commit(self)

    monkeypatch.setattr(Session, "commit", commit)
    return calls


def test_failed_commit_answers_out_of_resources_and_a_resend_is_stored(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_commit_once(monkeypatch, after_commit=False)
    ds = synthetic_dx("PAT-COMMIT")
    [first] = send_datasets(node.settings.dicom.port, [ds])
    [second] = send_datasets(node.settings.dicom.port, [ds])

    assert first.Status == StoreStatus.OUT_OF_RESOURCES
    assert second.Status == StoreStatus.SUCCESS
    [instance] = stored_instances(node)
    assert node.store.absolute(instance.path).is_file()
    assert len(stored_jobs(node)) == 1


def test_commit_that_lands_but_reports_an_error_loses_no_image(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_commit_once(monkeypatch, after_commit=True)
    ds = synthetic_dx("PAT-UNCERTAIN")
    [first] = send_datasets(node.settings.dicom.port, [ds])
    [instance] = stored_instances(node)

    assert first.Status == StoreStatus.OUT_OF_RESOURCES
    assert node.store.absolute(instance.path).is_file(), "the indexed file must exist"
    [again] = send_datasets(node.settings.dicom.port, [ds])
    assert again.Status == StoreStatus.SUCCESS
    assert len(stored_jobs(node)) == 1


def test_a_duplicate_puts_back_an_indexed_file_that_went_missing(node: Node) -> None:
    ds = synthetic_dx("PAT-HEAL")
    send_datasets(node.settings.dicom.port, [ds])
    [instance] = stored_instances(node)
    node.store.absolute(instance.path).unlink()

    [again] = send_datasets(node.settings.dicom.port, [ds])
    assert again.Status == StoreStatus.SUCCESS
    assert pydicom.dcmread(node.store.absolute(instance.path)).SOPInstanceUID == ds.SOPInstanceUID


def test_failed_replace_keeps_the_acknowledged_copy(start_node: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_node(duplicate_policy="replace")
    ds = synthetic_dx("PAT-KEEP")
    send_datasets(node.settings.dicom.port, [ds])
    fail_commit_once(monkeypatch, after_commit=False)
    ds.BodyPartExamined = "FOOT"
    [response] = send_datasets(node.settings.dicom.port, [ds])

    assert response.Status == StoreStatus.OUT_OF_RESOURCES
    [instance] = stored_instances(node)
    assert pydicom.dcmread(node.store.absolute(instance.path)).BodyPartExamined == "HAND"
    assert not list(node.store.root.rglob("*.replaced"))


def test_a_study_sent_again_under_another_patient_is_refused(node: Node) -> None:
    first = synthetic_dx("PAT-A", seed=1)
    second = synthetic_dx("PAT-B", seed=2, study_uid=first.StudyInstanceUID)
    [ok] = send_datasets(node.settings.dicom.port, [first])
    [refused] = send_datasets(node.settings.dicom.port, [second])

    assert ok.Status == StoreStatus.SUCCESS
    assert refused.Status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "another patient" in refused.ErrorComment
    assert len(stored_instances(node)) == 1


def test_values_too_long_for_the_index(node: Node) -> None:
    too_long_id = synthetic_dx("P" * 65, seed=1)
    long_values = synthetic_dx("PAT-LONG", seed=2)
    long_values.AccessionNumber = "A" * 20
    long_values.InstanceNumber = "99999999999"
    responses = send_datasets(node.settings.dicom.port, [too_long_id, long_values])

    assert [response.Status for response in responses] == [
        StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        StoreStatus.SUCCESS,
    ]
    assert "longer than 64" in responses[0].ErrorComment
    with node.sessions() as session:
        assert session.scalars(select(Study.accession_number)).one() == "A" * 16
        assert session.scalars(select(Instance.instance_number)).one() is None


def test_an_unexpected_error_is_a_processing_failure_without_patient_data_in_the_log(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(session, header):
        raise RuntimeError(f"boom for {header.patient_id} {header.patient_name}")

    monkeypatch.setattr(ingest, "index_series", explode)
    caplog.set_level(logging.DEBUG)
    [response] = send_datasets(node.settings.dicom.port, [synthetic_dx(SECRET_ID, SECRET_NAME)])

    assert response.Status == StoreStatus.PROCESSING_FAILURE
    assert SECRET_ID not in caplog.text and "Secretname" not in caplog.text
    assert stored_instances(node) == []


def test_disk_full_while_publishing_answers_out_of_resources(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(directory: Path, stop_at: Path) -> None:
        raise OSError(28, "No space left on device", str(directory))

    monkeypatch.setattr("dicom_node.storage._make_directories_durably", disk_full)
    [response] = send_datasets(node.settings.dicom.port, [synthetic_dx("PAT-ENOSPC")])

    assert response.Status == StoreStatus.OUT_OF_RESOURCES
    assert stored_instances(node) == [] and files_under_patients(node) == []


def test_a_deflate_bomb_is_refused_with_a_status_senders_do_not_retry(start_node: NodeFactory, tmp_path: Path) -> None:
    node = start_node(max_inflated_mb=8)
    ds = synthetic_dx("PAT-BOMB", side=64)
    ds.add_new(0x00091010, "OB", b"\x00" * (32 * 2**20))  # 32 MiB of zeros: a few dozen KiB deflated
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 2**20

    [response] = send_files(node.settings.dicom.port, [path])
    assert response.Status == StoreStatus.CANNOT_UNDERSTAND  # not retryable: 0xA700 would be sent again forever
    assert "inflates beyond 8 MiB" in response.ErrorComment
    assert stored_instances(node) == []


def test_small_deflated_datasets_are_still_accepted(node: Node, tmp_path: Path) -> None:
    ds = synthetic_dx("PAT-DEFLATE", side=64)
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    [response] = send_files(node.settings.dicom.port, [path])
    assert response.Status == StoreStatus.SUCCESS


def test_no_patient_data_in_logs_at_info(node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ds = synthetic_dx(SECRET_ID, SECRET_NAME)
    missing = synthetic_dx(SECRET_ID, SECRET_NAME, seed=1)
    del missing.StudyInstanceUID
    send_datasets(node.settings.dicom.port, [ds, ds])
    send_files(node.settings.dicom.port, [_write(missing, tmp_path / "missing.dcm")])

    assert "stored" in caplog.text and "refused" in caplog.text  # the log does describe what happened
    for secret in (SECRET_ID, "Doe", "Secretname", zlib.crc32(SECRET_ID.encode()).__str__()):
        assert secret not in caplog.text


def test_an_idle_association_is_aborted_after_the_network_timeout(start_node: NodeFactory) -> None:
    node = start_node(network_timeout=1.0)
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", node.settings.dicom.port, ae_title=NODE_AE)
    assert association.is_established
    deadline = time.monotonic() + 15
    while association.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert association.is_aborted or association.is_released


def test_stop_aborts_associations_that_stay_open(start_node: NodeFactory) -> None:
    node = start_node()
    ae = AE(ae_title="LINGER")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", node.settings.dicom.port, ae_title=NODE_AE)
    assert association.is_established
    stopper = threading.Thread(target=node.scp.stop, kwargs={"grace": 1.0})
    started = time.monotonic()
    stopper.start()
    stopper.join(20)
    assert not stopper.is_alive() and time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while association.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not association.is_established


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
