"""Request and response models of the seed projects' endpoints (``/predict``, ``/predict_base64``,
``/results/{patient_id}``, ``/model_info``), with their field names.

One response carries the fields of every installed task, as each declares them
(:attr:`dicom_node.ai_tasks.interface.Task.prediction_fields_type`) and named as its seed project names them; the
fields of a task that did not run are null.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, create_model

from dicom_node.ai_tasks.interface import Task
from dicom_node.ai_tasks.registry import installed_tasks
from dicom_node.config import TaskName
from web.schemas import UtcDatetime

log = logging.getLogger(__name__)


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


def _tasks_in_the_responses() -> list[type[Task]]:
    """The installed tasks whose fields take no name of every prediction's nor of an earlier task's; one that
    does is left out of the responses, with the reason in the log, and the others answer as ever."""
    taken = set(PredictionCore.model_fields)
    tasks = []
    for task in installed_tasks().values():
        names = [name for model in _field_models(task) for name in model.model_fields]
        clashes = sorted(taken & set(names))
        if clashes:
            log.error("task %s is left out of the HTTP responses: its fields %s are taken", task.name, clashes)
            continue
        taken |= set(names)
        tasks.append(task)
    return tasks


def _field_models(task: type[Task]) -> list[type[BaseModel]]:
    return [model for model in (task.prediction_fields_type, task.listing_fields_type) if model is not None]


TASKS_IN_THE_RESPONSES = _tasks_in_the_responses()
PredictionOut = create_model(
    "PredictionOut",
    __base__=(
        PredictionCore,
        *(task.prediction_fields_type for task in TASKS_IN_THE_RESPONSES if task.prediction_fields_type is not None),
    ),
    __doc__="The results of one uploaded (or received) image: the fields of every prediction, and those of each "
    "task, null where the task did not run.",
    __module__=__name__,
)
PatientPrediction = create_model(
    "PatientPrediction",
    __base__=(
        PredictionOut,
        *(task.listing_fields_type for task in TASKS_IN_THE_RESPONSES if task.listing_fields_type is not None),
    ),
    __doc__="A listed prediction, with the fields each task adds to a listing.",
    __module__=__name__,
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
