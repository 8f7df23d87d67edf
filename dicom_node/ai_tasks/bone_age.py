"""The hand task: bone age from a male and a female head of one model, each with its uncertainty sigma.

Two outputs per image, "male" and "female"; the one of the patient's sex is primary. Where the chronological age
is known (PatientBirthDate and StudyDate, or PatientAge), the estimate of the patient's sex (of both when the sex
is unknown) is compared with it against the Greulich-Pyle reference SD at that age (:mod:`inference.ages`).

In the structured report: one measurement group per sex model (the model's sex is an algorithm parameter, not a
finding): the bone age in months with its properties (TID 310): the model's sigma as the range of measurement
uncertainty (CID 225) and, where the node compared it with the chronological age, the reference population
(TID 311: its mean, SD and the Z-score, its description and coded authority) and the normality (CID 222); the
chronological age as "Subject Age" where known. Built by hand where highdicom cannot: the uncertainty in months,
the population description and the coded reference authority (highdicom writes a code meaning PixelMed does
not know, and the authority as text only).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    Measurement,
    MeasurementProperties,
    MeasurementsAndQualitativeEvaluations,
    MeasurementStatisticalProperties,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydantic import BaseModel, Field

from dicom_node.ai_tasks.interface import ReportContext, ResultView, Task, TaskOutput, TaskSettings, TaskValues
from dicom_node.models import as_utc
from dicom_node.outputs import codes
from dicom_node.outputs.report import add_illustrations, algorithm_identification, finding_site, property_item
from inference.ages import REFERENCE_NAME, Sex, chronological_age, compare_with_chronological_age
from inference.predict import Model, ModelInputs, predict_bone_age

if TYPE_CHECKING:
    import pydicom

    from dicom_node.models import InferenceResult

HAND = CodedConcept("85562004", "SCT", "Hand")  # finding site, CID 4031
# LOINC has a code of bone age, but none that the dictionaries here confirm: it stays private.
BONE_AGE = codes.private("BONE-AGE", "Bone age")
SUBJECT_AGE = CodedConcept("121033", "DCM", "Subject Age")
# TID 310 properties of the bone age: the model's uncertainty (CID 225) and its normality (CID 222, written by
# highdicom under (121402, DCM, "Normality"))
MEASUREMENT_UNCERTAINTY = CodedConcept("371884006", "SCT", "+/-, range of measurement uncertainty")
ASSESSMENTS: dict[str, CodedConcept] = {  # the node's assessments of a bone age, as CID 222 Normality Codes
    "advanced": CodedConcept("371879000", "SCT", "Abnormally high"),
    "delayed": CodedConcept("371880002", "SCT", "Abnormally low"),
    "within range": CodedConcept("17621005", "SCT", "Normal"),
}
# TID 311: the reference population at the patient's chronological age (CID 226, CID 227) and its authority
MEAN_OF_POPULATION = CodedConcept("373098007", "SCT", "Mean Value of population")
STANDARD_DEVIATION_OF_POPULATION = CodedConcept("121414", "DCM", "Standard deviation of population")
Z_SCORE_OF_MEASUREMENT = CodedConcept("121416", "DCM", "Z-Score of measurement")
POPULATION_DESCRIPTION = CodedConcept("121405", "DCM", "Population description")
REFERENCE_AUTHORITY = CodedConcept("121406", "DCM", "Reference Authority")
REFERENCE_AUTHORITIES: dict[str, CodedConcept] = {
    REFERENCE_NAME: codes.private("GREULICH-PYLE-1959", "Greulich and Pyle, Radiographic Atlas, 2nd ed. 1959"),
}
MODELS: dict[Sex, str] = {"M": "male", "F": "female"}


class BoneAgeSettings(TaskSettings):
    card: Path = Path("models/bone-age-demo.yaml")
    flag_sds: float = Field(2.0, gt=0, description="Bone age minus chronological age beyond this many SDs is flagged.")
    augmentations: int = Field(0, ge=0, le=32, description="Test-time augmentation passes of each image; 0 = off.")


class BoneAgeValues(TaskValues):
    sex: Sex  # the model's
    age_months: float
    age_years: float
    sigma_months: float
    augmentations: int = 0
    augmentation_spread_months: float | None = None
    chronological_age_months: float | None = None
    chronological_age_source: str | None = None
    # the comparison with the chronological age; absent where it was not made
    difference_months: float | None = None
    reference_sd_months: float | None = None
    z_score: float | None = None
    assessment: Literal["advanced", "delayed", "within range"] | None = None
    reference: str | None = None
    flag_sds: float | None = None


class BoneAgePrediction(BaseModel):
    """The bone age on one sex's scale, in years as the bone-age seed gave it (and in months)."""

    age: float = Field(description="Bone age in years.")
    uncertainty_sigma: float = Field(description="The model's sigma of the age, in years.")
    age_months: float
    uncertainty_sigma_months: float
    is_primary: bool = Field(description="The scale of the patient's sex (false for both when it is unknown).")
    gradcam_url: str = Field(description="The class activation map as an RGBA PNG to lay over the image.")
    gradcam_path: str = Field(description="Where that PNG is: its path in the node's HTTP API (the seed's file path).")
    timestamp: dt.datetime = Field(description="When the result was recorded (UTC).")


class BoneAgeFields(BaseModel):
    """The bone-age seed's fields of a response; null when the hand model did not run."""

    male_prediction: BoneAgePrediction | None
    female_prediction: BoneAgePrediction | None
    message: str | None = Field(description='What the results are, e.g. "Male & Female Bone Age Results".')


class BoneAgeListingFields(BaseModel):
    """The bone-age seed's flat fields of a listed prediction, in years; null without a bone-age result."""

    male_age: float | None
    male_uncertainty: float | None
    female_age: float | None
    female_uncertainty: float | None


class BoneAgeTask(Task[BoneAgeSettings, BoneAgeValues]):
    name = "bone_age"
    title = "bone age"
    body_part = "HAND"
    routing_pattern = r"\b(HAND|WRIST|BONE ?AGE)\b"
    series_numbers = {"male": 9002, "female": 9003}
    settings_type = BoneAgeSettings
    values_type = BoneAgeValues
    moved_settings = {
        "bone_age_card": "card",
        "bone_age_flag_sds": "flag_sds",
        "bone_age_augmentations": "augmentations",
    }
    prediction_fields_type = BoneAgeFields
    listing_fields_type = BoneAgeListingFields
    viewer_template = Path(__file__).with_name("templates") / "bone_age.html"

    @classmethod
    def viewer_context(cls, results: Sequence[ResultView]) -> dict[str, object]:
        """The readings, the patient's sex first; the chronological age (the same for each model); those compared
        with it."""
        bone_ages = sorted(results, key=lambda result: (not result.is_primary, result.output))
        return {
            "bone_ages": bone_ages,
            "chronological": bone_ages[0].values if bone_ages else None,
            "comparisons": [result for result in bone_ages if result.values.get("difference_months") is not None],
        }

    @classmethod
    def label(cls, output: str, values: Mapping[str, object]) -> str:
        return f"Bone age, {output} model"

    def predict(
        self, model: Model, inputs: ModelInputs, headers: Sequence[pydicom.Dataset]
    ) -> list[list[TaskOutput[BoneAgeValues]]]:
        settings = self.settings
        outputs = []
        for estimates, header in zip(predict_bone_age(model, inputs, settings.augmentations), headers, strict=True):
            age = chronological_age(
                _text(header, "PatientBirthDate"), _text(header, "StudyDate"), _text(header, "PatientAge")
            )
            patient_sex = _text(header, "PatientSex")
            known_sex = patient_sex in MODELS
            of_image = []
            for sex, estimate in estimates.items():
                values = BoneAgeValues(
                    sex=sex,
                    age_months=estimate.age_months,
                    age_years=estimate.age_years,
                    sigma_months=estimate.sigma_months,
                    augmentations=settings.augmentations,
                    augmentation_spread_months=estimate.augmentation_spread_months,
                    chronological_age_months=age.months,
                    chronological_age_source=age.source,
                    heatmap_peak_xy=estimate.heatmap.peak_or_none(),
                )
                # the reference of the patient's sex reads the patient's model; with the sex unknown, each its own
                if age.months is not None and (sex == patient_sex or not known_sex):
                    comparison = compare_with_chronological_age(estimate.age_months, age.months, sex, settings.flag_sds)
                    values = values.model_copy(
                        update={
                            "difference_months": comparison.difference_months,
                            "reference_sd_months": comparison.reference_sd_months,
                            "z_score": comparison.z_score,
                            "assessment": comparison.assessment,
                            "reference": REFERENCE_NAME,
                            "flag_sds": settings.flag_sds,
                        }
                    )
                summary = (
                    f"bone age {estimate.age_years:.1f} years ({estimate.age_months:.0f} +- "
                    f"{estimate.sigma_months:.0f} months), {MODELS[sex]} model"
                )
                of_image.append(TaskOutput(MODELS[sex], sex == patient_sex, summary, values, estimate.heatmap))
            outputs.append(of_image)
        return outputs

    @classmethod
    def caption(cls, output: str, values: BoneAgeValues) -> tuple[tuple[str, ...], str]:
        lines = [f"Bone age {values.age_years:.1f} y +- {values.sigma_months / 12:.1f} y ({output} model)"]
        if values.chronological_age_months is not None:
            comparison = f"Chronological age {values.chronological_age_months / 12:.1f} y"
            if values.z_score is not None:
                comparison += f", Z-score {values.z_score:+.1f}"
            if values.assessment:
                comparison += f" ({values.assessment})"
            lines.append(comparison)
        return tuple(lines), "the bone age estimate"

    @classmethod
    def prediction_fields(
        cls, results: Sequence[InferenceResult], heatmap_url: Callable[[InferenceResult], str]
    ) -> dict[str, object]:
        fields: dict[str, object] = dict.fromkeys(BoneAgeFields.model_fields)
        for result in results:
            fields[f"{result.output}_prediction"] = _prediction(cls, result, heatmap_url)
        models = [model for model in MODELS.values() if fields[f"{model}_prediction"] is not None]
        if models:  # as the seed worded it
            fields["message"] = " & ".join(model.capitalize() for model in models) + " Bone Age Results"
        return fields

    @classmethod
    def listing_fields(cls, prediction: Mapping[str, object]) -> dict[str, object]:
        fields: dict[str, object] = {}
        for model in MODELS.values():
            estimate = prediction[f"{model}_prediction"]
            fields[f"{model}_age"] = estimate.age if estimate else None
            fields[f"{model}_uncertainty"] = estimate.uncertainty_sigma if estimate else None
        return fields

    @classmethod
    def measurement_groups(
        cls, result: InferenceResult, values: BoneAgeValues, context: ReportContext
    ) -> list[MeasurementsAndQualitativeEvaluations]:
        """The bone age read by one sex model, with its properties (:func:`bone_age_properties`), and the
        chronological age where known."""
        model = MODELS[values.sex]
        measurements = [
            Measurement(
                name=BONE_AGE,
                value=values.age_months,
                unit=codes.MONTHS,
                properties=bone_age_properties(result, values),
            )
        ]
        if values.chronological_age_months is not None:
            measurements.append(Measurement(name=SUBJECT_AGE, value=values.chronological_age_months, unit=codes.MONTHS))
        parameters = [f"model of {model} patients"]
        if values.z_score is not None:
            parameters.append(f"abnormal beyond {values.flag_sds} reference SD")
        source = context.source
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=context.uids.derived(source.SOPInstanceUID, "tracking", result.task, result.output),
                identifier=f"bone age, {model} model" + (" (the patient's sex)" if result.is_primary else ""),
            ),
            finding_sites=[finding_site(HAND, source)],
            algorithm_id=algorithm_identification(result, *parameters),
            measurements=measurements,
            source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
        )
        add_illustrations(group, context.illustrations)
        return [group]


def _prediction(
    task: type[BoneAgeTask], result: InferenceResult, heatmap_url: Callable[[InferenceResult], str]
) -> BoneAgePrediction:
    values = task.values(result)
    return BoneAgePrediction(
        age=round(values.age_months / 12.0, 3),
        uncertainty_sigma=round(values.sigma_months / 12.0, 3),
        age_months=values.age_months,
        uncertainty_sigma_months=values.sigma_months,
        is_primary=result.is_primary,
        gradcam_url=heatmap_url(result),
        gradcam_path=heatmap_url(result),
        timestamp=as_utc(result.created_at),
    )


def bone_age_properties(result: InferenceResult, values: BoneAgeValues) -> MeasurementProperties:
    """TID 310 of a bone age: where the node compared it with the chronological age against the reference's SD at
    that age, the normality (CID 222) and the reference population (:func:`reference_population`); and always the
    model's sigma as the range of measurement uncertainty (CID 225), in months."""
    normality, population = None, None
    if values.z_score is not None:
        if values.assessment is None:
            raise ValueError(f"result {result.task}/{result.output}: a Z-score without an assessment")
        normality = ASSESSMENTS[values.assessment]
        population = reference_population(result, values)
    properties = MeasurementProperties(normality=normality, measurement_statistical_properties=population)
    properties.append(property_item(MEASUREMENT_UNCERTAINTY, values.sigma_months, codes.MONTHS))
    return properties


def reference_population(result: InferenceResult, values: BoneAgeValues) -> MeasurementStatisticalProperties:
    """TID 311: the children of the model's sex at the patient's chronological age, as the reference sees them:
    their mean bone age (the reference sets it to the chronological age), its SD, the Z-score of this bone age,
    a description and the reference as the authority."""
    where = f"result {result.task}/{result.output}"
    missing = [
        key
        for key in ("chronological_age_months", "reference_sd_months", "z_score", "reference")
        if getattr(values, key) is None
    ]
    if missing:
        raise ValueError(f"{where} lacks the values {', '.join(missing)}")
    authority = REFERENCE_AUTHORITIES.get(values.reference)
    if authority is None:
        raise ValueError(f"{where}: reference {values.reference!r} is not one of {sorted(REFERENCE_AUTHORITIES)}")
    age = values.chronological_age_months
    population = MeasurementStatisticalProperties(
        values=[
            property_item(MEAN_OF_POPULATION, age, codes.MONTHS),
            property_item(STANDARD_DEVIATION_OF_POPULATION, values.reference_sd_months, codes.MONTHS),
            property_item(Z_SCORE_OF_MEASUREMENT, values.z_score, codes.NO_UNITS),
        ]
    )
    children = "boys" if values.sex == "M" else "girls"
    description = f"{children} aged {age:.1f} months, {values.reference}"
    population.append(
        TextContentItem(POPULATION_DESCRIPTION, description, relationship_type=RelationshipTypeValues.HAS_PROPERTIES)
    )
    population.append(
        CodeContentItem(REFERENCE_AUTHORITY, authority, relationship_type=RelationshipTypeValues.HAS_PROPERTIES)
    )
    return population


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() if value not in (None, "") else None
