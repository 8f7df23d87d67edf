"""The API's response models: what the node recorded, as JSON.

Times are UTC (the index stores UTC; SQLite hands them back without a zone, so they get it here). Objects the
node wrote (Secondary Captures, structured reports) are instances too, marked ``node_written``, with the UID of
the received instance they report on; counts of what was received leave them out.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dicom_node.models import DeliveryState, JobState, as_utc

UtcDatetime = Annotated[dt.datetime, AfterValidator(as_utc)]

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list: ``items`` from ``offset``, at most ``limit`` of them, of ``total`` matching."""

    items: list[T]
    total: int
    offset: int
    limit: int


class Problem(BaseModel):
    """An error: the reason, in words."""

    detail: str


class InvalidRequest(BaseModel):
    """A 422: the reason in words, or, for fields that fail validation, FastAPI's list of them (each with its
    ``loc``, ``msg`` and ``type``)."""

    detail: str | list[dict[str, Any]]


class FromRow(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --- patients, studies, series, instances -------------------------------------------------------------------


class PatientBrief(FromRow):
    patient_id: str
    name: str | None
    sex: str | None
    birth_date: dt.date | None


class PatientSummary(PatientBrief):
    studies: int = Field(description="Studies with received instances.")
    instances: int = Field(description="Instances received (objects the node wrote are not counted).")
    last_received_at: UtcDatetime | None


class InstanceSummary(BaseModel):
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    modality: str | None
    body_part_examined: str | None
    rows: int | None
    columns: int | None
    received_at: UtcDatetime
    node_written: bool = Field(description="An object the node wrote (a Secondary Capture, a structured report).")
    source_sop_instance_uid: str | None = Field(description="For an object the node wrote: what it reports on.")
    job_states: dict[str, JobState] = Field(description="The state of the instance's job of each kind.")
    image_url: str | None = Field(description="The image as PNG; None for an instance without pixels.")


class SeriesOut(BaseModel):
    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    description: str | None
    instances: list[InstanceSummary]


class StudyOut(BaseModel):
    study_instance_uid: str
    study_date: dt.date | None
    accession_number: str | None
    description: str | None
    series: list[SeriesOut]


class PatientDetail(PatientBrief):
    studies: list[StudyOut]


class StudyDetail(StudyOut):
    patient: PatientBrief


# --- jobs, results, deliveries ------------------------------------------------------------------------------


class JobOut(FromRow):
    id: int
    kind: str
    state: JobState
    attempts: int
    last_error: str | None
    note: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime


class JobListItem(JobOut):
    sop_instance_uid: str


class ResultOut(FromRow):
    id: int
    task: str
    output: str
    is_primary: bool
    summary: str
    values: dict[str, Any]
    model_name: str
    model_version: str
    weights_digest: str
    demo_model: bool
    timings_ms: dict[str, float]
    created_at: UtcDatetime
    heatmap_url: str = Field(description="The heatmap as an RGBA PNG the size of the image's PNG, to lay over it.")


class DeliveryOut(FromRow):
    id: int
    destination: str
    state: DeliveryState
    attempts: int
    last_status: int | None = Field(description="The destination's last C-STORE status, if it answered.")
    last_error: str | None
    created_at: UtcDatetime
    sent_at: UtcDatetime | None
    updated_at: UtcDatetime


class DeliveryListItem(DeliveryOut):
    sop_instance_uid: str
    sop_class_uid: str


class WrittenObject(BaseModel):
    """An object the node wrote from an instance, and where it went."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    deliveries: list[DeliveryOut]


class InstanceDetail(InstanceSummary):
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    size_bytes: int
    calling_ae: str | None
    jobs: list[JobOut]
    results: list[ResultOut]
    written_objects: list[WrittenObject] = Field(description="What the node wrote from this instance.")
    deliveries: list[DeliveryOut] = Field(description="Of this instance itself, when the node wrote it.")
    mlflow_url: str | None = Field(
        None, description="The MLflow run of the current results; null until the tracker has logged it."
    )


class UserOut(BaseModel):
    """A local user (``dicom-node users ...`` manages them)."""

    model_config = ConfigDict(from_attributes=True)

    username: str
    role: str
    created_at: UtcDatetime
    working_tokens: int = Field(description="Personal API tokens neither revoked nor expired.")


class AuditEventOut(BaseModel):
    """One event of the audit trail (docs/security.md lists the kinds and fields)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    occurred_at: UtcDatetime
    kind: str
    outcome: int = Field(description="0 success, 4 minor failure, 8 serious failure, 12 major failure (RFC 3881).")
    user: str
    role: str | None
    address: str | None
    patients: list[str]
    objects: list[list[str]] = Field(description="[kind, id] pairs: study, instance or user.")
    detail: str
    local_ae: str | None
    remote_ae: str | None
