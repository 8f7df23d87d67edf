"""The UIDs of the objects the node writes: one installation derives the same UIDs from the same input (an outputs
job run again after a crash rewrites the same objects), another installation, same AE title and same input,
derives others (dicom_node/outputs/uids.py)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, Comprehensive3DSRStorage
from sqlalchemy import select

from dicom_node.config import ConfigError, InferenceSettings, Settings, load_settings
from dicom_node.inference_jobs import InferenceModels
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.jobs import OUTPUTS_JOB
from dicom_node.models import Instance
from dicom_node.node import Node
from dicom_node.output_jobs import OutputJobs
from dicom_node.outputs.uids import INSTALLATION_SECRET_FILE, MAX_UID_LENGTH, InstallationUids
from dicom_node.part10 import encoded_dataset
from dicom_node.synthetic import synthetic_dx
from tests.dicom_peers import free_port
from tests.serve_process import DEMO_CARDS

AE_TITLE = "SAMENAME"

# --- the derivation ----------------------------------------------------------------------------------------------


def test_the_same_parts_give_the_same_uid_and_another_secret_another_uid() -> None:
    first, second = InstallationUids(b"\x01" * 32), InstallationUids(b"\x02" * 32)
    assert first.derived("1.2.3", "sc", 7) == InstallationUids(b"\x01" * 32).derived("1.2.3", "sc", 7)
    assert first.derived("1.2.3", "sc", 7) != second.derived("1.2.3", "sc", 7)
    assert first.derived("1.2.3", "sc", 7) != first.derived("1.2.3", "sc", 8)
    assert first.derived("ab", "c") != first.derived("a", "bc"), "the parts are kept apart"
    assert first.device_uid != second.device_uid


@pytest.mark.parametrize("root", [None, "1.2.840.99999", "1.3.6.1.4.1.999999.12345678.1234"])  # 32: the longest
def test_every_uid_is_valid_and_under_its_root(root: str | None) -> None:
    uids = InstallationUids(b"\x03" * 32, root)
    for parts in [("device",), ("1.2.826.0.1.3680043.8.498.1", "report", 1, 2, 3), ("x" * 200,)]:
        uid = uids.derived(*parts)
        assert UID(uid).is_valid and len(uid) <= MAX_UID_LENGTH, uid
        if root is None:
            prefix, _, number = uid.partition("2.25.")
            assert prefix == "" and int(number) < 2**128, f"{uid}: 2.25 and a UUID's integer (PS3.5 B.2)"
        else:
            assert uid.startswith(root + ".") and len(uid) == MAX_UID_LENGTH, uid


def test_the_installation_secret_is_made_once_for_the_node_only(tmp_path: Path) -> None:
    first = InstallationUids.of_installation(tmp_path / "storage")
    again = InstallationUids.of_installation(tmp_path / "storage")
    assert first == again
    secret = tmp_path / "storage" / INSTALLATION_SECRET_FILE
    assert len(secret.read_bytes()) == 32
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert InstallationUids.of_installation(tmp_path / "other") != first
    assert "secret" not in repr(first) and first.secret.hex() not in repr(first), "kept out of logs"


def test_a_damaged_secret_is_refused_not_used(tmp_path: Path) -> None:
    (tmp_path / INSTALLATION_SECRET_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(OSError, match="5 bytes"):
        InstallationUids.of_installation(tmp_path)


@pytest.mark.parametrize("root", ["1.2.840.", "1.02.3", "1", "1.2.a", "1.3.6.1.4.1.999999.12345678.12345", "2.25.1"])
def test_a_bad_uid_root_stops_start_up_with_one_line(tmp_path: Path, root: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f'dicom:\n  uid_root: "{root}"\n')
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert "uid_root" in str(error.value) and "\n" not in str(error.value)


# --- nodes -------------------------------------------------------------------------------------------------------


def _node(storage: Path, onnx_graphs: Path, duplicate_policy: str = "keep_first") -> Node:
    settings = Settings(
        dicom={"ae_title": AE_TITLE, "host": "127.0.0.1", "port": free_port(), "duplicate_policy": duplicate_policy},
        storage={"root": storage},
        workers={"count": 0},
        mlflow={"enabled": False},
    )
    return Node(settings, models=InferenceModels.load(InferenceSettings(**DEMO_CARDS), onnx_graphs))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.dcm"
    synthetic_dx("UIDS-1", side=128, seed=11).save_as(path, enforce_file_format=True)
    return path


def _receive_and_infer(node: Node, source: Path) -> None:
    node.ingestor.ingest(read_file_meta_info(source), [encoded_dataset(source)], "MODALITY")
    assert node.workers.handlers[INFERENCE_JOB](node.queue.claim_batch([INFERENCE_JOB], 8)) == {}


def _written(node: Node) -> dict[str, set[str]]:
    """The UIDs of the objects ``node`` wrote and indexed, read from their files, by kind."""
    uids: dict[str, set[str]] = {"SOPInstanceUID": set(), "SeriesInstanceUID": set(), "device": set()}
    with node.sessions() as session:
        paths = session.scalars(select(Instance.path).where(Instance.source_instance_pk.is_not(None))).all()
    assert paths, "the node wrote no objects"
    for path in paths:
        dataset = pydicom.dcmread(node.store.absolute(path))
        uids["SOPInstanceUID"].add(dataset.SOPInstanceUID)
        uids["SeriesInstanceUID"].add(dataset.SeriesInstanceUID)
        if "DeviceUID" in dataset:
            uids["device"].add(dataset.DeviceUID)
    return uids


def _run_all(node: Node) -> None:
    while node.workers.run_once():
        pass


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.engine.dispose()


def test_two_installations_with_one_ae_title_write_disjoint_uids(
    tmp_path: Path, source: Path, onnx_graphs: Path, nodes: list[Node]
) -> None:
    written = []
    for name in ("a", "b"):
        node = _node(tmp_path / name, onnx_graphs)
        nodes.append(node)
        _receive_and_infer(node, source)
        _run_all(node)
        written.append(_written(node))
    for kind in written[0]:
        assert written[0][kind] and not written[0][kind] & written[1][kind], kind


def test_an_outputs_job_run_again_after_a_crash_rewrites_the_same_objects(
    tmp_path: Path, source: Path, onnx_graphs: Path, nodes: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after writing its files and before indexing them: the restarted node (a new process, which reads
    the installation's secret again) writes objects with the very same UIDs, over the same files."""
    first = _node(tmp_path / "storage", onnx_graphs)
    nodes.append(first)
    _receive_and_infer(first, source)
    before_the_crash: list[str] = []
    write = OutputJobs._write

    def write_then_die(self: OutputJobs, dataset: pydicom.Dataset):  # noqa: ANN202
        before_the_crash.append(dataset.SOPInstanceUID)
        return write(self, dataset)

    def die(*_: object) -> None:
        raise RuntimeError("killed before the objects were indexed")

    monkeypatch.setattr(OutputJobs, "_write", write_then_die)
    monkeypatch.setattr(OutputJobs, "_index", die)
    assert first.workers.handlers[OUTPUTS_JOB](first.queue.claim_batch([OUTPUTS_JOB], 8))  # the job failed
    monkeypatch.undo()
    first.engine.dispose()

    restarted = _node(tmp_path / "storage", onnx_graphs)
    nodes.append(restarted)
    restarted.queue.recover_interrupted()
    _run_all(restarted)
    assert before_the_crash and sorted(_written(restarted)["SOPInstanceUID"]) == sorted(before_the_crash)
    files = {path for path in (tmp_path / "storage" / "patients").rglob("*.dcm")}
    assert len(files) == len(before_the_crash) + 1, "the source and one file per object: none left over"


def test_a_report_made_again_for_a_replaced_image_names_the_one_it_supersedes(
    tmp_path: Path, source: Path, onnx_graphs: Path, nodes: list[Node]
) -> None:
    node = _node(tmp_path / "storage", onnx_graphs, duplicate_policy="replace")
    nodes.append(node)
    _receive_and_infer(node, source)
    _run_all(node)
    [first] = _reports(node)
    first_bytes = node.store.absolute(first).read_bytes()

    _receive_and_infer(node, source)  # the same image again, replacing the first copy: new results
    _run_all(node)
    older, newer = _reports(node)
    assert older == first and node.store.absolute(first).read_bytes() == first_bytes, "the older report is kept as is"
    superseded = pydicom.dcmread(node.store.absolute(first))
    report = pydicom.dcmread(node.store.absolute(newer))
    assert report.SOPInstanceUID != superseded.SOPInstanceUID
    [study] = report.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [named] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID, named.ReferencedSOPInstanceUID) == (
        superseded.StudyInstanceUID,
        superseded.SeriesInstanceUID,
        superseded.SOPInstanceUID,
    )
    assert "PredecessorDocumentsSequence" not in superseded


def _reports(node: Node) -> list[str]:
    """The paths of the structured reports ``node`` wrote, oldest first."""
    with node.sessions() as session:
        return list(
            session.scalars(
                select(Instance.path).where(Instance.sop_class_uid == Comprehensive3DSRStorage).order_by(Instance.id)
            )
        )
