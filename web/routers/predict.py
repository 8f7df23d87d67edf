"""The seed projects' endpoints, with their names and fields: ``POST /predict`` (multipart), ``POST
/predict_base64`` (JSON), ``GET /results/{patient_id}`` and ``GET /model_info``.

An upload is stored, indexed and queued like an image the DICOM listener received (calling AE
``HTTP-UPLOAD``), so it shows in the viewer and goes through the same outputs; its inference runs in the request
(:mod:`web.predictions`). An upload needs the operator role, the results the viewer role (:mod:`web.auth`);
``/model_info`` holds no patient data and stays open.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile, status
from pydantic import BeforeValidator
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from dicom_node.audit.record import AuditEventKind, AuditObject
from dicom_node.config import TaskName
from dicom_node.ingest import INFERENCE_JOB, Rejected, TooLarge
from dicom_node.models import Instance, Patient, Series, Study
from dicom_node.node import Node
from dicom_node.status import StoreStatus
from inference.model_card import ModelCard, ModelLoadError, read_card
from web.audit import AuditDep, RequestAudit, instance_object, study_object
from web.auth import AUTH_RESPONSES, OPERATOR, VIEWER
from web.dependencies import ContextDep, IndexText, SessionDep, WebContext
from web.predict_schemas import (
    ModelCardInfo,
    ModelInfo,
    PatientResults,
    PredictBase64Request,
    PredictionOut,
    empty_as_none,
)
from web.predictions import infer_now, newest_first, patient_prediction, prediction_out, run_ids
from web.schemas import InvalidRequest, Problem
from web.uploads import ENVELOPE_BYTES, Sex, UploadRefused, check_patient_id, prepare, read_limited, too_large

router = APIRouter(tags=["seed endpoints"])

CALLING_AE = "HTTP-UPLOAD"  # recorded as the instance's calling AE, as the SCP records the sender's
UPLOAD_ERRORS = {
    **{
        code: {"model": Problem}
        for code in (
            status.HTTP_400_BAD_REQUEST,  # a body that cannot be parsed (malformed multipart, JSON not in UTF-8)
            status.HTTP_401_UNAUTHORIZED,
            status.HTTP_403_FORBIDDEN,
            status.HTTP_413_CONTENT_TOO_LARGE,
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            status.HTTP_503_SERVICE_UNAVAILABLE,
        )
    },
    # a corrupt image, or FastAPI's validation errors of the form or JSON fields
    status.HTTP_422_UNPROCESSABLE_CONTENT: {"model": InvalidRequest},
}
_TASK = "Run this task only (one of the node's tasks, as /model_info lists them); none = as the node routes it."
_PATIENT_ID = (
    "PatientID (free text, 1-64 characters) of a picture's Secondary Capture; none = a new one (UPLOAD-...). "
    "A DICOM upload is stored as sent: a given value must match its PatientID."
)
_SEX = "PatientSex (M or F) of a picture's Secondary Capture; a given value must match a DICOM upload's."


def upload_limits(max_upload_mb: int) -> dict[str, tuple[int, int]]:
    """The largest request body of each upload path, for :class:`web.uploads.UploadLimit`."""
    image = max_upload_mb * 2**20
    return {
        "/predict": (image + ENVELOPE_BYTES, image),
        "/predict_base64": (4 * math.ceil(image / 3) + ENVELOPE_BYTES, image),
    }


@router.post("/predict", response_model=PredictionOut, dependencies=OPERATOR, responses=UPLOAD_ERRORS)
def predict(
    context: ContextDep,
    audit: AuditDep,
    image: Annotated[
        UploadFile,
        File(description="A DICOM Part 10 file, or a PNG, JPEG, TIFF or BMP (told by content, not by name)."),
    ],
    patient_id: Annotated[
        str | None, BeforeValidator(empty_as_none), Form(max_length=64, description=_PATIENT_ID)
    ] = None,
    sex: Annotated[Sex | None, BeforeValidator(empty_as_none), Form(description=_SEX)] = None,
    task: Annotated[TaskName | None, BeforeValidator(empty_as_none), Form(max_length=32, description=_TASK)] = None,
) -> PredictionOut:
    """Store the image like a received one, run the models on it and answer with their results: each task's
    fields, named as its seed project names them (null for a task that did not run). A picture is stored as a
    Secondary Capture; the BodyPartExamined that ``task`` declares (FOOT, HAND ...) routes it.

    413 larger than ``web.max_upload_mb`` (or decoding to more than 50 million pixels, or a DICOM image of more
    than ``dicom.max_image_pixels``), 415 not one of the accepted kinds, 422 corrupt or truncated, or an image no
    model (or not ``task``) runs on; 503 when the node serves no models or inference did not finish in time."""
    limit = context.settings.web.max_upload_mb * 2**20
    return _predict(context, audit, read_limited(image.file, limit), patient_id, sex, task)


@router.post("/predict_base64", response_model=PredictionOut, dependencies=OPERATOR, responses=UPLOAD_ERRORS)
def predict_base64(context: ContextDep, audit: AuditDep, request: PredictBase64Request) -> PredictionOut:
    """As ``POST /predict``, with the file's bytes as base64 in JSON; 422 for text that is not base64."""
    limit = context.settings.web.max_upload_mb * 2**20
    text = request.image
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    text = "".join(text.split())
    if len(text) > 4 * math.ceil(limit / 3) + 4:
        raise too_large(limit)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UploadRefused(status.HTTP_422_UNPROCESSABLE_CONTENT, "image is not valid base64") from None
    if len(data) > limit:
        raise too_large(limit)
    if not data:
        raise UploadRefused(status.HTTP_422_UNPROCESSABLE_CONTENT, "the image is empty")
    return _predict(context, audit, data, request.patient_id, request.sex, request.task)


# The PatientID is free text: it may hold "/" (matched by the path converter) and spaces.
@router.get(
    "/results/{patient_id:path}",
    response_model=PatientResults,
    dependencies=VIEWER,
    responses={**AUTH_RESPONSES, 404: {"model": Problem}},
)
def get_results(patient_id: IndexText, session: SessionDep, audit: AuditDep) -> PatientResults:
    """The patient's images that have results, the most recently recorded first, each in the shape of
    ``POST /predict``'s response plus the fields each task adds to a listing; 404 for an unknown PatientID."""
    patient = session.scalar(select(Patient).where(Patient.patient_id == patient_id))
    if patient is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no patient with this PatientID")
    instances = session.scalars(
        select(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Study.patient_pk == patient.id, Instance.source_instance_pk.is_(None))
        .options(
            selectinload(Instance.results),
            selectinload(Instance.series).selectinload(Series.study).selectinload(Study.patient),
        )
    ).all()
    received = [instance.received_at for instance in instances]
    listed = newest_first(instances)
    audit.read(
        [patient.patient_id],
        (item for instance in listed for item in _objects_of(instance)),
    )
    runs = run_ids(session, (instance.id for instance in listed))
    return PatientResults(
        patient_id=patient.patient_id,
        upload_timestamp=min(received) if received else None,
        total_predictions=len(listed),
        predictions=[patient_prediction(instance, runs.get(instance.id)) for instance in listed],
    )


@router.get("/model_info", response_model=ModelInfo, responses={503: {"model": Problem}})
def model_info(context: ContextDep) -> ModelInfo:
    """The model cards of the models the node serves: what each model is, its intended use and limitations,
    and the metrics measured on it as the card records them (none invented; ``metrics_note`` says when a card
    has none)."""
    return ModelInfo(**{task: _card_info(card) for task, card in _cards(context).items()})


# --- helpers ------------------------------------------------------------------------------------------------


def _predict(
    context: WebContext,
    audit: RequestAudit,
    data: bytes,
    patient_id: str | None,
    sex: Sex | None,
    task: TaskName | None,
) -> PredictionOut:
    node = _node(context)
    with node.foreground.serving():  # the node's background work waits: this answer comes first
        return _predict_in_foreground(node, context, audit, data, patient_id, sex, task)


def _predict_in_foreground(
    node: Node,
    context: WebContext,
    audit: RequestAudit,
    data: bytes,
    patient_id: str | None,
    sex: Sex | None,
    task: TaskName | None,
) -> PredictionOut:
    settings = context.settings
    prepared = prepare(
        data, settings.inference, settings.dicom.max_inflated_mb * 2**20, check_patient_id(patient_id), sex, task
    )
    try:
        stored = node.ingestor.ingest(prepared.file_meta, [prepared.dataset], calling_ae=CALLING_AE)
    except Rejected as rejected:
        raise _refusal(rejected) from None
    objects = [study_object(stored.study_instance_uid), instance_object(stored.sop_instance_uid)]
    audit.read([stored.patient_id], objects, AuditEventKind.PATIENT_DATA_CREATED)
    with context.sessions() as session:
        instance_pk = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == stored.sop_instance_uid))
    infer_now(node, instance_pk)
    with context.sessions() as session:
        instance = session.scalar(
            select(Instance)
            .where(Instance.id == instance_pk)
            .options(
                selectinload(Instance.results),
                selectinload(Instance.series).selectinload(Series.study).selectinload(Study.patient),
            )
        )
        results = [result for result in instance.results if task is None or result.task == task]
        if not results:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "inference recorded no results for this image (see its job)"
            )
        return prediction_out(instance, results, run_ids(session, [instance_pk]).get(instance_pk), task)


def _objects_of(instance: Instance) -> list[AuditObject]:
    return [study_object(instance.series.study.study_instance_uid), instance_object(instance.sop_instance_uid)]


def _node(context: WebContext) -> Node:
    if context.node is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "predictions need the running node (dicom-node serve)")
    return context.node


def _refusal(rejected: Rejected) -> HTTPException:
    """The ingest's refusal as an HTTP error: the file's fault (413 beyond a size limit, else 422) or the node's
    (503, 500)."""
    if isinstance(rejected, TooLarge):
        code = status.HTTP_413_CONTENT_TOO_LARGE
    elif rejected.status in (StoreStatus.CANNOT_UNDERSTAND, StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS):
        code = status.HTTP_422_UNPROCESSABLE_CONTENT
    elif rejected.status == StoreStatus.OUT_OF_RESOURCES:
        code = status.HTTP_503_SERVICE_UNAVAILABLE
    else:
        code = status.HTTP_500_INTERNAL_SERVER_ERROR
    return HTTPException(code, f"the image was not stored: {rejected.reason}")


def _cards(context: WebContext) -> dict[TaskName, ModelCard]:
    """The cards of the loaded models; without a node (a read-only API), the configured card files."""
    handler = context.node.handlers.get(INFERENCE_JOB) if context.node is not None else None
    models = getattr(handler, "models", None)
    if models is not None:
        if models.missing:  # started without a model (inference.on_missing_model: degraded)
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "; ".join(models.missing.values()))
        return {task: model.card for task, model in models.loaded().items()}
    inference = context.settings.inference
    try:
        return {name: read_card(task.card) for name, task in inference.tasks.items()}
    except ModelLoadError as error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from None


def _card_info(card: ModelCard) -> ModelCardInfo:
    return ModelCardInfo(
        task=card.task,
        name=card.name,
        version=card.version,
        architecture=card.architecture,
        input_size=card.input_size,
        outputs=list(card.outputs),
        demo=card.demo,
        disclaimer=card.disclaimer,
        intended_use=card.intended_use,
        training_data=card.training_data,
        limitations=list(card.limitations),
        metrics=dict(card.metrics),
        metrics_note=None if card.metrics else "the model card records no measured metrics",
    )
