"""``/api/studies``: one study, its series and instances."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from web.audit import AuditDep, study_object
from web.dependencies import IndexText, SessionDep
from web.records import source_uids, study_out, study_with_tree
from web.schemas import PatientBrief, Problem, StudyDetail

router = APIRouter(prefix="/studies", tags=["studies"])


@router.get("/{study_uid}", response_model=StudyDetail, responses={404: {"model": Problem}})
def get_study(study_uid: IndexText, session: SessionDep, audit: AuditDep) -> StudyDetail:
    """A study with its patient, series and instances (the received ones and those the node wrote)."""
    study = study_with_tree(session, study_uid)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study {study_uid}")
    audit.read([study.patient.patient_id], [study_object(study.study_instance_uid)])
    sources = source_uids(session, (instance for series in study.series for instance in series.instances))
    return StudyDetail(**study_out(study, sources).model_dump(), patient=PatientBrief.model_validate(study.patient))
