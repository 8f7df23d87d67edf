"""MLflow tracking of every inference, against real MLflow stores: a run per processed instance with its params,
metrics and artifacts and no patient data; a run found again after a crash is adopted, not duplicated; with the
tracking server down, inference and outputs go on and the runs appear once the server is up."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import select, update

from dicom_node import tracking
from dicom_node.background import Foreground
from dicom_node.config import InferenceSettings, MlflowSettings, Settings
from dicom_node.inference_jobs import InferenceModels
from dicom_node.models import InferenceResult, Instance, Job, JobState, TrackedRun, TrackingState
from dicom_node.node import Node
from dicom_node.phantoms.generator import render_phantom
from dicom_node.tracking import (
    InferenceRun,
    InferenceTracker,
    run_contents,
    run_url,
    tracked_run_url,
    without_identifiers,
)
from tests.conftest import running_node
from tests.dicom_peers import free_port, send_datasets
from tests.postgres import migrated_database
from web.app import create_app
from web.dependencies import WebContext

pytestmark = pytest.mark.slow

MLFLOW = Path(sys.executable).parent / "mlflow"
T = TypeVar("T")

_databases = itertools.count()


@pytest.fixture(scope="module")
def models() -> InferenceModels:
    return InferenceModels.load(InferenceSettings())  # the committed demo cards


def patients(kinds: list[str]) -> list[Dataset]:
    """Phantoms with patient data that no MLflow store may hold: IDs and names found nowhere else."""
    datasets = []
    for index, kind in enumerate(kinds):
        ds, _ = render_phantom(83, index, kind)
        ds.PatientID = f"QZX{index}VWK7"
        ds.PatientName = f"ZEBULONIA^QUIXOTERA{index}"
        datasets.append(ds)
    return datasets


def patient_strings(datasets: list[Dataset]) -> list[bytes]:
    strings = set()
    for ds in datasets:
        strings |= {ds.PatientID, str(ds.PatientName), *str(ds.PatientName).split("^")}
    return sorted(string.encode() for string in strings)


def files_holding(root: Path, strings: list[bytes]) -> list[tuple[str, str]]:
    """(file, string) for each file under ``root`` whose bytes contain one of ``strings``."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found += [(str(path), string.decode()) for string in strings if string in data]
    return found


def wait_for(condition: Callable[[], T], timeout: float = 120, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def tracked_node(
    storage: Path, models: InferenceModels, database_url: str | None = None, **mlflow: object
) -> Iterator[Node]:
    """A node that logs to MLflow; on PostgreSQL (``database_url``) logging is a job of the task engine."""
    settings = Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": storage},
        database={"url": database_url or f"sqlite:///{storage / 'index.sqlite3'}"},
        workers={"count": 1, "poll_interval": 0.05, "heartbeat_interval": 0.5, "stalled_after": 2},
        mlflow={"poll_interval": 0.1, "retry_backoff": 0.1, "max_backoff": 0.5, **mlflow},
    )
    with running_node(settings, models) as node:
        yield node


def tracking_rows(node: Node) -> list[TrackedRun]:
    with node.sessions() as session:
        return list(session.scalars(select(TrackedRun).order_by(TrackedRun.instance_pk)))


def all_logged(node: Node, count: int) -> list[TrackedRun] | None:
    rows = tracking_rows(node)
    return rows if len(rows) == count and all(row.state == TrackingState.LOGGED for row in rows) else None


def results_by_instance(node: Node) -> dict[int, list[InferenceResult]]:
    by_instance: dict[int, list[InferenceResult]] = {}
    with node.sessions() as session:
        for result in session.scalars(select(InferenceResult).order_by(InferenceResult.id)):
            by_instance.setdefault(result.instance_pk, []).append(result)
    return by_instance


def check_runs(client: MlflowClient, node: Node, models: InferenceModels, rows: list[TrackedRun]) -> None:
    """Each logged row's run holds its instance's models, results, timings, heatmaps and report."""
    results = results_by_instance(node)
    for row in rows:
        run = client.get_run(row.run_id)
        assert run.info.status == "FINISHED" and run.info.experiment_id == row.experiment_id
        assert run.data.tags["dicom_node.instance_pk"] == str(row.instance_pk)
        assert run.data.tags["demo_model"] == "true"
        params, metrics = run.data.params, run.data.metrics
        assert params["patient_key"].startswith("p-")
        for result in results[row.instance_pk]:
            model = models.of(result.task)
            assert params["tasks"] == result.task
            assert params[f"{result.task}.model_name"] == model.card.name
            assert params[f"{result.task}.model_version"] == model.card.version
            assert params[f"{result.task}.weights_digest"] == model.weights_digest
            assert params[f"{result.task}.input_size"] == str(model.card.input_size)
            prefix = f"{result.task}.{result.output}"
            assert run.data.tags[f"{prefix}.summary"] == result.summary
            if result.task == "bone_age":
                assert metrics[f"{prefix}.age_months"] == pytest.approx(result.values["age_months"])
                assert metrics[f"{prefix}.sigma_months"] == pytest.approx(result.values["sigma_months"])
            else:
                probabilities = {k: v for k, v in metrics.items() if k.startswith(f"{prefix}.probabilities.")}
                assert len(probabilities) == len(result.values["probabilities"])
                assert sum(probabilities.values()) == pytest.approx(1, abs=1e-4)
                assert run.data.tags[f"{prefix}.prediction"] == result.values["prediction"]
            for step, milliseconds in result.timings_ms.items():
                assert metrics[f"timings.{step}_ms"] == pytest.approx(milliseconds)
        heatmaps = {Path(artifact.path).name for artifact in client.list_artifacts(row.run_id, "heatmaps")}
        assert heatmaps == {Path(result.heatmap_path).name for result in results[row.instance_pk]}
        report_file = client.download_artifacts(row.run_id, "report/structured-report.json")
        report = json.loads(Path(report_file).read_text())
        assert "0040A730" in report, "the report's content tree"
        assert not any(tag.startswith("0010") for tag in report), "no Patient module"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return migrated_database(request.getfixturevalue("postgres_server"), f"tracking_{next(_databases)}")


def test_every_inference_is_a_run_without_patient_data(
    tmp_path: Path, models: InferenceModels, database_url: str | None
) -> None:
    sent = patients(["hand", "foot", "hand", "foot"])
    storage = tmp_path / "storage"
    with tracked_node(storage, models, database_url) as node:
        assert all(status.Status == 0 for status in send_datasets(node.settings.dicom.port, sent))
        rows = wait_for(lambda: all_logged(node, len(sent)), what="four logged runs")
        settings = node.settings.mlflow
        assert settings.tracking_uri == f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}", "the local store"
        client = MlflowClient(settings.tracking_uri)
        experiment = client.get_experiment_by_name("inference")
        assert experiment.artifact_location == (storage / "mlflow" / "artifacts").resolve().as_uri()
        assert len(client.search_runs([experiment.experiment_id])) == len(sent)
        check_runs(client, node, models, rows)
        with node.sessions() as session:
            link = tracked_run_url(session, settings, rows[0].instance_pk)
            assert link == run_url("http://127.0.0.1:5000", rows[0].experiment_id, rows[0].run_id)
            sop_uid = session.get_one(Instance, rows[0].instance_pk).sop_instance_uid
        web = TestClient(create_app(WebContext(node.settings, node.sessions, lambda: True)))
        assert web.get(f"/api/instances/{sop_uid}").json()["mlflow_url"] == link, "the API links the run"
        assert f'href="{link}"' in web.get(f"/instances/{sop_uid}").text, "and so does the viewer"
        assert len({client.get_run(row.run_id).data.params["patient_key"] for row in rows}) == len(sent)
        for row in rows:  # the heatmaps file is linked into the local artifact store, not copied
            [result, *_] = results_by_instance(node)[row.instance_pk]
            artifact = Path(client.get_run(row.run_id).info.artifact_uri.removeprefix("file://"))
            heatmaps = storage / result.heatmap_path
            assert (artifact / "heatmaps" / heatmaps.name).stat().st_ino == heatmaps.stat().st_ino

        # a crash between creating a run and recording it: the run is found by its key, not made again
        with node.sessions.begin() as session:
            session.execute(
                update(TrackedRun)
                .where(TrackedRun.id == rows[0].id)
                .values(state=TrackingState.PENDING, run_id=None, experiment_id=None)
            )
        again = wait_for(lambda: all_logged(node, len(sent)), what="the run recorded again")
        assert again[0].run_id == rows[0].run_id
        assert len(client.search_runs([experiment.experiment_id])) == len(sent)

    strings = patient_strings(sent)
    assert files_holding(storage / "patients", strings), "the scan finds the patient data where it is"
    assert files_holding(storage / "mlflow", strings) == []


def test_runs_wait_while_jobs_are_due_unless_the_node_is_never_idle(tmp_path: Path, models: InferenceModels) -> None:
    """The tracker gives the cores to the jobs that are due and to requests: an instance's run is logged once no
    job waits, or once the tracker has given way for MAX_GIVE_WAY_S, requests or not: then one run at a time while
    a request is served."""
    settings = Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path / "storage"},
        workers={"count": 0},  # the test runs each job and each pass of a tracker itself
        mlflow={"enabled": False},
    )
    with running_node(settings, models) as node:
        foreground = Foreground()
        tracker = InferenceTracker(
            settings.mlflow.model_copy(update={"enabled": True}), node.sessions, node.store, models, foreground
        )
        sent = patients(["hand", "foot", "hand"])
        assert all(status.Status == 0 for status in send_datasets(node.settings.dicom.port, sent))
        with node.sessions() as session:
            first, second, third = session.scalars(select(Job.instance_pk).order_by(Job.id)).all()

        def run_jobs_of(instance_pk: int) -> None:
            for kind in ("inference", "outputs"):
                with node.sessions() as session:
                    job_id = session.scalar(select(Job.id).where(Job.instance_pk == instance_pk, Job.kind == kind))
                assert node.workers.run_now(job_id)

        run_jobs_of(first)
        run_jobs_of(second)
        assert tracker.run_once() == 0, "the third image's inference job is due"
        assert tracking_rows(node) == []
        tracker.give_way.max_seconds = 0.0
        with foreground.serving():  # and requests back to back
            assert tracker.run_once() == 1, "given way long enough: one of the two due runs, beside the request"
            assert tracker.run_once() == 1, "and the other at the next pass"
        tracker.give_way.max_seconds = tracking.MAX_GIVE_WAY_S
        run_jobs_of(third)
        assert tracker.run_once() == 1, "idle: the third image's run"
        assert all_logged(node, 3)


def test_runs_appear_once_the_tracking_server_is_back(tmp_path: Path, models: InferenceModels) -> None:
    sent = patients(["hand", "foot"])
    port = free_port()
    with tracked_node(tmp_path / "storage", models, tracking_uri=f"http://127.0.0.1:{port}") as node:
        assert all(status.Status == 0 for status in send_datasets(node.settings.dicom.port, sent))

        def failed_attempts() -> list[TrackedRun] | None:
            rows = tracking_rows(node)
            return rows if len(rows) == len(sent) and all(row.attempts >= 2 for row in rows) else None

        for row in wait_for(failed_attempts, what="attempts while the server is down"):
            assert row.state == TrackingState.PENDING and "Connection" in row.last_error
        with node.sessions() as session:
            jobs = session.scalars(select(Job)).all()
            assert len(jobs) == 2 * len(sent) and {job.state for job in jobs} == {JobState.DONE}, "inference, outputs"
        assert len(results_by_instance(node)) == len(sent)

        with mlflow_server(tmp_path / "server", port) as server:
            rows = wait_for(lambda: all_logged(node, len(sent)), what="runs logged once the server is up")
            client = MlflowClient(f"http://127.0.0.1:{port}")
            [experiment] = [e for e in client.search_experiments() if e.name == "inference"]
            assert len(client.search_runs([experiment.experiment_id])) == len(sent)
            check_runs(client, node, models, rows)
            assert files_holding(server, patient_strings(sent)) == []


@contextmanager
def mlflow_server(root: Path, port: int) -> Iterator[Path]:
    """A real MLflow tracking server on ``port`` with its store in ``root``, artifacts proxied to ``root/artifacts``;
    yields ``root``."""
    root.mkdir(exist_ok=True)  # a server restarted on the same store
    process = subprocess.Popen(
        [
            MLFLOW,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=os.environ | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    try:
        wait_for(lambda: _healthy(port) or process.poll() is not None, what="the MLflow server")
        assert process.poll() is None, "the MLflow server exited"
        yield root
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_patient_data_goes_to_mlflow_only_when_asked() -> None:
    result = InferenceResult(
        id=7,
        instance_pk=3,
        task="bone_age",
        output="male",
        summary="bone age 10.0 years",
        values={"age_months": 120.0, "sigma_months": 9.5, "assessment": "normal", "heatmap_peak_xy": [1, 2]},
        heatmap_path="results/x/bone_age-male-0.npz",
        model_name="bone-age-demo",
        model_version="1",
        weights_digest="sha256:00",
        demo_model=True,
        timings_ms={"prepare": 5.0},
    )
    run = InferenceRun(3, [result], "QZX9VWK7", "ZEBULONIA^QUIXOTERA", "1.2.3", "1.2.3.4", None)
    private = run_contents(run, "p-key", log_phi=False)
    assert private.params == {
        "tasks": "bone_age",
        "patient_key": "p-key",
        "bone_age.model_name": "bone-age-demo",
        "bone_age.model_version": "1",
        "bone_age.weights_digest": "sha256:00",
    }
    assert private.metrics == {
        "timings.prepare_ms": 5.0,
        "bone_age.male.age_months": 120.0,
        "bone_age.male.sigma_months": 9.5,
    }
    assert private.tags["bone_age.male.assessment"] == "normal"
    assert "QZX9VWK7" not in repr(private) and "1.2.3" not in repr(private)
    with_phi = run_contents(run, "p-key", log_phi=True)
    assert with_phi.params["patient_id"] == "QZX9VWK7"
    assert with_phi.params["patient_name"] == "ZEBULONIA^QUIXOTERA"
    assert with_phi.params["sop_instance_uid"] == "1.2.3.4"


def test_report_without_identifiers_keeps_its_content() -> None:
    item = Dataset()
    item.ValueType = "PNAME"
    item.PersonName = "OBSERVER^ONE"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.TextValue = "bone age 10.0 years"
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = "QZX9VWK7", "ZEBULONIA^QUIXOTERA", "20100101"
    ds.StudyInstanceUID, ds.StudyDate, ds.AccessionNumber = "1.2.3", "20240101", "A123"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.ContentSequence = Sequence([item])
    without_identifiers(ds)
    assert [element.keyword for element in ds] == ["SOPClassUID", "ContentSequence"]
    assert [element.keyword for element in ds.ContentSequence[0]] == ["ValueType", "TextValue"]


def test_local_store_is_under_the_storage_root_unless_a_uri_is_given() -> None:
    assert Settings(storage={"root": "/srv/node"}).mlflow.tracking_uri == "sqlite:////srv/node/mlflow/mlflow.db"
    uri = "http://mlflow.example.org:5000"
    assert Settings(mlflow={"tracking_uri": uri}).mlflow == MlflowSettings(tracking_uri=uri)
