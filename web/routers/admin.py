"""``/api/users``, ``/api/configuration`` and ``/api/audit``: what an admin reads. Users are changed with
``dicom-node users ...`` on the node's machine, not over HTTP."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from dicom_node.audit.record import AuditEventKind
from dicom_node.audit.trail import events_of_patient, utc_time
from dicom_node.models import AuditEvent
from web.audit import AuditDep
from web.auth import ADMIN
from web.dependencies import ContextDep, IndexText, Limit, Offset, SessionDep, SettingsDep
from web.schemas import AuditEventOut, InvalidRequest, Page, UserOut

router = APIRouter(tags=["admin"], dependencies=ADMIN)


@router.get("/users", response_model=list[UserOut])
def list_users(context: ContextDep) -> list[UserOut]:
    """The local users, their roles and how many of their tokens still work."""
    return [
        UserOut(username=user.username, role=user.role, created_at=user.created_at, working_tokens=tokens)
        for user, tokens in context.users.list()
    ]


@router.get("/configuration")
def get_configuration(settings: SettingsDep) -> dict[str, Any]:
    """The node's settings as in effect: secrets as ``**********``, the database URL without its password."""
    shown = settings.model_dump(mode="json")
    shown["database"]["url"] = make_url(settings.database.url).render_as_string(hide_password=True)
    return shown


@router.get("/audit", response_model=Page[AuditEventOut], responses={422: {"model": InvalidRequest}})
def list_audit_events(
    session: SessionDep,
    audit: AuditDep,
    patient_id: Annotated[IndexText | None, Query(max_length=64, description="Only events of this PatientID.")] = None,
    since: Annotated[
        str | None,
        Query(
            pattern=r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$",
            description="From this date or time on (ISO 8601; UTC unless given).",
        ),
    ] = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> Page[AuditEventOut]:
    """Audit events, the newest first: who read or sent which patient's data, sign-ins, user changes. The read is
    an event itself (Audit Log Used), naming the patient asked about."""
    audit.read([patient_id] if patient_id is not None else [], kind=AuditEventKind.AUDIT_LOG_READ)
    start = _utc(since) if since else dt.datetime.min.replace(tzinfo=dt.UTC)
    if patient_id is not None:
        events = list(reversed(events_of_patient(session, patient_id, start)))
        total, page = len(events), events[offset : offset + limit]
    else:
        total = session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.occurred_at >= start))
        page = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.occurred_at >= start)
            .order_by(AuditEvent.id.desc())
            .offset(offset)
            .limit(limit)
        ).all()
    return Page(items=[AuditEventOut.model_validate(row) for row in page], total=total or 0, offset=offset, limit=limit)


def _utc(text: str) -> dt.datetime:
    try:
        return utc_time(text)
    except ValueError:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"since: not a date or time: {text!r}") from None
