"""The foot task: Normal, Flatfoot, Foot Ulcer or Hallux Valgus, from MONAI's DenseNet121.

One output per image ("foot"): the probability of each class, the most probable one, whether the Hallux Valgus
probability reaches the threshold (set low, for recall), the hallux valgus angle where the model regresses it,
and the CAM of the most probable class. What the node reports present follows one rule,
:func:`inference.predict.reported_foot_findings`, in the picture and the report alike.

In the structured report: one measurement group per class of the model, its finding the class, its
"Probability", and the class present or absent by that rule; the hallux valgus group also has the hallux valgus
angle where the model gives one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from highdicom.sr import (
    CodedConcept,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydantic import BaseModel, Field, model_validator

from dicom_node.ai_tasks.interface import ReportContext, Task, TaskOutput, TaskSettings, TaskValues
from dicom_node.outputs import codes
from dicom_node.outputs.report import add_illustrations, algorithm_identification, finding_site
from inference.model_card import DEFAULT_HALLUX_VALGUS_THRESHOLD, DEMO_DISCLAIMER, HALLUX_VALGUS_CLASSES
from inference.predict import Model, ModelInputs, predict_hallux_valgus
from inference.predict import reported_foot_findings as reported_findings

if TYPE_CHECKING:
    import pydicom

    from dicom_node.models import InferenceResult

# Finding site (TID 1501 row 6; CID 4031 Common Anatomic Regions)
FOOT = CodedConcept("56459004", "SCT", "Foot")
# The classes, each the finding of its own measurement group (TID 1501 row 3b). Normal is "No abnormality", a
# finding, not the qualifier "Normal". A foot ulcer is "Ulcer" at the finding site Foot. No code of pes planus or
# of hallux valgus could be verified here (SNOMED CT 202855006, which some public code labels hallux valgus, is
# lateral epicondylitis): they stay private.
FINDINGS: dict[str, CodedConcept] = {
    "Normal": CodedConcept("111286", "DCM", "No abnormality"),
    "Flatfoot": codes.private("PES-PLANUS", "Pes planus"),
    "Foot Ulcer": CodedConcept("56208002", "SCT", "Ulcer"),
    "Hallux Valgus": codes.private("HALLUX-VALGUS", "Hallux valgus"),
}
ANGLE = codes.private("HV-ANGLE", "Hallux valgus angle")


class HalluxValgusSettings(TaskSettings):
    card: Path = Path("models/hallux-valgus-demo.yaml")
    threshold: float = Field(
        DEFAULT_HALLUX_VALGUS_THRESHOLD,
        gt=0,
        lt=1,
        description="Hallux Valgus probability that flags; low, for recall.",
    )


class FootValues(TaskValues):
    probabilities: dict[str, float]
    prediction: str
    confidence: float
    hallux_valgus_detected: bool
    threshold: float
    hallux_valgus_angle_deg: float | None = None
    heatmap_of: str | None = None  # the class whose CAM the heatmap is (results before it had the prediction's)
    # the model's figures as `dicom-node evaluate` measured them into its card, when the result was made
    model_accuracy: float | None = None
    model_hallux_valgus_recall: float | None = None

    @model_validator(mode="after")
    def _classes_are_the_models(self) -> FootValues:
        if set(self.probabilities) != set(HALLUX_VALGUS_CLASSES):
            raise ValueError(
                f"the probabilities must name {list(HALLUX_VALGUS_CLASSES)}, not {sorted(self.probabilities)}"
            )
        return self

    @property
    def shown(self) -> str:
        """The class whose CAM the heatmap is."""
        return self.heatmap_of or self.prediction


class HalluxValgusModelInfo(BaseModel):
    """The foot model as the hallux valgus seed described it: figures as percent text."""

    name: str = Field(description="The model's name and version, with the demo disclaimer where it applies.")
    accuracy: str = Field(description='Its accuracy on the held-out evaluation set, e.g. "98.8%"; "not measured".')
    hallux_valgus_recall: str = Field(description='Its recall of Hallux Valgus there, e.g. "99.6%"; "not measured".')


class HalluxValgusFields(BaseModel):
    """The hallux valgus seed's fields of a response, in its units (percent); beside them the node's own, under
    names of their own. Null when the foot model did not run."""

    prediction: str | None = Field(description="Normal, Flatfoot, Foot Ulcer or Hallux Valgus.")
    confidence: float | None = Field(description="The probability of the predicted class, in percent (0-100).")
    hallux_valgus_detected: bool | None = Field(
        description="Hallux Valgus probability >= inference.tasks.hallux_valgus.threshold (set low, for recall)."
    )
    probabilities: dict[str, float] | None = Field(description="The probability of each class, in percent (0-100).")
    model_info: HalluxValgusModelInfo | None = Field(description="The foot model, as the seed described it.")
    confidence_fraction: float | None = Field(description="The probability of the predicted class, 0-1.")
    probability_fractions: dict[str, float] | None = Field(description="The probability of each class, 0-1.")
    hallux_valgus_angle_deg: float | None = Field(description="The model's regression of the angle, if it has one.")
    hallux_valgus_gradcam_url: str | None = Field(description="The predicted class's activation map (RGBA PNG).")


class HalluxValgusTask(Task[HalluxValgusSettings, FootValues]):
    name = "hallux_valgus"
    title = "hallux valgus"
    body_part = "FOOT"
    routing_pattern = r"\b(FOOT|TOES?|FOREFOOT)\b"
    series_numbers = {"foot": 9001}
    settings_type = HalluxValgusSettings
    values_type = FootValues
    moved_settings = {"hallux_valgus_card": "card", "hallux_valgus_threshold": "threshold"}
    prediction_fields_type = HalluxValgusFields
    viewer_template = Path(__file__).with_name("templates") / "hallux_valgus.html"

    def predict(
        self, model: Model, inputs: ModelInputs, headers: Sequence[pydicom.Dataset]
    ) -> list[list[TaskOutput[FootValues]]]:
        threshold = self.settings.threshold
        measured = model.card.metrics
        outputs = []
        for result in predict_hallux_valgus(model, inputs, threshold):
            values = FootValues(
                probabilities=result.probabilities,
                prediction=result.prediction,
                confidence=result.confidence,
                hallux_valgus_detected=result.hallux_valgus_detected,
                threshold=threshold,
                hallux_valgus_angle_deg=result.hallux_valgus_angle_deg,
                heatmap_of=result.prediction,
                heatmap_peak_xy=result.heatmap.peak_or_none(),
                model_accuracy=_number(measured.get("evaluation_hallux_valgus_accuracy")),
                model_hallux_valgus_recall=_number(measured.get("evaluation_hallux_valgus_recall")),
            )
            summary = f"{result.prediction} ({result.confidence:.0%})"
            if result.hallux_valgus_detected and result.prediction != "Hallux Valgus":
                summary += f"; hallux valgus flagged ({result.probabilities['Hallux Valgus']:.0%})"
            elif result.prediction == "Hallux Valgus" and not result.hallux_valgus_detected:  # as the report says
                summary += f"; below the threshold ({threshold:.0%}): no abnormality reported"
            outputs.append([TaskOutput("foot", True, summary, values, result.heatmap)])
        return outputs

    @classmethod
    def caption(cls, output: str, values: FootValues) -> tuple[tuple[str, ...], str]:
        probabilities = values.probabilities
        lines = [f"{values.prediction} {_percent(values.confidence)}"]
        if values.hallux_valgus_detected and values.prediction != "Hallux Valgus":
            lines.append(f"Hallux valgus flagged: {_percent(probabilities['Hallux Valgus'])}")
        if values.prediction == "Hallux Valgus" and not values.hallux_valgus_detected:  # as the report says
            lines.append(f"Below the hallux valgus threshold {_percent(values.threshold)}: no abnormality reported")
        if values.hallux_valgus_angle_deg is not None:
            lines.append(f"Hallux valgus angle {values.hallux_valgus_angle_deg:.0f} deg")
        lines.append("All classes: " + ", ".join(f"{name} {_percent(p)}" for name, p in probabilities.items()))
        return tuple(lines), values.shown

    @classmethod
    def measurement_groups(
        cls, result: InferenceResult, values: FootValues, context: ReportContext
    ) -> list[MeasurementsAndQualitativeEvaluations]:
        """One group per class of the model: the class as the finding, its probability, and present or absent by
        :func:`inference.predict.reported_foot_findings`; the illustrations go to the class their heatmap shows."""
        where = f"result {cls.name}/{result.output}"
        try:
            present = reported_findings(values.probabilities, values.threshold)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if values.shown not in HALLUX_VALGUS_CLASSES:
            raise ValueError(f"{where}: the heatmap's class {values.shown!r} is not a class")
        source = context.source
        groups = []
        for name in HALLUX_VALGUS_CLASSES:
            finding = FINDINGS[name]
            measurements = [Measurement(name=codes.PROBABILITY, value=values.probabilities[name], unit=codes.NO_UNITS)]
            if name == "Hallux Valgus" and values.hallux_valgus_angle_deg is not None:
                measurements.append(Measurement(name=ANGLE, value=values.hallux_valgus_angle_deg, unit=codes.DEGREES))
            group = MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=context.uids.derived(source.SOPInstanceUID, "tracking", result.task, result.output, name),
                    identifier=f"foot: {name.lower()}",
                ),
                finding_type=finding,
                finding_sites=[finding_site(FOOT, source)],
                algorithm_id=algorithm_identification(
                    result,
                    f"hallux valgus present from a probability of {values.threshold}",
                    "flatfoot or foot ulcer present when the most probable class",
                    "no abnormality present when no other class is",
                ),
                measurements=measurements,
                qualitative_evaluations=[
                    QualitativeEvaluation(finding, codes.PRESENT if name in present else codes.ABSENT)
                ],
                source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
            )
            if name == values.shown:
                add_illustrations(group, context.illustrations)
            groups.append(group)
        return groups

    @classmethod
    def prediction_fields(
        cls, results: Sequence[InferenceResult], heatmap_url: Callable[[InferenceResult], str]
    ) -> dict[str, object]:
        if not results:
            return dict.fromkeys(HalluxValgusFields.model_fields)
        [result] = results
        values = cls.values(result)
        model = f"{result.model_name} {result.model_version} (MONAI DenseNet121)"
        return {
            "prediction": values.prediction,
            "confidence": _in_percent(values.confidence),
            "hallux_valgus_detected": values.hallux_valgus_detected,
            "probabilities": {name: _in_percent(p) for name, p in values.probabilities.items()},
            "model_info": HalluxValgusModelInfo(
                name=model + (f" ({DEMO_DISCLAIMER})" if result.demo_model else ""),
                accuracy=_percent_text(values.model_accuracy),
                hallux_valgus_recall=_percent_text(values.model_hallux_valgus_recall),
            ),
            "confidence_fraction": values.confidence,
            "probability_fractions": values.probabilities,
            "hallux_valgus_angle_deg": values.hallux_valgus_angle_deg,
            "hallux_valgus_gradcam_url": heatmap_url(result),
        }

    @classmethod
    def label(cls, output: str, values: Mapping[str, object]) -> str:
        return f"Hallux valgus: {values.get('heatmap_of') or values.get('prediction')}"


def _percent(probability: float) -> str:
    return f"{round(100 * float(probability))} %"


def _in_percent(probability: float) -> float:
    """As the seed gave probabilities: percent, to two decimals."""
    return round(100 * probability, 2)


def _percent_text(fraction: float | None) -> str:
    """A measured figure as the seed's model_info wrote its figures: "98.8%"."""
    return f"{100 * fraction:.1f}%" if fraction is not None else "not measured"


def _number(metric: object) -> float | None:
    """A card's metric where it is a number (a card may record text too)."""
    return float(metric) if isinstance(metric, int | float) and not isinstance(metric, bool) else None
