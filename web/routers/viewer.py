"""The results viewer: server-rendered pages over the node's index, readable without JavaScript.

``/patients`` lists who was received, ``/patients/{id}`` shows a patient's studies, series and images, and
``/instances/{uid}`` one image with its results: the heatmap laid over the X-ray (switchable per result), each
task's results in the task's own template (``Task.viewer_template``), the jobs and the deliveries of the objects
the node wrote. The pages read the same records as the JSON API (they call its route functions, which record the
reads in the audit trail), so that they show what the API returns.

The pages need the viewer role; a browser that has not signed in is sent to ``/login`` (:mod:`web.routers.sign_in`).
The session cookie also lets the pages' ``<img>`` load the API's images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from dicom_node.ai_tasks.registry import installed_tasks
from dicom_node.models import InferenceResult, Instance, Patient
from web.audit import AuditDep
from web.auth import PAGE_VIEWER
from web.dependencies import IndexText, Limit, Offset, SessionDep, SettingsDep
from web.routers.instances import get_instance
from web.routers.patients import get_patient, list_patients
from web.schemas import InstanceDetail, ResultOut
from web.viewer_pages import NO_OVERLAY, STATIC_DIRECTORY, not_found, render

__all__ = ["STATIC_DIRECTORY", "router"]

router = APIRouter(include_in_schema=False)


# --- pages --------------------------------------------------------------------------------------------------


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/patients", status.HTTP_307_TEMPORARY_REDIRECT)


def _patients_url(search: str | None, offset: int, limit: int) -> str:
    query = {key: value for key, value in (("search", search), ("offset", offset), ("limit", limit)) if value}
    return "/patients" + (f"?{urlencode(query)}" if query else "")


@router.get("/patients", response_class=HTMLResponse, dependencies=PAGE_VIEWER)
def patients_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    audit: AuditDep,
    search: Annotated[IndexText | None, Query(max_length=324)] = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> HTMLResponse:
    search = (search or "").strip() or None
    page = list_patients(session, audit, search=search, offset=offset, limit=limit)
    previous_url = _patients_url(search, max(offset - limit, 0), limit) if offset > 0 else None
    next_url = _patients_url(search, offset + limit, limit) if offset + limit < page.total else None
    context = {"page": page, "search": search or "", "previous_url": previous_url, "next_url": next_url}
    return render(request, settings, "patients.html", context)


@router.get("/patients/{patient_id:path}", response_class=HTMLResponse, dependencies=PAGE_VIEWER)
def patient_page(
    patient_id: IndexText, request: Request, session: SessionDep, settings: SettingsDep, audit: AuditDep
) -> HTMLResponse:
    try:
        patient = get_patient(patient_id, session, audit)
    except HTTPException as error:
        if error.status_code != status.HTTP_404_NOT_FOUND:
            raise
        return not_found(request, settings, "There is no patient with this PatientID.")
    uids = [
        instance.sop_instance_uid
        for study in patient.studies
        for series in study.series
        for instance in series.instances
        if not instance.node_written
    ]
    summaries: dict[str, list[tuple[str, bool]]] = {}
    rows = session.execute(
        select(Instance.sop_instance_uid, InferenceResult.summary, InferenceResult.demo_model)
        .join(InferenceResult, InferenceResult.instance_pk == Instance.id)
        .where(Instance.sop_instance_uid.in_(uids), InferenceResult.is_primary)
        .order_by(InferenceResult.id)
    )
    for uid, summary, demo in rows:
        summaries.setdefault(uid, []).append((summary, demo))
    return render(request, settings, "patient.html", {"patient": patient, "summaries": summaries})


def _shown_result(results: list[ResultOut], choice: str | None) -> ResultOut | None:
    """The result whose heatmap lies over the image: the one asked for, else the first primary one."""
    if choice == NO_OVERLAY or not results:
        return None
    for result in results:
        if choice is not None and str(result.id) == choice:
            return result
    return next((result for result in results if result.is_primary), results[0])


@dataclass(frozen=True)
class _TaskSection:
    """A task's part of the image page: its template, its results and what the task makes of them."""

    template: str
    results: list[ResultOut]
    context: dict[str, object]


def _task_sections(results: list[ResultOut]) -> tuple[list[_TaskSection], list[ResultOut]]:
    """The sections of the tasks with a template, in the order of their first result; the other results."""
    sections, others = {}, []
    for result in results:
        task = installed_tasks().get(result.task)
        if task is None or task.viewer_template is None:
            others.append(result)
        else:
            sections.setdefault(task, []).append(result)
    return [
        _TaskSection(f"{task.name}/{task.viewer_template.name}", of_task, task.viewer_context(of_task))
        for task, of_task in sections.items()
    ], others


def _label(result: ResultOut) -> str:
    task = installed_tasks().get(result.task)
    return task.label(result.output, result.values) if task is not None else f"{result.task}, {result.output}"


@router.get("/instances/{sop_uid}", response_class=HTMLResponse, dependencies=PAGE_VIEWER)
def instance_page(
    sop_uid: IndexText,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    audit: AuditDep,
    result: Annotated[str | None, Query(max_length=32, description="The result whose heatmap to show.")] = None,
) -> HTMLResponse:
    try:
        instance: InstanceDetail = get_instance(sop_uid, session, settings, audit)
    except HTTPException as error:
        if error.status_code != status.HTTP_404_NOT_FOUND:
            raise
        return not_found(request, settings, "There is no instance with this SOP Instance UID.")
    patient = session.scalar(select(Patient).where(Patient.patient_id == instance.patient_id))
    results = instance.results
    sections, other_results = _task_sections(results)
    context = {
        "instance": instance,
        "patient": patient,
        "results": results,
        "shown": _shown_result(results, result) if instance.image_url else None,
        "task_sections": sections,
        "other_results": other_results,
        "labels": {item.id: _label(item) for item in results},
        "any_demo": any(item.demo_model for item in results),
    }
    return render(request, settings, "instance.html", context)
