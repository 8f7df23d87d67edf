"""Faults the node meets in a hospital, each made real where it can be: a model file missing at start, the MLflow
server stopped while the node runs, another connection holding the SQLite index's write lock, a disk that fills up
while an image is written, a destination down for longer than a few retries. In every case the sender of an image
gets a clear status, nothing half-written stays, and nothing acknowledged is lost."""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url

from dicom_node.config import InferenceSettings, Settings
from dicom_node.delivery import count_by_state as deliveries_by_state
from dicom_node.inference_jobs import InferenceModels
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.jobs import ClaimedJob
from dicom_node.models import Delivery, DeliveryState, InferenceResult, Job, JobState, TrackingState
from dicom_node.node import Node
from dicom_node.status import StoreStatus
from dicom_node.synthetic import synthetic_dx
from dicom_node.tracking import RUN_KEY_TAG
from tests.conftest import files_under_patients, running_node, stored_instances, stored_jobs
from tests.dicom_peers import free_port, send_datasets
from tests.serve_process import REPO, ServeProcess
from tests.test_delivery import delivery, queued_delivery
from tests.test_orthanc_peer import storescp
from tests.test_tracking import all_logged, mlflow_server, tracking_rows, wait_for
from web.app import create_app
from web.dependencies import WebContext

pytestmark = pytest.mark.slow

MISSING_WEIGHTS = "missing-foot.pt"


@pytest.fixture(scope="module")
def models() -> InferenceModels:
    return InferenceModels.load(InferenceSettings(runtime="torch"))


def jobs_by_state(node: Node) -> dict[JobState, int]:
    states: dict[JobState, int] = {}
    for job in stored_jobs(node):
        states[job.state] = states.get(job.state, 0) + 1
    return states


# 1. A model file missing at start


def card_with_missing_weights(directory: Path) -> Path:
    """A copy of the foot model's card whose weights file does not exist."""
    card = directory / "foot.yaml"
    text = (REPO / "models" / "hallux-valgus-demo.yaml").read_text()
    card.write_text(text.replace("path: hallux-valgus-demo.pt", f"path: {MISSING_WEIGHTS}", 1))
    return card


def test_a_missing_model_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    card = card_with_missing_weights(tmp_path)
    process = ServeProcess(tmp_path / "storage", environment={"DICOM_NODE_INFERENCE__HALLUX_VALGUS_CARD": str(card)})
    returncode, output = process.wait_for_exit()
    process.ensure_stopped()
    assert returncode == 1
    assert output.strip().splitlines() == [f"dicom-node: {card}: weights file {tmp_path / MISSING_WEIGHTS} is missing"]
    with socket.socket() as probe:  # nothing listens: the node did not start without its model
        assert probe.connect_ex(("127.0.0.1", process.dicom_port)) != 0


def health_answer(process: ServeProcess, timeout: float = 60) -> tuple[int, dict]:
    """``/health`` once the served node answers it, whatever its status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.process.poll() is None, f"serve exited early:\n{process.output()}"
        try:
            return process.health()
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the node did not answer /health")


def waiting_notes(storage: Path) -> list[str]:
    engine = create_engine(f"sqlite:///{storage / 'index.sqlite3'}")
    try:
        with engine.connect() as connection:
            return list(connection.scalars(select(Job.note).where(Job.state == JobState.WAITING)))
    finally:
        engine.dispose()


def test_degraded_start_without_a_model_stores_images_and_its_jobs_run_once_the_model_is_back(tmp_path: Path) -> None:
    card = card_with_missing_weights(tmp_path)
    storage = tmp_path / "storage"
    quick = {"DICOM_NODE_INFERENCE__RUNTIME": "torch", "DICOM_NODE_MLFLOW__ENABLED": "false"}
    degraded = ServeProcess(
        storage,
        environment=quick
        | {"DICOM_NODE_INFERENCE__HALLUX_VALGUS_CARD": str(card), "DICOM_NODE_INFERENCE__ON_MISSING_MODEL": "degraded"},
    )
    try:
        status, health = health_answer(degraded)
        assert (status, health["status"]) == (503, "degraded")
        [reason] = health["missing_models"].values()
        assert list(health["missing_models"]) == ["hallux_valgus"] and f"{MISSING_WEIGHTS} is missing" in reason
        assert [model["name"] for model in health["models"]] == ["bone-age-demo"]

        foot, hand = synthetic_dx("DEGRADED-FOOT", body_part="FOOT", side=256), synthetic_dx("DEGRADED-HAND", side=256)
        responses = send_datasets(degraded.dicom_port, [foot, hand])
        assert [response.Status for response in responses] == [StoreStatus.SUCCESS] * 2

        def settled() -> dict[str, int] | None:
            jobs = degraded.health()[1]["jobs"]
            return jobs if jobs == {"done": 2, "waiting": 1} else None

        wait_for(settled, timeout=90, what="the hand processed and the foot waiting")
        [note] = waiting_notes(storage)
        assert note.startswith("waiting for the hallux_valgus model: ") and f"{MISSING_WEIGHTS} is missing" in note
        returncode, output = degraded.stop()
    finally:
        degraded.ensure_stopped()
    assert returncode == 0, output
    assert "started without the hallux_valgus model" in output and "Traceback" not in output

    restored = ServeProcess(storage, environment=quick)
    try:
        restored.wait_until_ready()
        assert restored.jobs_when_finished(4) == {"done": 4}, "the foot's inference and outputs ran after the restart"
        assert restored.health()[1]["missing_models"] == {}
        returncode, output = restored.stop()
    finally:
        restored.ensure_stopped()
    assert returncode == 0, output


# 2. The MLflow server stopped while the node runs


def test_with_the_mlflow_server_stopped_images_are_processed_and_delivered_and_the_backlog_is_logged_once(
    tmp_path: Path, models: InferenceModels
) -> None:
    mlflow_port, pacs_port = free_port(), free_port()
    settings = Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path / "storage"},
        workers={"count": 1, "poll_interval": 0.05},
        inference={"runtime": "torch"},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        delivery={"default_destination": "pacs", "poll_interval": 0.1},
        mlflow={
            "tracking_uri": f"http://127.0.0.1:{mlflow_port}",
            "poll_interval": 0.1,
            "retry_backoff": 0.1,
            "max_backoff": 0.5,
        },
    )
    server_root = tmp_path / "mlflow-server"
    with storescp(pacs_port, tmp_path / "pacs", "PACS") as pacs, running_node(settings, models) as node:
        web = TestClient(create_app(WebContext(settings, node.sessions, lambda: node.scp.listening, node=node)))
        with mlflow_server(server_root, mlflow_port):
            assert send_datasets(settings.dicom.port, [synthetic_dx("MLFLOW-1", side=256)])[0].Status == 0
            [before] = wait_for(lambda: all_logged(node, 1), what="the first run logged")

        later = [synthetic_dx("MLFLOW-2", side=256, seed=2), synthetic_dx("MLFLOW-3", side=256, seed=3)]
        assert [response.Status for response in send_datasets(settings.dicom.port, later)] == [0, 0]
        wait_for(lambda: backlog_failing(node, 2), what="two runs failing to log while the server is down")
        wait_for(lambda: delivered(node, 3 * 5), what="every object delivered: 2 captures, 2 maps, a report per hand")
        assert jobs_by_state(node) == {JobState.DONE: 6}, "inference and outputs of each image"
        assert len(list(pacs.iterdir())) == 3 * 5
        response = web.get("/health")
        assert (response.status_code, response.json()["status"]) == (200, "ok"), "MLflow is not a required part"
        mlflow = response.json()["mlflow"]
        assert not mlflow["ok"] and mlflow["detail"].startswith("2 runs waiting to be logged; logging fails (")

        with mlflow_server(server_root, mlflow_port):  # the same store, back
            rows = wait_for(lambda: all_logged(node, 3), what="the backlog logged")
            assert web.get("/health").json()["mlflow"] == {"ok": True, "detail": "0 runs waiting to be logged"}
            client = MlflowClient(settings.mlflow.tracking_uri)
            experiment = client.get_experiment_by_name(settings.mlflow.experiment)
            runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(row.run_id for row in rows), "one run per instance"
    assert len({run.data.tags[RUN_KEY_TAG] for run in runs}) == 3
    assert rows[0].run_id == before.run_id, "the run logged before the stop is not logged again"


def backlog_failing(node: Node, count: int) -> bool:
    rows = [row for row in tracking_rows(node) if row.state == TrackingState.PENDING]
    return len(rows) == count and all(row.attempts >= 2 and row.last_error for row in rows)


def delivered(node: Node, count: int) -> bool:
    with node.sessions() as session:
        return deliveries_by_state(session) == {DeliveryState.SENT: count}


# 3. The SQLite index locked by another connection


class IndexLock:
    """Another connection's write lock on a node's SQLite index (BEGIN EXCLUSIVE), as a second process or a backup
    tool takes it, until :meth:`release`."""

    def __init__(self, node: Node) -> None:
        path = make_url(node.settings.database.url).database
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.connection.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.connection.execute("ROLLBACK")
        self.connection.close()


def locked_index_settings(tmp_path: Path, **workers: object) -> Settings:
    return Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path / "storage"},
        database={"busy_timeout": 0.5},
        workers={"poll_interval": 0.05, "retry_backoff": 0.1, **workers},
        inference={"runtime": "torch"},
        mlflow={"enabled": False},
    )


def test_a_c_store_meeting_a_locked_index_is_refused_with_nothing_kept_and_a_resend_is_stored_once(
    tmp_path: Path,
) -> None:
    ds = synthetic_dx("LOCKED-INDEX", side=128)
    with running_node(locked_index_settings(tmp_path, count=0)) as node:
        lock = IndexLock(node)
        try:
            started = time.monotonic()
            [refused] = send_datasets(node.settings.dicom.port, [ds])
            assert time.monotonic() - started < 5, "answered after the busy timeout, within the sender's timeout"
        finally:
            lock.release()
        assert refused.Status == StoreStatus.OUT_OF_RESOURCES and refused.ErrorComment == "index unavailable, try again"
        assert stored_instances(node) == [] and stored_jobs(node) == []
        assert files_under_patients(node) == [] and list(node.store.incoming.iterdir()) == []

        responses = send_datasets(node.settings.dicom.port, [ds, ds])
        assert [response.Status for response in responses] == [StoreStatus.SUCCESS] * 2
        assert len(stored_instances(node)) == len(stored_jobs(node)) == len(files_under_patients(node)) == 1


def test_a_worker_meeting_a_locked_index_keeps_running_and_its_job_completes_after_the_release(
    tmp_path: Path, models: InferenceModels
) -> None:
    settings = locked_index_settings(tmp_path, count=1)
    node = Node(settings, models=models)
    infer = node.workers.handlers[INFERENCE_JOB]
    locks: list[IndexLock] = []

    def lock_while_the_first_batch_runs(jobs: list[ClaimedJob]) -> Mapping[int, Exception]:
        """The real handler; on the first batch, another connection holds the write lock while it runs and for 1 s
        after, while the worker tries to record the outcome."""
        if locks:
            return infer(jobs)
        locks.append(IndexLock(node))
        try:
            return infer(jobs)
        finally:
            threading.Timer(1.0, locks[0].release).start()

    node.workers.handlers[INFERENCE_JOB] = lock_while_the_first_batch_runs
    node.start()
    try:
        assert send_datasets(settings.dicom.port, [synthetic_dx("LOCKED-WORKER", side=256)])[0].Status == 0
        wait_for(lambda: jobs_by_state(node) == {JobState.DONE: 2}, timeout=60, what="inference and outputs done")
        assert [thread.name for thread in threading.enumerate() if thread.name == "worker-0"] == ["worker-0"]
        inference = next(job for job in stored_jobs(node) if job.kind == INFERENCE_JOB)
        assert inference.attempts == 2, "the attempt that met the lock was recorded as failed, then retried"
        with node.sessions() as session:
            assert len(session.scalars(select(InferenceResult)).all()) == 2, "a hand: male and female, once"
    finally:
        node.stop()


# 4. The disk filling up while an image is written


class FillingDisk:
    """A file that takes ``free`` bytes, then fails as a full disk does (ENOSPC); the bytes before stay written."""

    def __init__(self, file, free: int) -> None:
        self.file = file
        self.free = free

    def write(self, data: bytes | memoryview) -> int:
        taken = self.file.write(data[: self.free])
        self.free -= taken
        if taken < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return taken

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> FillingDisk:
        return self

    def __exit__(self, *exception: object) -> None:
        self.file.close()


def test_a_disk_that_fills_up_while_an_image_is_written_leaves_nothing_half_written(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial: list[Path] = []
    real_fdopen = os.fdopen

    def fdopen(descriptor: int, *args: object, **kwargs: object) -> FillingDisk:
        partial.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        return FillingDisk(real_fdopen(descriptor, *args, **kwargs), free=64 * 1024)

    monkeypatch.setattr("dicom_node.storage.os.fdopen", fdopen)
    ds = synthetic_dx("DISK-FULL", side=512)
    [refused] = send_datasets(node.settings.dicom.port, [ds])
    monkeypatch.undo()

    assert refused.Status == StoreStatus.OUT_OF_RESOURCES
    assert refused.ErrorComment == "cannot write to storage: No space left on device"
    assert [path.parent for path in partial] == [node.store.incoming], "the write began under incoming/"
    assert not partial[0].exists() and list(node.store.incoming.iterdir()) == []
    assert files_under_patients(node) == [] and stored_instances(node) == [] and stored_jobs(node) == []

    [stored] = send_datasets(node.settings.dicom.port, [ds])
    assert stored.Status == StoreStatus.SUCCESS and len(files_under_patients(node)) == 1


# 5. A destination down for longer than a few retries


def test_a_destination_that_comes_back_after_its_retries_began_gets_the_object_once(tmp_path: Path) -> None:
    peer_port = free_port()
    settings = Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path / "storage"},
        workers={"count": 0},
        destinations=[{"name": "peer", "ae_title": "PEER", "host": "127.0.0.1", "port": peer_port}],
        delivery={"max_attempts": 30, "retry_backoff": 0.1, "max_backoff": 0.4, "poll_interval": 0.05},
        mlflow={"enabled": False},
    )
    node = Node(settings)
    delivery_id = queued_delivery(node, tmp_path)
    node.start()
    try:
        wait_for(lambda: delivery(node, delivery_id).attempts >= 3, what="attempts while the destination is down")
        down = delivery(node, delivery_id)
        assert down.state in (DeliveryState.PENDING, DeliveryState.SENDING) and down.last_status is None
        with storescp(peer_port, tmp_path / "peer", "PEER") as received:

            def sent_row() -> Delivery | None:
                row = delivery(node, delivery_id)
                return row if row.state == DeliveryState.SENT else None

            sent = wait_for(sent_row, what="the object delivered once the destination is back")
            time.sleep(1.0)  # longer than the largest backoff: a duplicate would have been sent by now
            assert len(list(received.iterdir())) == 1
    finally:
        node.stop()
    assert sent.attempts > down.attempts and sent.last_error is None and sent.last_status == 0
