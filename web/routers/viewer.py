"""The results viewer: server-rendered pages over the node's index, readable without JavaScript.

``/patients`` lists who was received, ``/patients/{id}`` shows a patient's studies, series and images, and
``/instances/{uid}`` one image with its results: the heatmap laid over the X-ray (switchable per result), each
task's results in the task's own template (``Task.viewer_template``), the jobs and the deliveries of the objects
the node wrote. The pages read the same records as the JSON API (they call its route functions), so that they
show what the API returns. Every page carries the "not for diagnostic use" banner.

With ``web.api_token`` set the pages ask for it too (they show patient data): as the API's bearer header, or
as the ``dicom_node_token`` cookie that the ``/login`` form sets (HttpOnly, SameSite=Strict); the API's
image routes accept that cookie, so that the pages' ``<img>`` load.
"""

from __future__ import annotations

import datetime as dt
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates
from pydicom.uid import UID
from sqlalchemy import select

from dicom_node.ai_tasks.registry import installed_tasks
from dicom_node.config import Settings
from dicom_node.models import InferenceResult, Instance, Patient
from inference.model_card import DEMO_DISCLAIMER
from web.dependencies import TOKEN_COOKIE, IndexText, Limit, Offset, SessionDep, SettingsDep, require_token
from web.imaging import MAX_OPACITY
from web.routers.instances import get_instance
from web.routers.patients import get_patient, list_patients
from web.schemas import InstanceDetail, ResultOut

WEB_DIRECTORY = Path(__file__).resolve().parent.parent
TEMPLATES_DIRECTORY = WEB_DIRECTORY / "templates"
STATIC_DIRECTORY = WEB_DIRECTORY / "static"

BANNER = "AI RESULTS - NOT FOR DIAGNOSTIC USE"
DEMO_LABEL = f"Demo model: {DEMO_DISCLAIMER}"
IMAGE_SIZE = 1024  # max_size of the X-ray and of its heatmaps on the image page: they lie pixel for pixel
THUMBNAIL_SIZE = 256
NO_OVERLAY = "none"
# patient data: not kept in browser or proxy caches
PAGE_HEADERS = {"Cache-Control": "no-store"}

router = APIRouter(include_in_schema=False)


# --- templates ----------------------------------------------------------------------------------------------


def _segment(value: object) -> str:
    """``value`` as one URL path segment: a PatientID is free text ("/", spaces, "?", "..")."""
    return quote(str(value), safe="")


def _utc(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _slug(value: object) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-")


def _sop_class(uid: str) -> str:
    name = UID(uid).name
    return name.removesuffix(" Storage") if name != uid else uid


def _safe_href(url: object) -> str:
    """Only http(s) or same-site links (no ``javascript:``)."""
    text = str(url)
    return text if re.match(r"^(https?://|/(?!/))", text) else "#"


def _dicom_name(name: str | None) -> str:
    return " ".join(part for part in (name or "").replace("^", " ").split()) or "—"


def _environment() -> jinja2.Environment:
    # each task's template under the task's name: "<task>/<file>.html"
    task_templates = jinja2.PrefixLoader(
        {
            name: jinja2.FileSystemLoader(task.viewer_template.parent)
            for name, task in installed_tasks().items()
            if task.viewer_template is not None
        }
    )
    environment = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(TEMPLATES_DIRECTORY), task_templates]),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        segment=_segment, utc=_utc, slug=_slug, sop_class=_sop_class, safe_href=_safe_href, dicom_name=_dicom_name
    )
    environment.globals.update(
        BANNER=BANNER,
        DEMO_LABEL=DEMO_LABEL,
        IMAGE_SIZE=IMAGE_SIZE,
        THUMBNAIL_SIZE=THUMBNAIL_SIZE,
        NO_OVERLAY=NO_OVERLAY,
        MAX_OPACITY=MAX_OPACITY,
    )
    return environment


templates = Jinja2Templates(env=_environment())


def _render(
    request: Request, settings: Settings, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    context = {"token_required": settings.web.api_token is not None, **context}
    return templates.TemplateResponse(request, name, context, status_code=status_code, headers=PAGE_HEADERS)


def _not_found(request: Request, settings: Settings, message: str) -> HTMLResponse:
    return _render(request, settings, "not_found.html", {"message": message}, status.HTTP_404_NOT_FOUND)


# --- the token ----------------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False)


def _local_path(target: str | None) -> str:
    """``target`` when it is a path on this site, else the patient list (no open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/patients"


def viewer_token(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """As the API's token check, but a browser without the token is sent to ``/login``."""
    try:
        require_token(settings, credentials, request.cookies.get(TOKEN_COOKIE))
    except HTTPException:
        raw_path = request.scope.get("raw_path")  # as sent: a PatientID's "/" stays encoded
        path = raw_path.decode("latin-1") if raw_path else quote(request.url.path)
        target = path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(
            status.HTTP_303_SEE_OTHER, "log in first", headers={"Location": "/login?" + urlencode({"next": target})}
        ) from None


ViewerAccess = [Depends(viewer_token)]


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, settings: SettingsDep, next: str | None = None) -> Response:
    if settings.web.api_token is None:
        return RedirectResponse(_local_path(next), status.HTTP_303_SEE_OTHER)
    return _render(request, settings, "login.html", {"next": _local_path(next), "error": None, "login_page": True})


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, settings: SettingsDep) -> Response:
    """Check the token from the form and keep it in an HttpOnly, SameSite=Strict cookie."""
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=8)
    given = (form.get("token") or [""])[0].strip()
    target = _local_path((form.get("next") or [None])[0])
    token = settings.web.api_token
    if token is None:
        return RedirectResponse(target, status.HTTP_303_SEE_OTHER)
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        context = {"next": target, "error": "That is not the node's token.", "login_page": True}
        return _render(request, settings, "login.html", context, status.HTTP_401_UNAUTHORIZED)
    response = RedirectResponse(target, status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        TOKEN_COOKIE, given, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    response.delete_cookie(TOKEN_COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --- pages --------------------------------------------------------------------------------------------------


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/patients", status.HTTP_307_TEMPORARY_REDIRECT)


def _patients_url(search: str | None, offset: int, limit: int) -> str:
    query = {key: value for key, value in (("search", search), ("offset", offset), ("limit", limit)) if value}
    return "/patients" + (f"?{urlencode(query)}" if query else "")


@router.get("/patients", response_class=HTMLResponse, dependencies=ViewerAccess)
def patients_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    search: Annotated[IndexText | None, Query(max_length=324)] = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> HTMLResponse:
    search = (search or "").strip() or None
    page = list_patients(session, search=search, offset=offset, limit=limit)
    previous_url = _patients_url(search, max(offset - limit, 0), limit) if offset > 0 else None
    next_url = _patients_url(search, offset + limit, limit) if offset + limit < page.total else None
    context = {"page": page, "search": search or "", "previous_url": previous_url, "next_url": next_url}
    return _render(request, settings, "patients.html", context)


@router.get("/patients/{patient_id:path}", response_class=HTMLResponse, dependencies=ViewerAccess)
def patient_page(patient_id: IndexText, request: Request, session: SessionDep, settings: SettingsDep) -> HTMLResponse:
    try:
        patient = get_patient(patient_id, session)
    except HTTPException as error:
        if error.status_code != status.HTTP_404_NOT_FOUND:
            raise
        return _not_found(request, settings, "There is no patient with this PatientID.")
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
    return _render(request, settings, "patient.html", {"patient": patient, "summaries": summaries})


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


@router.get("/instances/{sop_uid}", response_class=HTMLResponse, dependencies=ViewerAccess)
def instance_page(
    sop_uid: IndexText,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    result: Annotated[str | None, Query(max_length=32, description="The result whose heatmap to show.")] = None,
) -> HTMLResponse:
    try:
        instance: InstanceDetail = get_instance(sop_uid, session, settings)
    except HTTPException as error:
        if error.status_code != status.HTTP_404_NOT_FOUND:
            raise
        return _not_found(request, settings, "There is no instance with this SOP Instance UID.")
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
    return _render(request, settings, "instance.html", context)
