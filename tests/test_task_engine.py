"""The task engine on PostgreSQL (Procrastinate): jobs deferred with the index rows that need them, run by workers
that take only the queues of the models they have, gathered into batches, and retried as the node retries."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from procrastinate.jobs import Job as EngineJob
from pydicom.filereader import read_file_meta_info
from sqlalchemy import select

from dicom_node.config import RoutingRule, Settings
from dicom_node.database import create_index_engine, open_index, session_factory
from dicom_node.delivery import schedule_sending
from dicom_node.index_schema import downgrade_index, upgrade_index
from dicom_node.inference_jobs import InferenceModels
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.jobs import ClaimedJob, JobNotFinished, PermanentJobError, enqueue, run_again
from dicom_node.models import InferenceResult, Instance, Job, JobState, Patient, Series, Study
from dicom_node.node import Node
from dicom_node.part10 import encoded_dataset
from dicom_node.phantoms.generator import render_phantom
from dicom_node.synthetic import synthetic_dx
from dicom_node.task_engine import NO_MODEL_QUEUE, defer, inference_queue, inference_queues, models_of_queues
from dicom_node.task_worker import Batch, NodeRetry
from tests.dicom_peers import free_port
from tests.postgres import create_database, migrated_database, psycopg_url, running_postgres
from tests.serve_process import DEMO_CARDS, DICOM_NODE
from web.app import create_app, create_health_app
from web.dependencies import WebContext

_numbers = itertools.count()


@pytest.fixture
def database_url(postgres_server: str) -> str:
    return migrated_database(postgres_server, f"engine_{next(_numbers)}")


def engine_jobs(url: str) -> list[tuple]:
    """(task, queue, status, attempts, instance) of every Procrastinate job, seen from a connection of its own."""
    with psycopg.connect(psycopg_url(url)) as connection:
        return connection.execute(
            "SELECT task_name, queue_name, status::text, attempts, (args->>'instance_pk')::bigint "
            "FROM procrastinate_jobs ORDER BY id"
        ).fetchall()


def an_instance(number: int) -> Instance:
    patient = Patient(patient_id=f"P{number}", storage_key=f"k{number}")
    study = Study(study_instance_uid=f"1.2.3.{number}", patient=patient)
    series = Series(series_instance_uid=f"1.2.3.{number}.1", study=study)
    return Instance(
        sop_instance_uid=f"1.2.3.{number}.1.1",
        series=series,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"patients/k{number}/1.dcm",
        size_bytes=1,
    )


# --- deferring in the ingest transaction ---------------------------------------------------------------------


def test_a_job_deferred_in_a_session_commits_and_rolls_back_with_the_rows(database_url: str) -> None:
    """The proof the engine was chosen on: no job without its image, no image without its job."""
    engine = open_index(Settings(database={"url": database_url}).database)
    sessions = session_factory(engine)
    try:
        with sessions() as session:
            enqueue(session, an_instance(1), INFERENCE_JOB, "infer.bone_age")
            assert engine_jobs(database_url) == [], "another connection sees nothing before the commit"
            session.rollback()
        assert engine_jobs(database_url) == []

        with sessions() as session:
            instance = an_instance(2)
            enqueue(session, instance, INFERENCE_JOB, "infer.bone_age")
            session.commit()
            assert engine_jobs(database_url) == [("inference", "infer.bone_age", "todo", 0, instance.id)]
            # the view the API and the viewer read shows it as the SQLite table would
            job = session.scalars(select(Job)).one()
            assert (job.instance_pk, job.kind, job.state, job.attempts) == (instance.id, "inference", "pending", 0)
    finally:
        engine.dispose()


def test_one_sending_job_waits_per_destination_and_new_work_brings_a_later_one_forward(database_url: str) -> None:
    """Outputs jobs defer a deliver job with their outbox rows: one waits per destination, and a job scheduled
    for after a backoff is brought forward when new objects arrive; a refused insert spoils no transaction."""
    engine = open_index(Settings(database={"url": database_url}).database)
    sessions = session_factory(engine)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    try:
        with sessions() as session:
            schedule_sending(session, ["pacs"])
            session.rollback()
        assert engine_jobs(database_url) == []
        with sessions.begin() as session:
            schedule_sending(session, ["pacs", "archive"], at=later)
            schedule_sending(session, ["pacs"], at=later)
            session.execute(select(1))  # the transaction is usable after the refused second insert
        with sessions.begin() as session:
            schedule_sending(session, ["pacs"])
        with psycopg.connect(psycopg_url(database_url)) as connection:
            waiting = connection.execute(
                "SELECT args->>'destination', scheduled_at IS NULL OR scheduled_at <= now(), lock "
                "FROM procrastinate_jobs WHERE status = 'todo' ORDER BY id"
            ).fetchall()
        assert waiting == [("pacs", True, "deliver:pacs"), ("archive", False, "deliver:archive")]
    finally:
        engine.dispose()


# --- queues --------------------------------------------------------------------------------------------------


def test_revision_0003_moves_the_jobs_of_a_queue_named_in_the_old_order_to_the_sorted_name(
    postgres_server: str,
) -> None:
    url = create_database(postgres_server, f"engine_{next(_numbers)}")
    engine = create_index_engine(url)
    sessions = session_factory(engine)
    try:
        upgrade_index(engine, "0002")
        with sessions.begin() as session:
            defer(session, INFERENCE_JOB, 1, "infer.hallux_valgus+bone_age")  # the order of the node before tasks
            defer(session, INFERENCE_JOB, 2, "infer.hallux_valgus")
        upgrade_index(engine)
        assert [job[1] for job in engine_jobs(url)] == ["infer.bone_age+hallux_valgus", "infer.hallux_valgus"]
        downgrade_index(engine, "0002")
        assert [job[1] for job in engine_jobs(url)] == ["infer.hallux_valgus+bone_age", "infer.hallux_valgus"]
    finally:
        engine.dispose()


def test_a_worker_takes_the_queues_of_the_routes_its_models_cover() -> None:
    assert inference_queue(["bone_age"]) == "infer.bone_age"
    assert inference_queue(["hallux_valgus", "bone_age"]) == "infer.bone_age+hallux_valgus"  # sorted
    assert inference_queue([]) == "infer.none"
    assert inference_queues(["hallux_valgus"]) == ["infer.none", "infer.hallux_valgus"]
    assert inference_queues(["hallux_valgus", "bone_age"]) == [
        "infer.none",
        "infer.bone_age",
        "infer.hallux_valgus",
        "infer.bone_age+hallux_valgus",
    ]
    assert models_of_queues(["infer.bone_age+hallux_valgus", "outputs"]) == {"hallux_valgus", "bone_age"}
    assert models_of_queues(["infer.none", "outputs", "deliver"]) == set()


# --- batches and retries -------------------------------------------------------------------------------------


def test_jobs_that_arrive_together_run_as_one_batch_and_each_gets_its_own_outcome() -> None:
    calls: list[list[int]] = []

    def handler(jobs: list[ClaimedJob]) -> dict[int, Exception]:
        calls.append([job.id for job in jobs])
        return {2: ValueError("image 2 is unreadable")}

    batch = Batch(handler, size=3, window=10)  # full before the window ends: it does not wait it out
    outcomes: dict[int, Exception | None] = {}
    threads = [
        threading.Thread(target=lambda n=n: outcomes.__setitem__(n, batch.run(ClaimedJob(n, "inference", n, 1))))
        for n in (1, 2, 3)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert time.monotonic() - started < 5
    assert [sorted(call) for call in calls] == [[1, 2, 3]]
    assert outcomes[1] is None and outcomes[3] is None and str(outcomes[2]) == "image 2 is unreadable"


def test_a_batch_takes_no_more_than_its_size_and_those_left_over_run_next() -> None:
    calls: list[list[int]] = []
    release = threading.Event()

    def handler(jobs: list[ClaimedJob]) -> dict[int, Exception]:
        calls.append([job.id for job in jobs])
        release.wait(5)  # the first batch runs while the others arrive
        return {}

    batch = Batch(handler, size=2, window=0.5)
    threads = [threading.Thread(target=batch.run, args=(ClaimedJob(n, "inference", n, 1),)) for n in range(1, 6)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    release.set()
    for thread in threads:
        thread.join(10)
    assert all(not thread.is_alive() for thread in threads)
    assert sorted(job for call in calls for job in call) == [1, 2, 3, 4, 5], "each job ran once"
    assert all(len(call) <= 2 for call in calls) and len(calls) == 3


def test_a_batch_that_raises_fails_each_of_its_jobs() -> None:
    def handler(jobs: list[ClaimedJob]) -> dict[int, Exception]:
        raise ConnectionError("index away")

    assert isinstance(Batch(handler, size=4, window=0.01).run(ClaimedJob(1, "outputs", 1, 1)), ConnectionError)


def test_retries_back_off_and_stop_at_the_last_attempt_or_at_once_when_permanent() -> None:
    from dicom_node.task_worker import AttemptFailed

    retry = NodeRetry(max_attempts=3, backoff=5)

    def decision(error: Exception, retries: int):
        job = EngineJob(id=1, queue="outputs", lock=None, queueing_lock=None, task_name="outputs", attempts=retries)
        return retry.get_retry_decision(exception=AttemptFailed(error), job=job)

    before = time.time()
    first, second = decision(OSError("busy"), 0), decision(OSError("busy"), 1)
    assert 4 <= first.retry_at.timestamp() - before <= 6
    assert 9 <= second.retry_at.timestamp() - before <= 11
    assert decision(OSError("busy"), 2) is None, "the third attempt was the last"
    assert decision(PermanentJobError("not an image"), 0) is None


# --- workers and their models --------------------------------------------------------------------------------


@pytest.fixture
def cluster_settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path / "storage"},
        database={"url": database_url},
        inference=DEMO_CARDS,
        workers={"poll_interval": 0.2},
        mlflow={"enabled": False},
    )


@pytest.fixture
def ingest_node(cluster_settings: Settings) -> Iterator[Node]:
    node = Node(cluster_settings, role="ingest")
    yield node
    node.stop()


def receive(node: Node, tmp_path: Path, body_part: str, number: int) -> int:
    path = tmp_path / f"{body_part}-{number}.dcm"
    synthetic_dx(f"{body_part}-{number}", side=128, seed=number, body_part=body_part).save_as(
        path, enforce_file_format=True
    )
    stored = node.ingestor.ingest(read_file_meta_info(path), [encoded_dataset(path)], "MODALITY")
    with node.sessions() as session:
        return session.scalar(select(Instance.id).where(Instance.sop_instance_uid == stored.sop_instance_uid))


def job_states(node: Node, kind: str = INFERENCE_JOB) -> dict[int, tuple[JobState, int]]:
    with node.sessions() as session:
        return {
            job.instance_pk: (job.state, job.attempts) for job in session.scalars(select(Job).where(Job.kind == kind))
        }


def test_a_failed_job_runs_again_in_its_own_queue(ingest_node: Node, tmp_path: Path, database_url: str) -> None:
    receive(ingest_node, tmp_path, "HAND", 1)
    with ingest_node.sessions() as session:
        job_id = session.scalar(select(Job.id).where(Job.kind == INFERENCE_JOB))
    with pytest.raises(JobNotFinished, match="pending"):
        run_again(ingest_node.sessions, job_id)
    with psycopg.connect(psycopg_url(database_url)) as connection:
        connection.execute("UPDATE procrastinate_jobs SET status = 'failed' WHERE id = %s", (job_id,))
    assert job_states(ingest_node) == {1: (JobState.FAILED, 0)}
    assert run_again(ingest_node.sessions, job_id) == (1, INFERENCE_JOB)
    first, again = engine_jobs(database_url)
    assert first[2] == "failed" and again[:3] == (INFERENCE_JOB, first[1], "todo") and first[1] == "infer.bone_age"
    assert job_states(ingest_node) == {1: (JobState.PENDING, 0)}, "the newest run is the job listed"


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@contextmanager
def worker(settings: Settings, onnx_graphs: Path) -> Iterator[Node]:
    """A worker process's node, in this process: the models its settings find, the queues they allow."""
    node = Node(settings, models=InferenceModels.load(settings.inference, onnx_graphs), role="worker")
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_a_worker_without_a_model_never_takes_its_jobs_and_they_run_once_a_worker_with_it_starts(
    cluster_settings: Settings, ingest_node: Node, tmp_path: Path, onnx_graphs: Path
) -> None:
    foot, hand = receive(ingest_node, tmp_path, "FOOT", 1), receive(ingest_node, tmp_path, "HAND", 2)
    without_bone_age = cluster_settings.model_copy(deep=True)
    without_bone_age.inference.tasks["bone_age"].card = tmp_path / "absent" / "bone-age.yaml"
    without_bone_age.inference.on_missing_model = "degraded"

    with worker(without_bone_age, onnx_graphs) as foot_worker:
        assert "infer.bone_age" not in foot_worker.queues
        wait_for(lambda: job_states(ingest_node)[foot][0] == JobState.DONE)
        wait_for(lambda: job_states(ingest_node, "outputs").get(foot, (None,))[0] == JobState.DONE)
        assert job_states(ingest_node)[hand] == (JobState.PENDING, 0), "never taken, not even tried"
        health = health_of(foot_worker)
        assert (health.status_code, health.json()["role"]) == (503, "worker")
        assert "bone_age" in health.json()["missing_models"] and health.json()["dicom_listener"] is None
        assert [model["name"] for model in health.json()["models"]] == ["hallux-valgus-demo"]
        assert "infer.bone_age" not in health.json()["serves_queues"]
        assert health.json()["queues"]["infer.bone_age"]["waiting"] == 1, "the job waiting for its model shows"
        ingest_health = health_of(ingest_node).json()
        assert ingest_health["role"] == "ingest" and ingest_health["models"] is None
        with worker(cluster_settings, onnx_graphs):
            wait_for(lambda: job_states(ingest_node)[hand][0] == JobState.DONE)

    with ingest_node.sessions() as session:
        tasks = dict(session.execute(select(InferenceResult.instance_pk, InferenceResult.task)).all())
    assert tasks == {foot: "hallux_valgus", hand: "bone_age"}
    assert engine_jobs(cluster_settings.database.url)[0][1:3] == ("infer.hallux_valgus", "succeeded")


def health_of(node: Node):
    context = WebContext(node.settings, node.sessions, lambda: node.scp.listening, node=node)
    return TestClient(create_health_app(context)).get("/health")


def test_roles_other_than_all_need_postgresql(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"storage:\n  root: {tmp_path / 'storage'}\ndicom:\n  port: {free_port()}\n")
    refused = subprocess.run(
        [DICOM_NODE, "serve", "--role", "ingest", "--config", config], capture_output=True, text=True, timeout=60
    )
    assert (refused.returncode, refused.stderr) == (
        2,
        "dicom-node: role 'ingest' needs the index on PostgreSQL (database.url); SQLite runs role 'all'\n",
    )


def test_a_worker_outlives_an_outage_of_postgresql(tmp_path: Path) -> None:
    """Away when the worker starts, or while it runs: it works once the database is back, and takes the jobs
    deferred then."""
    handled: list[int] = []

    def record(jobs: list[ClaimedJob]) -> dict[int, Exception]:
        handled.extend(job.instance_pk for job in jobs)
        return {}

    def defer_one(url: str, instance_pk: int) -> None:
        engine = open_index(Settings(database={"url": url}).database)
        with session_factory(engine).begin() as session:
            defer(session, INFERENCE_JOB, instance_pk, NO_MODEL_QUEUE)
        engine.dispose()

    with running_postgres() as server:
        url = migrated_database(server.url, "outage")
        settings = Settings(
            storage={"root": tmp_path / "storage"},
            database={"url": url},
            workers={"poll_interval": 0.2, "heartbeat_interval": 0.5, "stalled_after": 2},
        )
        node = Node(settings, job_handlers={INFERENCE_JOB: record}, role="worker", queues=[NO_MODEL_QUEUE])
        server.stop()
        node.start()
        try:
            time.sleep(4)  # longer than stalled_after: the worker gives up waiting for a connection, starts again
            server.start()
            defer_one(url, 1)
            wait_for(lambda: handled == [1])
            server.stop()
            time.sleep(3)  # the worker loses its connections and tries again
            server.start()
            defer_one(url, 2)
            wait_for(lambda: handled == [1, 2], timeout=60)
        finally:
            node.stop()


def test_predict_on_the_web_role_defers_its_job_and_a_worker_runs_it(
    cluster_settings: Settings, tmp_path: Path, onnx_graphs: Path
) -> None:
    """The web role loads no model: its request waits for the job like any other client of the workers."""
    foot, _ = render_phantom(12, 1, "foot")
    upload = io.BytesIO()
    foot.save_as(upload, enforce_file_format=True)
    web = Node(cluster_settings, role="web")
    try:
        assert web.models is None and web.workers is None
        client = TestClient(create_app(WebContext(cluster_settings, web.sessions, lambda: False, node=web)))
        with worker(cluster_settings, onnx_graphs):
            response = client.post("/predict", files={"image": ("foot.dcm", upload.getvalue())})
        assert response.status_code == 200, response.text
        assert response.json()["prediction"] in ("Normal", "Flatfoot", "Foot Ulcer", "Hallux Valgus")
        assert engine_jobs(cluster_settings.database.url)[0][1:3] == ("infer.hallux_valgus", "succeeded")
    finally:
        web.stop()


def test_an_image_routed_elsewhere_by_the_worker_moves_to_the_queue_of_every_model(
    cluster_settings: Settings, ingest_node: Node, tmp_path: Path, onnx_graphs: Path
) -> None:
    """The ingest node and the worker route with different settings: the worker lacks the model it needs, so the
    job moves, uncounted, to where a worker with every model takes it."""
    foot = receive(ingest_node, tmp_path, "FOOT", 1)
    misrouting = cluster_settings.model_copy(deep=True)
    misrouting.inference.tasks["bone_age"].card = tmp_path / "absent" / "bone-age.yaml"
    misrouting.inference.on_missing_model = "degraded"
    misrouting.inference.rules = [RoutingRule(pattern="FOOT", tasks=["bone_age"])]
    with worker(misrouting, onnx_graphs):
        wait_for(lambda: len(engine_jobs(cluster_settings.database.url)) == 2)
    first, moved = engine_jobs(cluster_settings.database.url)
    assert first[1:3] == ("infer.hallux_valgus", "succeeded") and moved[1:4] == (
        "infer.bone_age+hallux_valgus",
        "todo",
        0,
    )
    state, attempts = job_states(ingest_node)[foot]
    assert (state, attempts) == (JobState.PENDING, 0), "the newest job of the image waits, nothing counted"
