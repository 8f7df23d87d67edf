"""The job queue and the workers: each job runs once, failures retry with backoff, then fail with a reason."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import ArgumentError

import dicom_node.workers
from dicom_node.background import Foreground
from dicom_node.config import DatabaseSettings, Settings
from dicom_node.database import create_index_engine, open_index, session_factory
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.jobs import ClaimedJob, JobQueue
from dicom_node.models import Instance, Job, JobState, Patient, Series, Study
from dicom_node.node import Node
from dicom_node.synthetic import synthetic_dx
from dicom_node.workers import WorkerPool
from tests.conftest import stored_jobs
from tests.dicom_peers import free_port, send_datasets


@pytest.fixture
def sessions(tmp_path: Path):
    engine = open_index(DatabaseSettings(url=f"sqlite:///{tmp_path / 'index.sqlite3'}"))
    yield session_factory(engine)
    engine.dispose()


def add_jobs(sessions, count: int, kind: str = INFERENCE_JOB) -> list[int]:
    """``count`` instances of a new patient, each with one pending job of ``kind``."""
    with sessions.begin() as session:
        n = session.query(Patient).count() + 1
        patient = Patient(patient_id=f"P{n}", storage_key=f"P{n}-0")
        series = Series(series_instance_uid=f"1.{n}.3", study=Study(study_instance_uid=f"1.{n}", patient=patient))
        jobs = []
        for number in range(count):
            instance = Instance(
                sop_instance_uid=f"1.{n}.3.{number}",
                series=series,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"patients/P{n}-0/1.{n}/1.{n}.3/1.{n}.3.{number}.dcm",
                size_bytes=1,
            )
            jobs.append(Job(instance=instance, kind=kind))
        session.add_all(jobs)
        session.flush()
        return [job.id for job in jobs]


def job(sessions, job_id: int) -> Job:
    with sessions() as session:
        return session.get_one(Job, job_id)


def test_claims_the_oldest_due_job_of_the_kinds_asked_for(sessions) -> None:
    [other] = add_jobs(sessions, 1, kind="other")
    first, second = add_jobs(sessions, 2)
    queue = JobQueue(sessions, max_attempts=3, retry_backoff=1)

    claimed = queue.claim([INFERENCE_JOB])
    assert (claimed.id, claimed.attempt) == (first, 1)
    assert job(sessions, first).state == JobState.RUNNING
    assert queue.claim([INFERENCE_JOB]).id == second
    assert queue.claim([INFERENCE_JOB]) is None
    assert queue.claim([]) is None
    assert job(sessions, other).state == JobState.PENDING


def test_a_batch_takes_due_jobs_of_the_oldest_jobs_kind_only(sessions) -> None:
    first, second = add_jobs(sessions, 2)
    [other] = add_jobs(sessions, 1, kind="other")
    third, fourth = add_jobs(sessions, 2)
    queue = JobQueue(sessions, max_attempts=3, retry_backoff=1)

    assert [job.id for job in queue.claim_batch([INFERENCE_JOB, "other"], 3)] == [first, second, third]
    assert [job.id for job in queue.claim_batch([INFERENCE_JOB, "other"], 3)] == [other]
    assert [job.id for job in queue.claim_batch([INFERENCE_JOB, "other"], 3)] == [fourth]
    assert queue.claim_batch([INFERENCE_JOB, "other"], 3) == []


def test_concurrent_workers_never_claim_the_same_job(sessions) -> None:
    ids = add_jobs(sessions, 60)
    queue = JobQueue(sessions, max_attempts=3, retry_backoff=1)
    claimed: list[int] = []
    lock = threading.Lock()

    def drain() -> None:
        while (taken := queue.claim([INFERENCE_JOB])) is not None:
            with lock:
                claimed.append(taken.id)

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(claimed) == ids


def test_a_failed_attempt_is_retried_after_backoff_then_marked_failed(sessions) -> None:
    [job_id] = add_jobs(sessions, 1)
    queue = JobQueue(sessions, max_attempts=2, retry_backoff=60)

    first = queue.claim([INFERENCE_JOB])
    assert queue.fail(first, "ValueError: first") == JobState.PENDING
    assert queue.claim([INFERENCE_JOB]) is None, "not due before its backoff"

    with sessions.begin() as session:  # let the backoff pass
        session.execute(update(Job).values(available_at=Job.created_at))
    second = queue.claim([INFERENCE_JOB])
    assert second.attempt == 2
    assert queue.fail(second, "ValueError: second") == JobState.FAILED

    failed = job(sessions, job_id)
    assert (failed.state, failed.attempts, failed.last_error) == (JobState.FAILED, 2, "ValueError: second")
    assert queue.claim([INFERENCE_JOB]) is None


def test_a_permanent_failure_is_not_retried(sessions) -> None:
    [job_id] = add_jobs(sessions, 1)
    queue = JobQueue(sessions, max_attempts=3, retry_backoff=0)
    assert queue.fail(queue.claim([INFERENCE_JOB]), "UnsupportedImage: x", permanent=True) == JobState.FAILED
    assert job(sessions, job_id).attempts == 1 and queue.claim([INFERENCE_JOB]) is None


def test_a_job_queued_again_while_it_runs_is_not_marked_done_by_the_stale_run(sessions) -> None:
    [job_id] = add_jobs(sessions, 1)
    queue = JobQueue(sessions, max_attempts=3, retry_backoff=0)
    stale = queue.claim([INFERENCE_JOB])
    with sessions.begin() as session:  # the instance is replaced meanwhile, as ingest does with policy replace
        row = session.get_one(Job, job_id)
        row.state, row.attempts, row.generation = JobState.PENDING, 0, row.generation + 1
    assert queue.complete(stale) is False
    assert queue.fail(stale, "ValueError: stale") == JobState.PENDING
    fresh = queue.claim([INFERENCE_JOB])
    assert fresh.generation == stale.generation + 1 and job(sessions, job_id).last_error is None
    assert queue.complete(fresh) is True and job(sessions, job_id).state == JobState.DONE


def test_jobs_left_running_by_a_stopped_process_resume(sessions) -> None:
    [job_id] = add_jobs(sessions, 1)
    queue = JobQueue(sessions, max_attempts=3, retry_backoff=1)
    queue.claim([INFERENCE_JOB])  # then the process dies

    assert queue.recover_interrupted() == 1
    assert queue.claim([INFERENCE_JOB]).id == job_id


def test_workers_run_each_received_instance_once(tmp_path: Path) -> None:
    seen: list[int] = []
    failing_uid = "1.2.826.0.1.3680043.8.498.999"

    def handler(claimed_jobs: list[ClaimedJob]) -> dict[int, Exception]:
        failures = {}
        for claimed in claimed_jobs:
            with node.sessions() as session:
                instance = session.get_one(Instance, claimed.instance_pk)
            if instance.sop_instance_uid == failing_uid:
                failures[claimed.id] = RuntimeError("model exploded")
            else:
                seen.append(claimed.instance_pk)
        return failures

    settings = Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path / "storage"},
        workers={"count": 2, "poll_interval": 0.05, "max_attempts": 2, "retry_backoff": 0.05},
    )
    node = Node(settings, job_handlers={INFERENCE_JOB: handler})
    node.start()
    try:
        datasets = [synthetic_dx(f"W{n}", side=64, seed=n) for n in range(6)]
        datasets[0].SOPInstanceUID = datasets[0].file_meta.MediaStorageSOPInstanceUID = failing_uid
        send_datasets(settings.dicom.port, datasets)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [job.state for job in stored_jobs(node)]
            if len(states) == 6 and JobState.PENDING not in states and JobState.RUNNING not in states:
                break
            time.sleep(0.05)
    finally:
        node.stop()

    jobs = {job.instance_pk: job for job in stored_jobs(node)}
    with node.sessions() as session:
        failing_pk = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == failing_uid))
    assert sorted(seen) == sorted(pk for pk in jobs if pk != failing_pk), "every other job ran exactly once"
    assert jobs[failing_pk].state == JobState.FAILED
    assert (jobs[failing_pk].attempts, jobs[failing_pk].last_error) == (2, "RuntimeError: model exploded")
    assert all(job.state == JobState.DONE for pk, job in jobs.items() if pk != failing_pk)


def test_a_job_interrupted_on_every_attempt_is_failed_not_retried_forever(sessions) -> None:
    [job_id] = add_jobs(sessions, 1)
    queue = JobQueue(sessions, max_attempts=2, retry_backoff=1)
    for _ in range(2):  # the job kills the process on each attempt
        assert queue.claim([INFERENCE_JOB]).id == job_id
        queue.recover_interrupted()
    failed = job(sessions, job_id)
    assert (failed.state, failed.last_error) == (JobState.FAILED, "interrupted on every attempt")
    assert queue.claim([INFERENCE_JOB]) is None


def test_an_sqlite_without_returning_is_refused_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import dicom_node.database

    monkeypatch.setattr(dicom_node.database.sqlite3, "sqlite_version_info", (3, 31, 1))
    with pytest.raises(ArgumentError, match=r"older than 3.35, whose UPDATE \.\.\. RETURNING"):
        create_index_engine(f"sqlite:///{tmp_path / 'index.db'}")
    assert not (tmp_path / "index.db").exists()


def test_workers_claim_nothing_while_a_request_is_served_then_catch_up(sessions) -> None:
    """POST /predict answers first: while a request is in the foreground the workers leave due jobs alone (for at
    most MAX_GIVE_WAY_S), and take them once it has been answered."""
    foreground = Foreground()
    ran: list[int] = []
    pool = WorkerPool(
        JobQueue(sessions, max_attempts=3, retry_backoff=0),
        {INFERENCE_JOB: lambda jobs: ran.extend(job.id for job in jobs) or {}},
        count=1,
        poll_interval=0.01,
        foreground=foreground,
    )
    pool.start()
    try:
        with foreground.serving():
            [queued] = add_jobs(sessions, 1)
            pool.wake()
            time.sleep(0.5)
            assert ran == [] and job(sessions, queued).state == JobState.PENDING
        deadline = time.monotonic() + 10
        while job(sessions, queued).state != JobState.DONE:
            assert time.monotonic() < deadline, "the job did not run once the request was answered"
            time.sleep(0.02)
        assert ran == [queued]
    finally:
        pool.stop()


def test_workers_that_gave_way_long_enough_take_one_job_at_a_time_beside_a_request(
    sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under requests back to back the workers still make progress, but a request shares the cores with one job
    at most: batches of one while it is served, whole batches again once it is answered."""
    monkeypatch.setattr(dicom_node.workers, "MAX_GIVE_WAY_S", 0.0)
    foreground = Foreground()
    batches: list[int] = []
    pool = WorkerPool(
        JobQueue(sessions, max_attempts=3, retry_backoff=0),
        {INFERENCE_JOB: lambda jobs: batches.append(len(jobs)) or {}},
        count=1,
        poll_interval=0.01,
        batch_size=4,
        foreground=foreground,
    )

    def wait_for(done: int) -> None:
        deadline = time.monotonic() + 10
        while sum(batches) < done:
            assert time.monotonic() < deadline, f"{sum(batches)} of {done} jobs ran"
            time.sleep(0.02)

    with foreground.serving():
        add_jobs(sessions, 3)
        pool.start()
        try:
            wait_for(3)
            assert batches == [1, 1, 1]
        finally:
            pool.stop()
    time.sleep(2 * foreground.quiet_seconds)  # answered, and the quiet after it over
    add_jobs(sessions, 3)
    pool.start()
    try:
        wait_for(6)
        assert batches == [1, 1, 1, 3]
    finally:
        pool.stop()
