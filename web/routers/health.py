"""``GET /health``: is the node alive, and is each part it needs working?"""

from __future__ import annotations

import os
from typing import Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.jobs import count_by_state
from web.dependencies import ContextDep, WebContext

router = APIRouter(tags=["health"])


class PartHealth(BaseModel):
    ok: bool
    detail: str = ""


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: PartHealth
    storage: PartHealth
    dicom_listener: PartHealth
    jobs: dict[str, int]


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def health(context: ContextDep, response: Response) -> Health:
    database, jobs = _database(context)
    root = context.settings.storage.root
    storage = PartHealth(ok=os.access(root, os.W_OK), detail=str(root))
    listener = PartHealth(
        ok=context.listener_up(), detail=f"{context.settings.dicom.ae_title}@{context.settings.dicom.port}"
    )
    healthy = database.ok and storage.ok and listener.ok
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(
        status="ok" if healthy else "degraded", database=database, storage=storage, dicom_listener=listener, jobs=jobs
    )


def _database(context: WebContext) -> tuple[PartHealth, dict[str, int]]:
    """The database's health and, when it answers, the number of jobs in each state."""
    try:
        with context.sessions() as session:
            session.execute(text("SELECT 1"))
            jobs = {state.value: count for state, count in count_by_state(session).items()}
    except SQLAlchemyError as error:
        return PartHealth(ok=False, detail=type(error).__name__), {}
    return PartHealth(ok=True), jobs
