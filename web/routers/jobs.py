"""``/api/jobs``: the job queue, newest first; a failed or finished job can be run again."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import func, select

from dicom_node.jobs import JobNotFinished, run_again
from dicom_node.models import Instance, Job, JobState
from web.dependencies import ContextDep, IndexText, Limit, Offset, RowId, SessionDep
from web.schemas import JobListItem, JobOut, Page, Problem

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


@router.post("/{job_id}/rerun", response_model=JobOut, responses={404: {"model": Problem}, 409: {"model": Problem}})
def rerun_job(job_id: RowId, context: ContextDep, session: SessionDep) -> JobOut:
    """Run a failed or finished job again with fresh attempts (its inference, or its outputs); 409 for a job that
    is pending or running. On PostgreSQL the job's newest run is the one listed, and a new run is queued."""
    try:
        queued = run_again(context.sessions, job_id)
    except JobNotFinished as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    if queued is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    if context.node is not None:
        context.node.wake_workers()
    session.rollback()  # end the request's read transaction: read the job as queued now
    instance_pk, kind = queued
    return JobOut.model_validate(session.scalar(select(Job).where(Job.instance_pk == instance_pk, Job.kind == kind)))
