"""Inference for an HTTP upload, in the request, and its results in the seed projects' shape.

An upload is ingested like an image the SCP received, which queues its inference job. The request then waits
for that job before it answers (:func:`infer_now`), as any client of the node's jobs: on PostgreSQL the
workers run it. On SQLite, the one-process node, the request runs it itself through the worker pool when no
worker was quicker (:meth:`dicom_node.workers.WorkerPool.run_now`: the queue's claim, the pool's handlers and
outcomes), so it also answers on a node started with ``workers.count: 0``. Either way the job runs once and the
results are recorded as for any received image (the outputs job, the MLflow run follow in the background).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import TaskName
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.models import InferenceResult, Instance, Job, JobState, TrackedRun, TrackingState, as_utc
from dicom_node.node import Node
from dicom_node.workers import WorkerPool
from inference.model_card import DEMO_DISCLAIMER
from web.predict_schemas import TASKS_IN_THE_RESPONSES, ModelBrief, PatientPrediction, PredictionOut

INFERENCE_WAIT_S = 60.0  # how long a request waits for a worker that claimed the job first
_POLL_S = 0.05


def infer_now(node: Node, instance_pk: int, timeout: float = INFERENCE_WAIT_S) -> None:
    """Return once the instance's inference job is done; raise the reason as an HTTP error otherwise."""
    runs_here = isinstance(node.workers, WorkerPool) and INFERENCE_JOB in node.workers.handlers
    if not runs_here and not node.distributed:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "this node runs no models")
    deadline = time.monotonic() + timeout
    while True:
        with node.sessions() as session:
            job = session.scalar(select(Job).where(Job.instance_pk == instance_pk, Job.kind == INFERENCE_JOB))
            if job is None:  # ingest queues it in the transaction that indexes the instance
                raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "the image has no inference job")
            session.expunge(job)
        if job.state == JobState.DONE:
            return
        if job.state == JobState.FAILED:
            # fewer attempts than allowed: failed at once, an image no retry can read
            permanent = job.attempts < node.queue.max_attempts
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT if permanent else status.HTTP_500_INTERNAL_SERVER_ERROR,
                f"inference failed: {job.last_error}",
            )
        if job.state == JobState.PENDING and job.last_error is not None:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"inference failed and is retried later ({job.last_error}); its results will be listed under "
                "/results/{patient_id}",
            )
        if job.state == JobState.PENDING and runs_here and node.workers.run_now(job.id):
            continue
        if time.monotonic() > deadline:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"inference did not finish within {timeout:g} s; its results will be listed under "
                "/results/{patient_id}",
            )
        time.sleep(_POLL_S)


# --- results in the seeds' shape ----------------------------------------------------------------------------


def run_ids(session: Session, instance_pks: Iterable[int]) -> dict[int, str]:
    """The MLflow run id of each instance's current results, once logged."""
    rows = session.execute(
        select(TrackedRun.instance_pk, TrackedRun.run_id).where(
            TrackedRun.instance_pk.in_(list(instance_pks)), TrackedRun.state == TrackingState.LOGGED
        )
    )
    return {key: run_id for key, run_id in rows if run_id}


def prediction_fields(
    instance: Instance, results: Sequence[InferenceResult], run_id: str | None, task: TaskName | None = None
) -> dict:
    """The fields of :class:`PredictionOut` from an instance (its series, study and patient loaded) and its
    results, of ``task`` only when given: those of every prediction, then each installed task's."""
    results = [result for result in results if task is None or result.task == task]
    study = instance.series.study
    by_task: dict[str, list[InferenceResult]] = {}
    for result in results:
        by_task.setdefault(result.task, []).append(result)
    fields: dict = {
        "patient_id": study.patient.patient_id,
        "prediction_id": instance.id,
        "sop_instance_uid": instance.sop_instance_uid,
        "study_instance_uid": study.study_instance_uid,
        "tasks": list(by_task),
        "mlflow_run_id": run_id,
        "timestamp": max(result.created_at for result in results),
        "inference_time": round(sum(results[0].timings_ms.values()) / 1000.0, 4),
        "models": {name: _model_brief(rows[0]) for name, rows in by_task.items()},
        "instance_url": f"/api/instances/{instance.sop_instance_uid}",
    }
    for installed in TASKS_IN_THE_RESPONSES:
        fields |= installed.prediction_fields(by_task.get(installed.name, []), _heatmap_url)
    return fields


def prediction_out(instance: Instance, results: Sequence[InferenceResult], run_id: str | None, task=None):
    return PredictionOut(**prediction_fields(instance, results, run_id, task))


def patient_prediction(instance: Instance, run_id: str | None) -> PatientPrediction:
    fields = prediction_fields(instance, instance.results, run_id)
    for installed in TASKS_IN_THE_RESPONSES:
        fields |= installed.listing_fields(fields)
    return PatientPrediction(**fields)


def newest_first(instances: Iterable[Instance]) -> list[Instance]:
    """Instances with results, those whose results were recorded last first."""
    with_results = [instance for instance in instances if instance.results]
    return sorted(
        with_results,
        key=lambda instance: (max(as_utc(result.created_at) for result in instance.results), instance.id),
        reverse=True,
    )


def _model_brief(result: InferenceResult) -> ModelBrief:
    return ModelBrief(
        name=result.model_name,
        version=result.model_version,
        weights_digest=result.weights_digest,
        demo=result.demo_model,
        disclaimer=DEMO_DISCLAIMER if result.demo_model else None,
    )


def _heatmap_url(result: InferenceResult) -> str:
    return f"/api/results/{result.id}/heatmap.png"
