"""``GET /health``: is the process alive, and is each part its role needs working?

Required parts answer 503 when one is down: the database and writable storage always; the DICOM listener where
the process receives (roles ``all`` and ``ingest``); the models where it runs inference (``all``, and a
``worker`` whose queues need them). A node started without a missing model (``inference.on_missing_model:
degraded``) is degraded too: it receives and stores images but that model's jobs wait. On PostgreSQL they wait
in their queue for a worker that has the model: ``queues`` shows every queue's waiting jobs and the age of the
oldest. MLflow is reported but not required: inference and delivery go on without it, and the runs are logged
when it is back.
"""

from __future__ import annotations

import os
from typing import Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node.delivery import count_by_state as deliveries_by_state
from dicom_node.jobs import count_by_state as jobs_by_state
from dicom_node.jobs import waiting_by_queue
from dicom_node.models import TrackedRun, TrackingState
from dicom_node.task_engine import models_of_queues
from web.dependencies import ContextDep, WebContext

router = APIRouter(tags=["health"])


class PartHealth(BaseModel):
    ok: bool
    detail: str = ""


class ModelHealth(BaseModel):
    name: str
    version: str
    weights_digest: str
    demo: bool


class QueueHealth(BaseModel):
    waiting: int = Field(description="Jobs in the queue not yet taken (due or scheduled for a retry).")
    oldest_seconds: float = Field(description="Seconds since the oldest of them was queued.")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    role: str | None = Field(description="What this process runs (dicom-node serve --role); null without a node.")
    database: PartHealth
    storage: PartHealth
    dicom_listener: PartHealth | None = Field(description="Where the process receives (roles all and ingest).")
    models: list[ModelHealth] | None = Field(
        description="The loaded models where the process runs inference; null where it runs none."
    )
    serves_queues: list[str] | None = Field(None, description="The queues a worker takes jobs from.")
    queues: dict[str, QueueHealth] = Field(default_factory=dict, description="The waiting jobs, by queue.")
    missing_models: dict[str, str] = Field(
        default_factory=dict,
        description="Tasks whose model was missing at start (inference.on_missing_model: degraded), with the reason; "
        "their jobs wait until the node is restarted with the model.",
    )
    mlflow: PartHealth = Field(description="Runs waiting to be logged and the last error; not a required part.")
    jobs: dict[str, int]
    deliveries: dict[str, int]


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def health(context: ContextDep, response: Response) -> Health:
    database, jobs, deliveries, mlflow, queues = _index(context)
    node = context.node
    root = context.settings.storage.root
    storage = PartHealth(ok=os.access(root, os.W_OK), detail=str(root))
    listener = None
    if node is None or node.receives:
        listener = PartHealth(
            ok=context.listener_up(), detail=f"{context.settings.dicom.ae_title}@{context.settings.dicom.port}"
        )
    models = _models(context)
    missing = dict(node.models.missing) if node is not None and node.models is not None else {}
    healthy = database.ok and storage.ok and (listener is None or listener.ok) and models != [] and not missing
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(
        status="ok" if healthy else "degraded",
        role=node.role if node is not None else None,
        database=database,
        storage=storage,
        dicom_listener=listener,
        models=models,
        missing_models=missing,
        serves_queues=node.queues if node is not None and node.works else None,
        queues=queues,
        mlflow=mlflow,
        jobs=jobs,
        deliveries=deliveries,
    )


def _models(context: WebContext) -> list[ModelHealth] | None:
    """The models of a process that runs inference; an empty list is one without models (it cannot infer)."""
    node = context.node
    if node is None or not node.works or (node.role == "worker" and not models_of_queues(node.queues)):
        return None
    loaded = node.models
    if loaded is None:
        return []
    return [
        ModelHealth(
            name=model.card.name, version=model.card.version, weights_digest=model.weights_digest, demo=model.card.demo
        )
        for model in loaded.loaded().values()
    ]


def _index(
    context: WebContext,
) -> tuple[PartHealth, dict[str, int], dict[str, int], PartHealth, dict[str, QueueHealth]]:
    """The database's health and, when it answers, jobs and deliveries by state, the MLflow backlog and the
    waiting jobs by queue."""
    try:
        with context.sessions() as session:
            session.execute(text("SELECT 1"))
            jobs = {state.value: count for state, count in jobs_by_state(session).items()}
            deliveries = {state.value: count for state, count in deliveries_by_state(session).items()}
            mlflow = _mlflow(session, context)
            queues = {
                name: QueueHealth(waiting=depth.waiting, oldest_seconds=round(depth.oldest_seconds, 1))
                for name, depth in sorted(waiting_by_queue(session).items())
            }
    except SQLAlchemyError as error:
        unknown = PartHealth(ok=False, detail="unknown: the index does not answer")
        return PartHealth(ok=False, detail=type(error).__name__), {}, {}, unknown, {}
    return PartHealth(ok=True), jobs, deliveries, mlflow, queues


def _mlflow(session: Session, context: WebContext) -> PartHealth:
    """Healthy while no run that is waiting has failed to log."""
    settings = context.settings.mlflow
    if not settings.enabled:
        return PartHealth(ok=True, detail="tracking switched off (mlflow.enabled)")
    waiting = session.scalar(
        select(func.count()).select_from(TrackedRun).where(TrackedRun.state == TrackingState.PENDING)
    )
    last_error = session.scalar(
        select(TrackedRun.last_error)
        .where(TrackedRun.state == TrackingState.PENDING, TrackedRun.attempts > 0, TrackedRun.last_error.is_not(None))
        .order_by(TrackedRun.available_at.desc())
        .limit(1)
    )
    detail = f"{waiting} runs waiting to be logged"
    if last_error is None:
        return PartHealth(ok=True, detail=detail)
    # only the error's type: /health is open, and the message may name the tracking URI and its credentials
    return PartHealth(ok=False, detail=f"{detail}; logging fails ({last_error.partition(':')[0]})")
