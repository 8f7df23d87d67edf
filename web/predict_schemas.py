"""Request and response models of the seed projects' endpoints (``/predict``, ``/predict_base64``,
``/results/{patient_id}``, ``/model_info``), with their field names.

One response carries the fields of both seeds: the hallux valgus seed's (``prediction``, ``confidence``,
``hallux_valgus_detected``, ``probabilities``) when the foot model ran, the bone-age seed's
(``male_prediction``, ``female_prediction``) when the bone-age model ran; the fields of a task that did not run
are null.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field

from dicom_node.config import TaskName
from web.schemas import UtcDatetime


def empty_as_none(value: object) -> object:
    """A form or JSON field sent empty ("") counts as not sent."""
    return None if value == "" else value


OptionalTask = Annotated[
    TaskName | None,
    BeforeValidator(empty_as_none),
    Field(description="Run this task only: hallux_valgus (foot) or bone_age (hand); none = as the node routes it."),
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


class BoneAgePrediction(BaseModel):
    """The bone age on one sex's scale, in years as the bone-age seed gave it (and in months)."""

    age: float = Field(description="Bone age in years.")
    uncertainty_sigma: float = Field(description="The model's sigma of the age, in years.")
    age_months: float
    uncertainty_sigma_months: float
    is_primary: bool = Field(description="The scale of the patient's sex (false for both when it is unknown).")
    gradcam_url: str = Field(description="The class activation map as an RGBA PNG to lay over the image.")
    timestamp: UtcDatetime = Field(description="When the result was recorded.")


class PredictionOut(BaseModel):
    """The results of one uploaded (or received) image."""

    status: Literal["success"] = "success"
    patient_id: str
    prediction_id: str = Field(description="The SOP Instance UID of the stored image.")
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
    model_info: dict[TaskName, ModelBrief] = Field(description="The model of each task that ran.")
    instance_url: str = Field(description="The image, its jobs and results in the API (shown in the viewer).")
    # the hallux valgus seed's fields; null when the foot model did not run
    prediction: str | None = Field(description="Normal, Flatfoot, Foot Ulcer or Hallux Valgus.")
    confidence: float | None = Field(description="The probability of the predicted class.")
    hallux_valgus_detected: bool | None = Field(
        description="Hallux Valgus probability >= inference.hallux_valgus_threshold (set low, for recall)."
    )
    probabilities: dict[str, float] | None = Field(description="The probability of each class.")
    hallux_valgus_angle_deg: float | None = Field(description="The model's regression of the angle, if it has one.")
    hallux_valgus_gradcam_url: str | None = Field(description="The predicted class's activation map (RGBA PNG).")
    # the bone-age seed's fields; null when the hand model did not run
    male_prediction: BoneAgePrediction | None
    female_prediction: BoneAgePrediction | None


class PatientPrediction(PredictionOut):
    """A listed prediction, with the bone-age seed's flat fields (years; null without a bone-age result)."""

    male_age: float | None
    male_uncertainty: float | None
    female_age: float | None
    female_uncertainty: float | None


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


class ModelInfo(BaseModel):
    hallux_valgus: ModelCardInfo
    bone_age: ModelCardInfo
