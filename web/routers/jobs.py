"""``/api/jobs``: the job queue, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from dicom_node.models import Instance, Job, JobState
from web.dependencies import IndexText, Limit, Offset, SessionDep
from web.schemas import JobListItem, JobOut, Page

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("", response_model=Page[JobListItem])
def list_jobs(
    session: SessionDep,
    state: JobState | None = None,
    kind: Annotated[IndexText | None, Query(max_length=32, description="inference or outputs")] = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> Page[JobListItem]:
    """Jobs, the most recently created first."""
    conditions = []
    if state is not None:
        conditions.append(Job.state == state)
    if kind is not None:
        conditions.append(Job.kind == kind)
    total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    rows = session.execute(
        select(Job, Instance.sop_instance_uid)
        .join(Instance, Job.instance_pk == Instance.id)
        .where(*conditions)
        .order_by(Job.id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    items = [JobListItem(**JobOut.model_validate(job).model_dump(), sop_instance_uid=sop_uid) for job, sop_uid in rows]
    return Page(items=items, total=total, offset=offset, limit=limit)
