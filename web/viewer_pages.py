"""The viewer's page machinery: the Jinja environment (with each task's templates under its name), the filters,
and :func:`render`, which every page goes through. Every page carries the "not for diagnostic use" banner."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Request, status
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from pydicom.uid import UID

from dicom_node.ai_tasks.registry import installed_tasks
from dicom_node.config import Settings
from inference.model_card import DEMO_DISCLAIMER
from web.auth import csrf_token
from web.imaging import MAX_OPACITY

WEB_DIRECTORY = Path(__file__).resolve().parent
TEMPLATES_DIRECTORY = WEB_DIRECTORY / "templates"
STATIC_DIRECTORY = WEB_DIRECTORY / "static"

BANNER = "AI RESULTS - NOT FOR DIAGNOSTIC USE"
DEMO_LABEL = f"Demo model: {DEMO_DISCLAIMER}"
IMAGE_SIZE = 1024  # max_size of the X-ray and of its heatmaps on the image page: they lie pixel for pixel
THUMBNAIL_SIZE = 256
NO_OVERLAY = "none"
# patient data: not kept in browser or proxy caches
PAGE_HEADERS = {"Cache-Control": "no-store"}


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


def render(
    request: Request, settings: Settings, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    """A page, with who is signed in (for the sign-out form) and the session's CSRF token for its forms."""
    principal = getattr(request.state, "principal", None)
    context = {"principal": principal, "csrf_token": csrf_token(request), **context}
    return templates.TemplateResponse(request, name, context, status_code=status_code, headers=PAGE_HEADERS)


def not_found(request: Request, settings: Settings, message: str) -> HTMLResponse:
    return render(request, settings, "not_found.html", {"message": message}, status.HTTP_404_NOT_FOUND)


def local_path(target: str | None) -> str:
    """``target`` when it is a path on this site, else the patient list (no open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/patients"
