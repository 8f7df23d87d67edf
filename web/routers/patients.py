"""``/api/patients``: who the node received images of, and their studies."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import distinct, func, or_, select

from dicom_node.models import Instance, Patient, Series, Study
from web.audit import AuditDep, study_object
from web.dependencies import IndexText, Limit, Offset, SessionDep
from web.records import patient_with_tree, studies_out
from web.schemas import Page, PatientDetail, PatientSummary, Problem

router = APIRouter(prefix="/patients", tags=["patients"])


@router.get("", response_model=Page[PatientSummary])
def list_patients(
    session: SessionDep,
    audit: AuditDep,
    search: Annotated[
        IndexText | None, Query(max_length=324, description="Part of the PatientID or name, in any case.")
    ] = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> Page[PatientSummary]:
    """Patients, the most recently received first, with what was received of each."""
    received = (
        select(
            Study.patient_pk,
            func.count(distinct(Study.id)).label("studies"),
            func.count(Instance.id).label("instances"),
            func.max(Instance.received_at).label("last_received_at"),
        )
        .join(Series, Series.study_pk == Study.id)
        .join(Instance, Instance.series_pk == Series.id)
        .where(Instance.source_instance_pk.is_(None))
        .group_by(Study.patient_pk)
        .subquery()
    )
    conditions = []
    if search:
        conditions.append(
            or_(Patient.patient_id.icontains(search, autoescape=True), Patient.name.icontains(search, autoescape=True))
        )
    total = session.scalar(select(func.count()).select_from(Patient).where(*conditions)) or 0
    rows = session.execute(
        select(Patient, received.c.studies, received.c.instances, received.c.last_received_at)
        .outerjoin(received, received.c.patient_pk == Patient.id)
        .where(*conditions)
        .order_by(received.c.last_received_at.desc().nulls_last(), Patient.id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    items = [
        PatientSummary(
            patient_id=patient.patient_id,
            name=patient.name,
            sex=patient.sex,
            birth_date=patient.birth_date,
            studies=studies or 0,
            instances=instances or 0,
            last_received_at=last,
        )
        for patient, studies, instances, last in rows
    ]
    audit.read(item.patient_id for item in items)
    return Page(items=items, total=total, offset=offset, limit=limit)


# The PatientID is free text: it may hold "/" (matched by the path converter) and spaces; a client
# percent-encodes it as any path segment.
@router.get("/{patient_id:path}", response_model=PatientDetail, responses={404: {"model": Problem}})
def get_patient(patient_id: IndexText, session: SessionDep, audit: AuditDep) -> PatientDetail:
    """A patient with their studies, series and instances (the received ones and those the node wrote)."""
    patient = patient_with_tree(session, patient_id)
    if patient is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no patient with this PatientID")
    audit.read([patient.patient_id], (study_object(item.study_instance_uid) for item in patient.studies))
    return PatientDetail(
        patient_id=patient.patient_id,
        name=patient.name,
        sex=patient.sex,
        birth_date=patient.birth_date,
        studies=studies_out(session, patient.studies),
    )
