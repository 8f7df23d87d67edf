"""Crash safety: ``dicom-node serve`` killed (SIGKILL) while images stream in, jobs run and outputs go out to a real
Orthanc and to a recording peer, then started again on the same storage and index, on SQLite and PostgreSQL.

Every image that was acknowledged is kept and indexed, is processed exactly once (one set of results, one set of
Secondary Captures and structured report), and each output reaches each destination: exactly once, but for the
one object that may have been on the wire at the kill (a C-STORE whose response was lost is sent again, as any
C-STORE retry). Interrupted jobs and deliveries resume by themselves.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import InferenceSettings, Settings
from dicom_node.database import create_index_engine, session_factory
from dicom_node.inference_jobs import InferenceModels
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.jobs import OUTPUTS_JOB
from dicom_node.models import Delivery, DeliveryState, InferenceResult, Instance, Job, JobState
from dicom_node.node import Node
from dicom_node.part10 import encoded_dataset
from dicom_node.status import StoreStatus
from dicom_node.synthetic import synthetic_dx
from tests.dicom_peers import NODE_AE, free_port
from tests.orthanc import Orthanc
from tests.postgres import migrated_database
from tests.serve_process import DEMO_CARDS, ServeProcess, with_onnx_graphs

IMAGES = 100
SENDERS = 4
SEND_PAUSE = 0.3  # seconds between two images of a sender: the stream lasts while the first outputs go out
# A hand gets a Secondary Capture per sex model and a structured report. The reports go to Orthanc and to the
# recorder, which counts deliveries; the Secondary Captures stay in the node, where their duplicates would show
# (sending is about 0.1 s an object here: this keeps the test short; tests/test_results_to_pacs.py sends them).
DESTINATIONS_BY_CLASS = {SecondaryCaptureImageStorage: (), Comprehensive3DSRStorage: ("pacs", "recorder")}
OUTPUT_CLASSES = sorted([SecondaryCaptureImageStorage] * 2 + [Comprehensive3DSRStorage])
OUTPUTS_PER_IMAGE = len(OUTPUT_CLASSES)
DELIVERIES_PER_IMAGE = sum(len(DESTINATIONS_BY_CLASS[sop_class]) for sop_class in OUTPUT_CLASSES)
RECORDER_AE = "RECORDER"
_databases = itertools.count()


class RecordingPeer:
    """A C-STORE SCP (pynetdicom) that accepts the node's objects and keeps every SOP Instance UID it received,
    in order, duplicates included."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        ae = AE(ae_title=RECORDER_AE)
        for sop_class in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage):
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: Event) -> int:
        self.received.append(event.request.AffectedSOPInstanceUID)
        return StoreStatus.SUCCESS


@dataclass
class Acknowledgements:
    """The statuses the node answered, by SOP Instance UID (the last one), as a modality records them."""

    statuses: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, sop_instance_uid: str, status: int) -> None:
        with self.lock:
            self.statuses[sop_instance_uid] = status

    def successful(self) -> set[str]:
        with self.lock:
            return {uid for uid, status in self.statuses.items() if status == StoreStatus.SUCCESS}


def stream(port: int, datasets: Sequence[Dataset], acknowledgements: Acknowledgements, pause: float = 0.0) -> None:
    """C-STORE ``datasets`` in one association, ``pause`` seconds apart, recording each answer; stop where the
    association breaks (the node was killed)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not association.is_established:
        return
    try:
        for ds in datasets:
            try:
                response = association.send_c_store(ds)
            except RuntimeError:  # the association is gone
                return
            if "Status" not in response:  # no answer: aborted or timed out
                return
            acknowledgements.record(ds.SOPInstanceUID, int(response.Status))
            time.sleep(pause)
    finally:
        if association.is_established:
            association.release()


def in_threads(target: Callable[..., None], argument_lists: Sequence[tuple]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=arguments, daemon=True) for arguments in argument_lists]
    for thread in threads:
        thread.start()
    return threads


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The index of the node: a SQLite file under the test's storage, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'storage' / 'index.sqlite3'}"
    server = request.getfixturevalue("postgres_server")
    return migrated_database(server, f"crash_{next(_databases)}")


@pytest.fixture
def recorder() -> Iterator[RecordingPeer]:
    peer = RecordingPeer()
    yield peer
    peer.server.shutdown()


def node_environment(database_url: str, pacs: Orthanc, recorder: RecordingPeer) -> dict[str, str]:
    """Two workers, quick polls and retries, the reports to Orthanc and to the recorder, no MLflow."""
    destinations = [
        {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port},
        {"name": "recorder", "ae_title": RECORDER_AE, "host": "127.0.0.1", "port": recorder.port},
    ]
    rules = [
        {"calling_ae": "", "kinds": [kind], "destinations": DESTINATIONS_BY_CLASS[sop_class]}
        for kind, sop_class in (
            ("secondary_capture", SecondaryCaptureImageStorage),
            ("structured_report", Comprehensive3DSRStorage),
        )
        if DESTINATIONS_BY_CLASS[sop_class]
    ]
    return {
        "DICOM_NODE_DATABASE__URL": database_url,
        "DICOM_NODE_WORKERS__COUNT": "2",
        "DICOM_NODE_WORKERS__POLL_INTERVAL": "0.1",
        "DICOM_NODE_WORKERS__RETRY_BACKOFF": "0.5",
        "DICOM_NODE_INFERENCE__BATCH_SIZE": "4",
        "DICOM_NODE_DESTINATIONS": json.dumps(destinations),
        "DICOM_NODE_DELIVERY__RULES": json.dumps(rules),
        # the maps would add two full-size objects per image; tests/test_output_uids.py runs their crash case
        "DICOM_NODE_OUTPUTS__PARAMETRIC_MAPS": "false",
        "DICOM_NODE_DELIVERY__POLL_INTERVAL": "0.1",
        "DICOM_NODE_DELIVERY__RETRY_BACKOFF": "0.5",
        "DICOM_NODE_DELIVERY__MAX_BACKOFF": "1",
        "DICOM_NODE_DELIVERY__OBJECTS_PER_ASSOCIATION": "10",
        "DICOM_NODE_MLFLOW__ENABLED": "false",
    }


def kill_while_busy(serve: ServeProcess, senders: list[threading.Thread], timeout: float = 60) -> None:
    """SIGKILL the node as soon as jobs are running, outputs have been delivered and more are queued, with
    images still streaming in."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = serve.health()[1]
        jobs, deliveries = health["jobs"], health["deliveries"]
        streaming = any(sender.is_alive() for sender in senders)
        if jobs.get("running") and deliveries.get("sent") and deliveries.get("pending") and streaming:
            serve.process.kill()
            serve.process.wait()
            return
        time.sleep(0.05)
    raise TimeoutError(f"no moment to kill the node: {serve.health()[1]}")


@dataclass(frozen=True)
class AtTheKill:
    """What the index held when the node died."""

    running_jobs: int
    in_flight: dict[str, set[str]]  # SOP Instance UIDs of deliveries being sent, by destination


@contextmanager
def index_session(database_url: str) -> Iterator[Session]:
    """A session on the index of the node, from the test's side."""
    engine = create_index_engine(database_url)
    try:
        with session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def instance_of(session: Session, sop_instance_uid: str) -> Instance:
    return session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).one()


def at_the_kill(database_url: str) -> AtTheKill:
    with index_session(database_url) as session:
        running = session.scalars(select(Job.id).where(Job.state == JobState.RUNNING)).all()
        sending = session.execute(
            select(Delivery.destination, Instance.sop_instance_uid)
            .join(Instance, Delivery.instance_pk == Instance.id)
            .where(Delivery.state == DeliveryState.SENDING)
        ).all()
    in_flight: dict[str, set[str]] = collections.defaultdict(set)
    for destination, sop_instance_uid in sending:
        in_flight[destination].add(sop_instance_uid)
    return AtTheKill(len(running), dict(in_flight))


def wait_until_all_delivered(serve: ServeProcess, timeout: float = 150) -> None:
    """Until every job is done and every delivery sent; fails at once on a failed job or delivery."""
    expected_jobs, expected_deliveries = {"done": 2 * IMAGES}, {"sent": IMAGES * DELIVERIES_PER_IMAGE}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = serve.health()[1]
        assert "failed" not in health["jobs"] and "failed" not in health["deliveries"], health
        if health["jobs"] == expected_jobs and health["deliveries"] == expected_deliveries:
            return
        time.sleep(0.2)
    raise TimeoutError(f"not all processed and delivered: {serve.health()[1]}")


def orthanc_instances_by_series(pacs: Orthanc) -> dict[str, list[str]]:
    """The SOP Instance UIDs Orthanc holds, by SeriesInstanceUID."""
    held: dict[str, list[str]] = {}
    for series in pacs.get("/series?expand"):
        uids = [
            pacs.get(f"/instances/{instance}")["MainDicomTags"]["SOPInstanceUID"] for instance in series["Instances"]
        ]
        held[series["MainDicomTags"]["SeriesInstanceUID"]] = uids
    return held


def test_a_node_killed_midstream_keeps_every_acknowledged_image_and_processes_and_delivers_each_once(
    tmp_path: Path, database_url: str, pacs: Orthanc, recorder: RecordingPeer, onnx_graphs: Path
) -> None:
    storage = with_onnx_graphs(tmp_path / "storage", onnx_graphs)
    environment = node_environment(database_url, pacs, recorder)
    images = [synthetic_dx(f"CRASH-{number:03d}", side=128, seed=number) for number in range(IMAGES)]
    acknowledgements = Acknowledgements()

    first = ServeProcess(storage, environment=environment)
    try:
        first.wait_until_ready()
        portions = [(first.dicom_port, images[n::SENDERS], acknowledgements, SEND_PAUSE) for n in range(SENDERS)]
        senders = in_threads(stream, portions)
        kill_while_busy(first, senders)
        for sender in senders:
            sender.join(30)
    finally:
        first.ensure_stopped()
    acknowledged_before = acknowledgements.successful()
    killed = at_the_kill(database_url)
    # health showed running jobs just before the kill; one may have finished in between, but then a delivery was
    # on the wire: either way the kill cut a stage short
    assert killed.running_jobs or killed.in_flight, "the kill interrupted running jobs or deliveries"
    assert 0 < len(acknowledged_before) < IMAGES, "the kill came while images streamed in"

    again = ServeProcess(storage, environment=environment)
    try:
        again.wait_until_ready()
        # as a modality does: what was not acknowledged is sent again (some of it may have been kept already)
        unacknowledged = [ds for ds in images if ds.SOPInstanceUID not in acknowledged_before]
        stream(again.dicom_port, unacknowledged, acknowledgements)
        assert acknowledgements.successful() == {ds.SOPInstanceUID for ds in images}
        wait_until_all_delivered(again)
        returncode, output = again.stop()
    finally:
        again.ensure_stopped()
    assert returncode == 0, output

    outputs = check_the_index(database_url, storage, images)
    check_the_destinations(pacs, recorder, outputs, killed)


class Output(NamedTuple):
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str


def check_the_index(
    database_url: str,
    storage: Path,
    images: Sequence[Dataset],
    destinations_by_class: dict[str, tuple[str, ...]] = DESTINATIONS_BY_CLASS,
) -> list[Output]:
    """Each image stored, readable and indexed, with one job of each kind, one set of results and one set of
    outputs, each output with one sent delivery per destination. Returns the outputs."""
    outputs: list[Output] = []
    with index_session(database_url) as session:
        for ds in images:
            instance = instance_of(session, ds.SOPInstanceUID)
            assert pydicom.dcmread(storage / instance.path).SOPInstanceUID == ds.SOPInstanceUID
            jobs = session.execute(select(Job.kind, Job.state).where(Job.instance_pk == instance.id)).all()
            assert sorted(jobs) == [(INFERENCE_JOB, JobState.DONE), (OUTPUTS_JOB, JobState.DONE)]
            results = session.execute(
                select(InferenceResult.task, InferenceResult.output).where(InferenceResult.instance_pk == instance.id)
            ).all()
            assert sorted(results) == [("bone_age", "female"), ("bone_age", "male")]
            written = session.scalars(select(Instance).where(Instance.source_instance_pk == instance.id)).all()
            assert sorted(output.sop_class_uid for output in written) == OUTPUT_CLASSES, "one set of outputs per image"
            for output in written:
                assert pydicom.dcmread(storage / output.path).SOPInstanceUID == output.sop_instance_uid
                deliveries = session.execute(
                    select(Delivery.destination, Delivery.state).where(Delivery.instance_pk == output.id)
                ).all()
                destinations = destinations_by_class[output.sop_class_uid]
                assert sorted(deliveries) == [(name, DeliveryState.SENT) for name in destinations]
                outputs.append(Output(output.sop_instance_uid, output.series.series_instance_uid, output.sop_class_uid))
    return outputs


def check_the_destinations(pacs: Orthanc, recorder: RecordingPeer, outputs: list[Output], killed: AtTheKill) -> None:
    """Orthanc holds exactly the outputs sent to it, series by series; the recorder got each of its own once, but
    for at most the one object on the wire at the kill."""
    expected_series: dict[str, list[str]] = collections.defaultdict(list)
    for output in (output for output in outputs if "pacs" in DESTINATIONS_BY_CLASS[output.sop_class_uid]):
        expected_series[output.series_instance_uid].append(output.sop_instance_uid)
    held = orthanc_instances_by_series(pacs)
    assert {series: sorted(uids) for series, uids in held.items()} == {
        series: sorted(uids) for series, uids in expected_series.items()
    }

    received = collections.Counter(recorder.received)
    assert set(received) == {
        output.sop_instance_uid for output in outputs if "recorder" in DESTINATIONS_BY_CLASS[output.sop_class_uid]
    }
    sent_twice = {uid for uid, count in received.items() if count > 1}
    assert sent_twice <= killed.in_flight.get("recorder", set()), "only a delivery in flight at the kill goes twice"
    assert sum(received.values()) - len(received) <= 1, "one object at most was on the wire at the kill"


@pytest.fixture
def node_without_workers(tmp_path: Path, onnx_graphs: Path) -> Iterator[Node]:
    settings = Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path / "storage"},
        workers={"count": 0},
        destinations=[{"name": "recorder", "ae_title": RECORDER_AE, "host": "127.0.0.1", "port": free_port()}],
        delivery={"default_destination": "recorder"},
        outputs={"parametric_maps": False},  # as in node_environment
    )
    node = Node(settings, models=InferenceModels.load(InferenceSettings(**DEMO_CARDS), onnx_graphs))
    yield node
    node.engine.dispose()


def test_a_kill_after_a_job_committed_its_effects_leaves_one_set_of_outputs(
    node_without_workers: Node, tmp_path: Path
) -> None:
    """The window between a handler's commit and the worker marking the job done: a process killed there must
    not run the job again, for an inference run again gives new result ids and so a second set of outputs."""
    node = node_without_workers
    sources = []
    for number in range(2):  # two, so that results recorded again cannot happen to get the same ids
        path = tmp_path / f"window-{number}.dcm"
        synthetic_dx(f"WINDOW-{number}", side=128, seed=number).save_as(path, enforce_file_format=True)
        sources.append(node.ingestor.ingest(read_file_meta_info(path), [encoded_dataset(path)], "MODALITY"))
    inference = node.queue.claim_batch([INFERENCE_JOB], 8)
    assert node.workers.handlers[INFERENCE_JOB](inference) == {}  # killed after this, before the jobs are marked done
    outputs = node.queue.claim_batch([OUTPUTS_JOB], 8)  # another worker ran the outputs jobs before the kill
    assert node.workers.handlers[OUTPUTS_JOB](outputs) == {}  # and was killed before it marked them done
    node.queue.recover_interrupted()  # the restart
    while node.workers.run_once():
        pass
    with node.sessions() as session:
        for source in sources:
            instance = instance_of(session, source.sop_instance_uid)
            written = session.scalars(select(Instance.id).where(Instance.source_instance_pk == instance.id)).all()
            states = session.scalars(select(Job.state).where(Job.instance_pk == instance.id)).all()
            assert len(written) == OUTPUTS_PER_IMAGE, "one set of outputs per image"
            assert states == [JobState.DONE, JobState.DONE]
