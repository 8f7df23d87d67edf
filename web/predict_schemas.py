"""Request and response models of the seed projects' endpoints (``/predict``, ``/predict_base64``,
``/results/{patient_id}``, ``/model_info``), with their field names.

One response carries the fields of every installed task, as each declares them
(:attr:`dicom_node.ai_tasks.interface.Task.prediction_fields_type`) and named as its seed project names them; the
fields of a task that did not run are null.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, create_model

from dicom_node.ai_tasks.registry import TaskRegistryError, installed_tasks
from dicom_node.config import TaskName
from web.schemas import UtcDatetime


def empty_as_none(value: object) -> object:
    """A form or JSON field sent empty ("") counts as not sent."""
    return None if value == "" else value


OptionalTask = Annotated[
    Annotated[TaskName, Field(max_length=32)] | None,
    BeforeValidator(empty_as_none),
    Field(description="Run this task only (one of the node's tasks, as /model_info lists them); none = as routed."),
]
OptionalSex = Annotated[
    Literal["M", "F"] | None,
    BeforeValidator(empty_as_none),
    Field(description="PatientSex of a picture's Secondary Capture; must match a DICOM upload's."),
]
OptionalPatientId = Annotated[
    # the length bound on the string alone: on the union it would be applied to None too (a TypeError, a 500)
    Annotated[str, Field(max_length=64)] | None,
    BeforeValidator(empty_as_none),
    Field(
        description="PatientID (free text, 1-64 characters) of a picture's Secondary Capture; none = a new one "
        "(UPLOAD-...). Must match a DICOM upload's PatientID.",
    ),
]


class PredictBase64Request(BaseModel):
    image: str = Field(
        description="The file's bytes in base64 (a data: URL prefix and line breaks are allowed): a DICOM Part 10 "
        "file, or a PNG, JPEG, TIFF or BMP."
    )
    patient_id: OptionalPatientId = None
    sex: OptionalSex = None
    task: OptionalTask = None


class ModelBrief(BaseModel):
    """The model that gave a result."""

    name: str
    version: str
    weights_digest: str
    demo: bool
    disclaimer: str | None = Field(description="Set for demo weights: trained on synthetic phantoms.")


class PredictionCore(BaseModel):
    """The fields of every prediction, whichever tasks ran."""

    status: Literal["success"] = "success"
    patient_id: str
    prediction_id: int = Field(description="The image's number in the node's index (an integer, as the seeds had it).")
    sop_instance_uid: str = Field(description="The SOP Instance UID of the stored image.")
    study_instance_uid: str
    tasks: list[TaskName] = Field(description="The tasks whose results this holds.")
    mlflow_run_id: str | None = Field(
        description="The MLflow run of these results. Runs are logged in the background after the results are "
        "recorded, so this is null in the response of /predict and until the run is logged (or with MLflow off)."
    )
    timestamp: UtcDatetime = Field(description="When the results were recorded.")
    inference_time: float = Field(
        description="Seconds the inference job spent on the image: reading and decoding it, the models, recording."
    )
    models: dict[TaskName, ModelBrief] = Field(description="The model of each task that ran.")
    instance_url: str = Field(description="The image, its jobs and results in the API (shown in the viewer).")


def _with_the_fields_of_every_task(name: str, base: type[BaseModel], of_task: str, doc: str) -> type[BaseModel]:
    """``base`` with the fields each installed task declares (``Task.<of_task>``), named as its seed names them."""
    parts = [getattr(task, of_task) for task in installed_tasks().values() if getattr(task, of_task) is not None]
    seen: dict[str, str] = {}
    for part in (base, *parts):
        for field in part.model_fields:
            if field in seen:
                raise TaskRegistryError(f"{part.__name__} and {seen[field]} both declare the field {field!r}")
            seen[field] = part.__name__
    return create_model(name, __base__=(base, *parts), __doc__=doc, __module__=__name__)


PredictionOut = _with_the_fields_of_every_task(
    "PredictionOut",
    PredictionCore,
    "prediction_fields_type",
    "The results of one uploaded (or received) image: the fields of every prediction, and those of each task, "
    "null where the task did not run.",
)
PatientPrediction = _with_the_fields_of_every_task(
    "PatientPrediction",
    PredictionOut,
    "listing_fields_type",
    "A listed prediction, with the fields each task adds to a listing.",
)


class PatientResults(BaseModel):
    patient_id: str
    upload_timestamp: UtcDatetime | None = Field(description="When the patient's first image was received.")
    total_predictions: int
    predictions: list[PatientPrediction] = Field(description="The images with results, the newest first.")


class ModelCardInfo(BaseModel):
    """What a model card says: the model, its use, and the metrics measured on it."""

    task: TaskName
    name: str
    version: str
    architecture: str
    input_size: int
    outputs: list[str]
    demo: bool
    disclaimer: str
    intended_use: str
    training_data: str
    limitations: list[str]
    metrics: dict[str, float | int | str] = Field(
        description="The card's metrics as recorded (dicom-node evaluate --update-cards), nothing added."
    )
    metrics_note: str | None = Field(description="Set when the card records no metrics.")


ModelInfo = create_model(
    "ModelInfo",
    __doc__="The card of each task's model.",
    __module__=__name__,
    **{name: (ModelCardInfo | None, None) for name in installed_tasks()},
)
