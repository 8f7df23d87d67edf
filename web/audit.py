"""The audit events of the web routes: every read of patient data names who read which patient's what.

A route that shows patient data takes :data:`AuditDep` and calls :meth:`RequestAudit.read` with what it shows,
before it answers: a read the trail cannot record is not served (503).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_node.audit.record import AuditEventKind, AuditObject, AuditObjectKind, AuditRecord
from dicom_node.audit.trail import now
from dicom_node.models import Instance, Patient, Series, Study
from web.dependencies import ContextDep


class RequestAudit:
    def __init__(self, request: Request, context: ContextDep) -> None:
        self._request = request
        self._trail = context.trail

    def read(
        self,
        patients: Iterable[str],
        objects: Iterable[AuditObject] = (),
        kind: AuditEventKind = AuditEventKind.PATIENT_DATA_READ,
    ) -> None:
        """Record that the request's principal read (or, ``kind``, created) these patients' data."""
        principal = self._request.state.principal  # set by web.auth.authenticated, which every such route needs
        record = AuditRecord(
            kind=kind,
            occurred_at=now(),
            user=principal.user,
            role=principal.role.value,
            address=principal.address,
            patients=tuple(dict.fromkeys(patients)),
            objects=tuple(dict.fromkeys(objects)),
            detail=f"{self._request.method} {_route_template(self._request)}",
        )
        try:
            self._trail.record(record)
        except SQLAlchemyError:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the audit trail cannot be written") from None


AuditDep = Annotated[RequestAudit, Depends(RequestAudit)]


def _route_template(request: Request) -> str:
    """The route as declared, with its prefixes (``/api/patients/{patient_id:path}``): what was done, whichever
    patient (the event names the patient). A route of an included router knows only its own part of the path."""
    route = request.scope.get("route")
    path = request.scope["path"]
    if route is None:
        return path
    own = route.path_format.format(**request.path_params)
    return (path.removesuffix(own) if path.endswith(own) else "") + route.path


def study_object(uid: str) -> AuditObject:
    return AuditObject(AuditObjectKind.STUDY, uid)


def instance_object(uid: str) -> AuditObject:
    return AuditObject(AuditObjectKind.INSTANCE, uid)


def owner_of_instance(session: Session, instance_pk: int) -> tuple[str, str, str]:
    """The PatientID, StudyInstanceUID and SOPInstanceUID of an instance."""
    return session.execute(
        select(Patient.patient_id, Study.study_instance_uid, Instance.sop_instance_uid)
        .join(Study, Study.patient_pk == Patient.id)
        .join(Series, Series.study_pk == Study.id)
        .join(Instance, Instance.series_pk == Series.id)
        .where(Instance.id == instance_pk)
    ).one()
