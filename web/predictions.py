"""Inference for an HTTP upload, in the request, and its results in the seed projects' shape.

An upload is ingested like an image the SCP received, which queues its inference job. The request then waits
for that job before it answers (:func:`infer_now`). On PostgreSQL the workers run it, as any other job: the web
role loads no model. On SQLite, the one-process node, the request gets the job done itself when no worker was
quicker: it claims it with the queue's conditional update (``pending`` -> ``running``, as a worker claims one),
runs the node's inference handler on it, then completes or fails it through the queue as a worker would, so it
also answers on a node started with ``workers.count: 0``. Either way the job runs once and the results are
recorded as for any received image (the outputs job, the MLflow run follow in the background).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Sequence

from fastapi import HTTPException, status
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node.config import TaskName
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.jobs import ClaimedJob, PermanentJobError
from dicom_node.models import InferenceResult, Instance, Job, JobState, TrackedRun, TrackingState
from dicom_node.node import Node
from inference.model_card import DEMO_DISCLAIMER
from web.predict_schemas import BoneAgePrediction, ModelBrief, PatientPrediction, PredictionOut

INFERENCE_WAIT_S = 60.0  # how long a request waits for a worker that claimed the job first
_POLL_S = 0.05


def infer_now(node: Node, instance_pk: int, timeout: float = INFERENCE_WAIT_S) -> None:
    """Return once the instance's inference job is done; raise the reason as an HTTP error otherwise."""
    handler = None if node.distributed else node.handlers.get(INFERENCE_JOB)
    if handler is None and not node.distributed:
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
        if job.state == JobState.PENDING and handler is not None:
            claimed = _claim(node, job)
            if claimed is not None:
                _run(node, handler, claimed)
                continue
        if time.monotonic() > deadline:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"inference did not finish within {timeout:g} s; its results will be listed under "
                "/results/{patient_id}",
            )
        time.sleep(_POLL_S)


def _claim(node: Node, job: Job) -> ClaimedJob | None:
    """Take the pending job as a worker does, unless a worker (or another request) took it since it was read."""
    with node.sessions.begin() as session:
        taken = session.execute(
            update(Job)
            .where(
                Job.id == job.id,
                Job.state == JobState.PENDING,
                Job.generation == job.generation,
                Job.attempts == job.attempts,
            )
            .values(state=JobState.RUNNING, attempts=Job.attempts + 1, updated_at=dt.datetime.now(dt.UTC))
            .execution_options(synchronize_session=False)
        ).rowcount
    return ClaimedJob(job.id, job.kind, job.instance_pk, job.attempts + 1, job.generation) if taken else None


def _run(node: Node, handler, claimed: ClaimedJob) -> None:
    """Run the handler on the claimed job and finish it through the queue, as :class:`WorkerPool` does."""
    try:
        error = handler([claimed]).get(claimed.id)
    except Exception as raised:
        error = raised
    if error is None:
        node.queue.complete(claimed)
    else:
        permanent = isinstance(error, PermanentJobError)
        node.queue.fail(claimed, str(error) if permanent else f"{type(error).__name__}: {error}", permanent)
    node.wake_workers()  # the outputs job the results queued


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
    results, of ``task`` only when given."""
    results = [result for result in results if task is None or result.task == task]
    study = instance.series.study
    by_task: dict[str, list[InferenceResult]] = {}
    for result in results:
        by_task.setdefault(result.task, []).append(result)
    fields: dict = {
        "patient_id": study.patient.patient_id,
        "prediction_id": instance.sop_instance_uid,
        "study_instance_uid": study.study_instance_uid,
        "tasks": [name for name in ("hallux_valgus", "bone_age") if name in by_task],
        "mlflow_run_id": run_id,
        "timestamp": max(result.created_at for result in results),
        "inference_time": round(sum(results[0].timings_ms.values()) / 1000.0, 4),
        "model_info": {name: _model_brief(rows[0]) for name, rows in by_task.items()},
        "instance_url": f"/api/instances/{instance.sop_instance_uid}",
        "prediction": None,
        "confidence": None,
        "hallux_valgus_detected": None,
        "probabilities": None,
        "hallux_valgus_angle_deg": None,
        "hallux_valgus_gradcam_url": None,
        "male_prediction": None,
        "female_prediction": None,
    }
    for result in by_task.get("hallux_valgus", [])[:1]:
        values = result.values
        fields |= {
            "prediction": values["prediction"],
            "confidence": values["confidence"],
            "hallux_valgus_detected": values["hallux_valgus_detected"],
            "probabilities": values["probabilities"],
            "hallux_valgus_angle_deg": values.get("hallux_valgus_angle_deg"),
            "hallux_valgus_gradcam_url": _heatmap_url(result),
        }
    for result in by_task.get("bone_age", []):
        values = result.values
        fields[f"{result.output}_prediction"] = BoneAgePrediction(
            age=round(values["age_months"] / 12.0, 3),
            uncertainty_sigma=round(values["sigma_months"] / 12.0, 3),
            age_months=values["age_months"],
            uncertainty_sigma_months=values["sigma_months"],
            is_primary=result.is_primary,
            gradcam_url=_heatmap_url(result),
            timestamp=result.created_at,
        )
    return fields


def prediction_out(instance: Instance, results: Sequence[InferenceResult], run_id: str | None, task=None):
    return PredictionOut(**prediction_fields(instance, results, run_id, task))


def patient_prediction(instance: Instance, run_id: str | None) -> PatientPrediction:
    fields = prediction_fields(instance, instance.results, run_id)
    for sex in ("male", "female"):
        estimate: BoneAgePrediction | None = fields[f"{sex}_prediction"]
        fields[f"{sex}_age"] = estimate.age if estimate else None
        fields[f"{sex}_uncertainty"] = estimate.uncertainty_sigma if estimate else None
    return PatientPrediction(**fields)


def newest_first(instances: Iterable[Instance]) -> list[Instance]:
    """Instances with results, those whose results were recorded last first."""
    with_results = [instance for instance in instances if instance.results]
    return sorted(
        with_results,
        key=lambda instance: (max(_utc(result.created_at) for result in instance.results), instance.id),
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


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite hands times back without their zone (UTC); PostgreSQL with it."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _heatmap_url(result: InferenceResult) -> str:
    return f"/api/results/{result.id}/heatmap.png"
