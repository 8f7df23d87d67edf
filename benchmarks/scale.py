"""Scaling benchmark: what running the node as separate processes on PostgreSQL costs and gives, in one run.

1. Dispatch overhead: ``--jobs`` jobs whose handler does nothing, through the task engine (Procrastinate on a
   loopback PostgreSQL, one worker process's worker with ``--concurrency`` jobs at once) against the one-process
   node's in-process queue (SQLite, its worker threads). Jobs per second from the first taken to the last done.
2. Inference role throughput: the same ``--images`` hand and foot phantoms, received by an ingest node, then run
   by one ``dicom-node worker`` process with two model threads against two worker processes with one thread each
   (this machine has two cores). Images per second from the moment every worker is ready to the last result.
   Then one outputs worker process writes their Secondary Captures and reports: the other per-image cost.
3. End to end: phantom studies pushed one at a time from a real Orthanc to the node (as benchmarks/roundtrip.py
   does), seconds from the push to the node's structured report in Orthanc: the single process on SQLite
   against the cluster of tests/test_cluster.py (two ingest nodes, two inference workers, an outputs and
   delivery worker, a web server) on PostgreSQL, which Orthanc reaches through one of its ingest nodes.

This is a benchmark, not a test: it exits 0 and prints PASS or MISS for each target.

    .venv/bin/python benchmarks/scale.py [--jobs 2000] [--images 100] [--studies 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg
from pydicom.filereader import read_file_meta_info
from sqlalchemy import func, insert, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before benchmarks/, whose inference.py would shadow the package; tests importable

from benchmarks.roundtrip import Study, node_settings, report_in, start_node, upload  # noqa: E402
from benchmarks.verdicts import print_verdicts  # noqa: E402
from dicom_node.config import InferenceSettings, Settings  # noqa: E402
from dicom_node.database import open_index, session_factory  # noqa: E402
from dicom_node.inference_jobs import InferenceModels  # noqa: E402
from dicom_node.ingest import INFERENCE_JOB  # noqa: E402
from dicom_node.jobs import ClaimedJob, JobQueue  # noqa: E402
from dicom_node.models import Instance, Job, JobState, Patient, Series  # noqa: E402
from dicom_node.models import Study as StudyRow  # noqa: E402
from dicom_node.node import Node  # noqa: E402
from dicom_node.part10 import encoded_dataset  # noqa: E402
from dicom_node.phantoms import generate_phantoms  # noqa: E402
from dicom_node.task_engine import NO_MODEL_QUEUE, defer  # noqa: E402
from dicom_node.task_worker import TaskWorker, WorkerOptions  # noqa: E402
from dicom_node.workers import WorkerPool  # noqa: E402
from tests.dicom_peers import free_port  # noqa: E402
from tests.orthanc import Orthanc, orthanc  # noqa: E402
from tests.postgres import migrated_database, psycopg_url, temporary_postgres  # noqa: E402
from tests.serve_process import DEMO_CARDS, ServeProcess, with_onnx_graphs  # noqa: E402

TARGETS = {
    "engine dispatch, jobs/s": (">=", 200.0),
    "two processes / one, throughput": (">=", 0.9),
}
INFERENCE_QUEUES = "infer.none,infer.hallux_valgus,infer.bone_age,infer.bone_age+hallux_valgus"
_databases = iter(range(1000))


def nothing(jobs: list[ClaimedJob]) -> dict[int, Exception]:
    return {}


# --- 1. dispatch overhead ------------------------------------------------------------------------------------


def dispatch_in_process(work: Path, jobs: int, threads: int) -> float:
    """Jobs per second through the one-process node's queue (SQLite, ``threads`` worker threads)."""
    engine = open_index(
        Settings(storage={"root": work}, database={"url": f"sqlite:///{work / 'index.sqlite3'}"}).database
    )
    sessions = session_factory(engine)
    with sessions.begin() as session:
        series = Series(
            series_instance_uid="1.2.3.1",
            study=StudyRow(study_instance_uid="1.2.3", patient=Patient(patient_id="P", storage_key="k")),
        )
        session.add(series)
        session.flush()
        session.execute(
            insert(Instance),
            [
                {
                    "sop_instance_uid": f"1.2.3.1.{n}",
                    "series_pk": series.id,
                    "sop_class_uid": "1.2",
                    "transfer_syntax_uid": "1.2",
                    "path": f"p/{n}",
                    "size_bytes": 1,
                }
                for n in range(jobs)
            ],
        )
        pks = session.scalars(select(Instance.id)).all()
        session.execute(insert(Job), [{"instance_pk": pk, "kind": INFERENCE_JOB} for pk in pks])
    pool = WorkerPool(JobQueue(sessions, 3, 1.0), {INFERENCE_JOB: nothing}, threads, poll_interval=0.01, batch_size=1)
    rate = jobs_per_second(pool, jobs, lambda: done_jobs(sessions))
    engine.dispose()
    return rate


def dispatch_through_the_engine(server: str, jobs: int, concurrency: int) -> float:
    """Jobs per second through Procrastinate (one worker, ``concurrency`` jobs at once)."""
    url = migrated_database(server, f"dispatch_{next(_databases)}")
    engine = open_index(Settings(database={"url": url}).database)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        for pk in range(1, jobs + 1):
            defer(session, INFERENCE_JOB, pk, NO_MODEL_QUEUE)
    options = WorkerOptions(
        queues=[NO_MODEL_QUEUE],
        concurrency=concurrency,
        batch_size=1,
        max_attempts=3,
        retry_backoff=1.0,
        poll_interval=0.5,
        heartbeat_interval=5.0,
        stalled_after=30.0,
        stalled_check=5.0,
        every_model_queue=NO_MODEL_QUEUE,
    )
    worker = TaskWorker(url, sessions, {INFERENCE_JOB: nothing}, options)
    rate = jobs_per_second(worker, jobs, lambda: succeeded(url))
    engine.dispose()
    return rate


def jobs_per_second(workers: WorkerPool | TaskWorker, jobs: int, done: Callable[[], int]) -> float:
    """Start ``workers`` on ``jobs`` waiting jobs; jobs per second until ``done()`` counts them all."""
    started = time.perf_counter()
    workers.start()
    wait_until(lambda: done() == jobs)
    elapsed = time.perf_counter() - started
    workers.stop()
    return jobs / elapsed


def done_jobs(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.DONE))


def succeeded(url: str, task: str = INFERENCE_JOB) -> int:
    with psycopg.connect(psycopg_url(url)) as connection:
        return connection.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE task_name = %s AND status = 'succeeded'", (task,)
        ).fetchone()[0]


# --- 2. inference role throughput ----------------------------------------------------------------------------


def inference_throughput(
    server: str, work: Path, phantoms: Path, graphs: Path, processes: int, threads: int
) -> tuple[float, str, Path]:
    """Images per second of ``processes`` worker processes with ``threads`` model threads each, on the phantoms
    an ingest node received; timed from all workers ready (their models loaded) to the last result. Returns it
    with the index and the storage root, where the outputs jobs wait."""
    url = migrated_database(server, f"throughput_{next(_databases)}")
    storage = with_onnx_graphs(work / f"storage-{processes}x{threads}", graphs)
    settings = Settings(storage={"root": storage}, database={"url": url}, dicom={"port": free_port()})
    ingest = Node(settings, role="ingest")
    files = sorted(phantoms.glob("*.dcm"))
    for path in files:
        ingest.ingestor.ingest(read_file_meta_info(path), [encoded_dataset(path)], "MODALITY")
    environment = {
        "DICOM_NODE_DATABASE__URL": url,
        "DICOM_NODE_INFERENCE__THREADS": str(threads),
        "DICOM_NODE_MLFLOW__ENABLED": "false",
    }
    # the workers wait, paused, until all have their models: only inference is timed
    with psycopg.connect(psycopg_url(url), autocommit=True) as connection:
        connection.execute("UPDATE procrastinate_jobs SET scheduled_at = now() + interval '1 hour'")
    workers = [
        ServeProcess(
            storage, environment=environment, command=("worker", "--queues", INFERENCE_QUEUES, "--concurrency", "8")
        )
        for _ in range(processes)
    ]
    try:
        for worker in workers:
            worker.wait_until_ready(300)
        started = time.perf_counter()
        with psycopg.connect(psycopg_url(url), autocommit=True) as connection:
            connection.execute("UPDATE procrastinate_jobs SET scheduled_at = NULL")
        wait_until(lambda: inference_done(url) == len(files), timeout=600)
        elapsed = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.stop()
            worker.ensure_stopped()
        ingest.stop()
    return len(files) / elapsed, url, storage


def outputs_throughput(url: str, storage: Path, images: int) -> float:
    """Images per second of one outputs worker process (Secondary Captures and the report of each image, no
    destination), on the outputs jobs the inference left waiting; timed from the worker ready."""
    with psycopg.connect(psycopg_url(url), autocommit=True) as connection:
        connection.execute(
            "UPDATE procrastinate_jobs SET scheduled_at = now() + interval '1 hour' WHERE status = 'todo'"
        )
    environment = {"DICOM_NODE_DATABASE__URL": url, "DICOM_NODE_MLFLOW__ENABLED": "false"}
    worker = ServeProcess(storage, environment=environment, command=("worker", "--queues", "outputs"))
    try:
        worker.wait_until_ready(300)
        started = time.perf_counter()
        with psycopg.connect(psycopg_url(url), autocommit=True) as connection:
            connection.execute("UPDATE procrastinate_jobs SET scheduled_at = NULL")
        wait_until(lambda: succeeded(url, "outputs") == images, timeout=600)
        elapsed = time.perf_counter() - started
    finally:
        worker.stop()
        worker.ensure_stopped()
    return images / elapsed


def inference_done(url: str) -> int:
    return succeeded(url, INFERENCE_JOB)


# --- 3. end to end -------------------------------------------------------------------------------------------


def push_to_report(pacs: Orthanc, studies: list[Study], poll: float = 0.02) -> list[float]:
    """Seconds from each study's push to its report in Orthanc, one study at a time; the first is a warm-up."""
    latencies = []
    for study in studies:
        started = time.perf_counter()
        pacs.send_to_modality("ainode", [study.orthanc_id])
        wait_until(lambda study=study: report_in(pacs, study.study_uid), timeout=120, poll=poll)
        latencies.append(time.perf_counter() - started)
    return latencies[1:]


def end_to_end_single(work: Path, labels) -> list[float]:
    port = free_port()
    with orthanc(work / "orthanc-single", modalities={"ainode": ("AINODE", "127.0.0.1", port)}) as pacs:
        node = start_node(node_settings(work / "storage-single", port, pacs))
        try:
            studies = [upload(pacs, work / "phantoms-e2e" / label.file, label.task) for label in labels]
            return push_to_report(pacs, studies)
        finally:
            node.stop()


def end_to_end_cluster(server: str, work: Path, graphs: Path, labels) -> list[float]:
    url = migrated_database(server, f"cluster_{next(_databases)}")
    ingest_port = free_port()
    with orthanc(work / "orthanc-cluster", modalities={"ainode": ("AINODE", "127.0.0.1", ingest_port)}) as pacs:
        destination = (
            f'[{{"name": "pacs", "ae_title": "{pacs.ae_title}", "host": "127.0.0.1", "port": {pacs.dicom_port}}}]'
        )
        environment = {
            "DICOM_NODE_DATABASE__URL": url,
            "DICOM_NODE_DESTINATIONS": destination,
            "DICOM_NODE_DELIVERY__DEFAULT_DESTINATION": "pacs",
        }
        commands = [
            (("serve", "--role", "ingest"), ingest_port),
            (("serve", "--role", "ingest"), None),
            (("worker", "--queues", INFERENCE_QUEUES), None),
            (("worker", "--queues", INFERENCE_QUEUES), None),
            (("worker", "--queues", "outputs,deliver,track"), None),
            (("serve", "--role", "web"), None),
        ]
        storage = with_onnx_graphs(work / "storage-cluster", graphs)
        processes = [
            ServeProcess(storage, dicom_port=port, environment=environment, command=command)
            for command, port in commands
        ]
        try:
            for process in processes:
                process.wait_until_ready(300)
            studies = [upload(pacs, work / "phantoms-e2e" / label.file, label.task) for label in labels]
            return push_to_report(pacs, studies)
        finally:
            for process in processes:
                process.stop()
                process.ensure_stopped()


def wait_until(condition: Callable[[], bool], timeout: float = 300, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step did not finish")
        time.sleep(poll)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="no-op jobs dispatched")
    parser.add_argument("--images", type=int, default=100, help="phantoms run by the inference role")
    parser.add_argument("--studies", type=int, default=20, help="studies timed end to end")
    args = parser.parse_args()
    measured: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as temporary, temporary_postgres() as server:
        work = Path(temporary)
        in_process = dispatch_in_process(work / "dispatch", args.jobs, threads=2)
        through_engine = dispatch_through_the_engine(server, args.jobs, concurrency=8)
        print(f"1. dispatch of {args.jobs} jobs that do nothing")
        print(f"   in-process queue (SQLite, 2 worker threads)          {in_process:8.0f} jobs/s")
        print(f"   task engine (Procrastinate, PostgreSQL, 8 at once)  {through_engine:8.0f} jobs/s")
        print(f"   engine / in-process                                 {through_engine / in_process:8.2f}")
        measured["engine dispatch, jobs/s"] = through_engine

        graphs = work / "onnx"  # exported once, copied into each storage root
        InferenceModels.load(InferenceSettings(**DEMO_CARDS), graphs)
        phantoms = work / "phantoms"
        generate_phantoms(phantoms, args.images, seed=5000, task="both", workers=2)
        one, url, storage = inference_throughput(server, work, phantoms, graphs, processes=1, threads=2)
        two, _, _ = inference_throughput(server, work, phantoms, graphs, processes=2, threads=1)
        outputs = outputs_throughput(url, storage, args.images)
        print(f"2. inference role, {args.images} phantoms (hands and feet), timed after the models are loaded")
        print(f"   one worker process, two model threads                {one:8.2f} images/s")
        print(f"   two worker processes, one model thread each          {two:8.2f} images/s")
        print(f"   two / one                                           {two / one:8.2f}")
        print(f"   then one outputs worker process (SC + SR per image) {outputs:8.2f} images/s")
        measured["two processes / one, throughput"] = two / one

        labels = generate_phantoms(work / "phantoms-e2e", args.studies + 1, seed=4000, task="both", workers=2)
        single = end_to_end_single(work, labels)
        cluster = end_to_end_cluster(server, work, graphs, labels)
        print(f"3. push to SR in Orthanc, {args.studies} studies one at a time (p50 / p95 / max, s)")
        for name, latencies in (("single process, SQLite", single), ("cluster of six processes, PostgreSQL", cluster)):
            p50, p95 = np.quantile(latencies, [0.5, 0.95])
            print(f"   {name:50} {p50:6.2f} {p95:6.2f} {max(latencies):6.2f}")
        ratio = np.quantile(cluster, 0.95) / np.quantile(single, 0.95)
        print(f"   cluster p95 / single p95                            {ratio:8.2f}")

    print_verdicts(measured, TARGETS)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DICOM_NODE_LOGGING__LEVEL", "WARNING")
    sys.exit(main())
