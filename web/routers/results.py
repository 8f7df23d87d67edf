"""``/api/results``: a result's heatmap as a PNG to lay over its instance's image."""

from __future__ import annotations

import zipfile

from fastapi import APIRouter, HTTPException, Response, status

from dicom_node.models import InferenceResult
from inference.predict import heatmap_from_bytes
from web.audit import AuditDep, instance_object, owner_of_instance, study_object
from web.dependencies import RowId, SessionDep, StoreDep
from web.imaging import heatmap_png
from web.routers.instances import PNG_CACHE, PNG_RESPONSE, MaxSize
from web.schemas import Problem

router = APIRouter(prefix="/results", tags=["results"])


@router.get("/{result_id}/heatmap.png", response_class=Response, responses={**PNG_RESPONSE, 404: {"model": Problem}})
def get_result_heatmap(
    result_id: RowId, session: SessionDep, store: StoreDep, audit: AuditDep, max_size: MaxSize = 1024
) -> Response:
    """The heatmap as RGBA, the size of the instance's ``image.png`` at the same ``max_size``: jet colours, alpha
    rising with the value from 0 (transparent where the Secondary Captures show no colour) to 255 at the peak.
    The Secondary Captures lay it at opacity 0.6."""
    result = session.get(InferenceResult, result_id)
    if result is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no result {result_id}")
    patient_id, study_uid, sop_uid = owner_of_instance(session, result.instance_pk)
    audit.read([patient_id], [study_object(study_uid), instance_object(sop_uid)])
    try:
        heatmap = heatmap_from_bytes(store.absolute(result.heatmap_path).read_bytes(), result.heatmap_name)
    except FileNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the heatmap of result {result_id} is missing") from None
    except (KeyError, ValueError, zipfile.BadZipFile):  # a heatmaps file without this map, or a damaged one
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"the heatmap of result {result_id} is unreadable") from None
    return Response(heatmap_png(heatmap, max_size), media_type="image/png", headers=PNG_CACHE)
