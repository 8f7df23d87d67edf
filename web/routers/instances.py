"""``/api/instances``: one instance with its jobs, results, the objects the node wrote from it and their
deliveries; and its image as PNG."""

from __future__ import annotations

from typing import Annotated

import pydicom
from fastapi import APIRouter, HTTPException, Query, Response, status
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from dicom_node.models import Delivery, Instance, Series, Study
from dicom_node.tracking import tracked_run_url
from inference.pixels import UnsupportedImage
from web.audit import AuditDep, instance_object, owner_of_instance, study_object
from web.dependencies import IndexText, SessionDep, SettingsDep, StoreDep
from web.imaging import image_png
from web.records import instance_fields, result_out, source_uids
from web.schemas import DeliveryOut, InstanceDetail, JobOut, Problem, WrittenObject

router = APIRouter(prefix="/instances", tags=["instances"])

MaxSize = Annotated[int, Query(ge=64, le=4096, description="Longest side of the PNG in pixels; never scaled up.")]
PNG_RESPONSE = {200: {"content": {"image/png": {}}, "description": "A PNG image."}}
# patient images: not kept in browser or proxy caches
PNG_CACHE = {"Cache-Control": "no-store"}


@router.get("/{sop_uid}", response_model=InstanceDetail, responses={404: {"model": Problem}})
def get_instance(sop_uid: IndexText, session: SessionDep, settings: SettingsDep, audit: AuditDep) -> InstanceDetail:
    """An instance, its jobs and results, and the objects the node wrote from it with their deliveries."""
    instance = session.scalar(
        select(Instance)
        .where(Instance.sop_instance_uid == sop_uid)
        .options(
            selectinload(Instance.series).selectinload(Series.study).selectinload(Study.patient),
            selectinload(Instance.jobs),
            selectinload(Instance.results),
        )
    )
    if instance is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no instance {sop_uid}")
    written = session.scalars(
        select(Instance)
        .where(Instance.source_instance_pk == instance.id)
        .options(selectinload(Instance.series))
        .order_by(Instance.id)
    ).all()
    deliveries: dict[int, list[DeliveryOut]] = {}
    keys = [instance.id, *(item.id for item in written)]
    for delivery in session.scalars(select(Delivery).where(Delivery.instance_pk.in_(keys)).order_by(Delivery.id)):
        deliveries.setdefault(delivery.instance_pk, []).append(DeliveryOut.model_validate(delivery))
    series = instance.series
    audit.read(
        [series.study.patient.patient_id],
        [
            study_object(series.study.study_instance_uid),
            instance_object(sop_uid),
            *(instance_object(item.sop_instance_uid) for item in written),
        ],
    )
    return InstanceDetail(
        **instance_fields(instance, source_uids(session, [instance])),
        patient_id=series.study.patient.patient_id,
        study_instance_uid=series.study.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        transfer_syntax_uid=instance.transfer_syntax_uid,
        size_bytes=instance.size_bytes,
        calling_ae=instance.calling_ae,
        jobs=[JobOut.model_validate(job) for job in sorted(instance.jobs, key=lambda job: job.id)],
        results=[result_out(result) for result in instance.results],
        written_objects=[
            WrittenObject(
                sop_instance_uid=item.sop_instance_uid,
                sop_class_uid=item.sop_class_uid,
                series_instance_uid=item.series.series_instance_uid,
                deliveries=deliveries.get(item.id, []),
            )
            for item in written
        ],
        deliveries=deliveries.get(instance.id, []),
        mlflow_url=tracked_run_url(session, settings.mlflow, instance.id),
    )


@router.get(
    "/{sop_uid}/image.png",
    response_class=Response,
    responses={**PNG_RESPONSE, 404: {"model": Problem}, 409: {"model": Problem}},
)
def get_instance_image(
    sop_uid: IndexText, session: SessionDep, store: StoreDep, audit: AuditDep, max_size: MaxSize = 1024
) -> Response:
    """The stored image through its VOI window (bone bright), 8-bit gray, scaled down to ``max_size``.
    409 for an instance without an image (a structured report)."""
    row = session.execute(select(Instance.id, Instance.path).where(Instance.sop_instance_uid == sop_uid)).first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no instance {sop_uid}")
    instance_pk, path = row
    patient_id, study_uid, _ = owner_of_instance(session, instance_pk)
    audit.read([patient_id], [study_object(study_uid), instance_object(sop_uid)])
    try:
        ds = pydicom.dcmread(store.absolute(path))
    except FileNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the stored file of instance {sop_uid} is missing") from None
    except InvalidDicomError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the stored file is not DICOM: {error}") from None
    try:
        png = image_png(ds, max_size)
    except UnsupportedImage as error:
        raise HTTPException(status.HTTP_409_CONFLICT, f"instance {sop_uid} has no image to show: {error}") from None
    except (ValueError, NotImplementedError, RuntimeError) as error:  # pixels pydicom cannot decode
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"cannot decode the image: {type(error).__name__}: {error}"
        ) from None
    return Response(png, media_type="image/png", headers=PNG_CACHE)
