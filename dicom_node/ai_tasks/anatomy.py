"""The anatomy check: does an image show a hand, a foot, or something else? It runs on every image before the
other tasks (a :class:`~dicom_node.ai_tasks.interface.GateTask`), on a small DenseNet that costs a fraction of a
millisecond, and the node routes by it: a hand to the tasks of the HAND, a foot to those of the FOOT, anything else
to none, where the DICOM tags do not say, or say otherwise and the check is confident
(:func:`dicom_node.routing.follow_the_image`).

In the structured report: one measurement group, the body part the image shows (a qualitative evaluation of the
node's private concept "Body part shown", valued Hand, Foot or the private "Neither hand nor foot"), the probability
of that class, and, where the tags routed the image, whether the check agrees with them and which one the node
followed.
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
from pydantic import BaseModel, Field

from dicom_node.ai_tasks.interface import GateSettings, GateTask, GateValues, ReportContext, ResultView, TaskOutput
from dicom_node.outputs import codes
from dicom_node.outputs.report import algorithm_identification, finding_site
from inference.predict import Model, ModelInputs, predict_anatomy

if TYPE_CHECKING:
    import pydicom

    from dicom_node.models import InferenceResult

OUTPUT = "body_part"
BODY_PART_SHOWN = codes.private("BODY-PART-SHOWN", "Body part shown in the image")
AGREES_WITH_TAGS = codes.private("AGREES-WITH-TAGS", "Agrees with the body part of the DICOM attributes")
SHOWN: dict[str, CodedConcept] = {  # each class of the model, as the report codes it (CID 4031 where it can)
    "hand": CodedConcept("85562004", "SCT", "Hand"),
    "foot": CodedConcept("56459004", "SCT", "Foot"),
    "other": codes.private("NOT-HAND-OR-FOOT", "Neither hand nor foot"),
}
YES_NO: dict[bool, CodedConcept] = {
    True: CodedConcept("373066001", "SCT", "Yes"),
    False: CodedConcept("373067005", "SCT", "No"),
}


class AnatomySettings(GateSettings):
    card: Path = Path("models/anatomy-demo.yaml")


class AnatomyPrediction(BaseModel):
    """What the image shows by the anatomy check, and what the node did with it."""

    shows: str = Field(description="hand, foot or other.")
    confidence: float = Field(description="The probability of that class, 0-1.")
    probabilities: dict[str, float] = Field(description="Of each class, 0-1.")
    tags_disagree: bool = Field(description="The DICOM tags routed the image to another body part's tasks.")
    followed: str | None = Field(description="On a disagreement, whether the node followed the image or the tags.")
    tasks_run: list[str] = Field(description="The tasks the image was routed to.")


class AnatomyFields(BaseModel):
    anatomy: AnatomyPrediction | None = Field(description="The anatomy check; null where it did not run.")


class AnatomyTask(GateTask[AnatomySettings]):
    name = "anatomy"
    title = "anatomy check"
    body_part = ""  # of its own, none: an upload for it only is routed by what the image shows
    series_numbers = {OUTPUT: 9040}  # reserved: the check makes no image of its own
    settings_type = AnatomySettings
    body_parts = {"hand": "HAND", "foot": "FOOT", "other": None}
    prediction_fields_type = AnatomyFields
    viewer_template = Path(__file__).with_name("templates") / "anatomy.html"

    def predict(
        self, model: Model, inputs: ModelInputs, headers: Sequence[pydicom.Dataset]
    ) -> list[list[TaskOutput[GateValues]]]:
        outputs = []
        for result in predict_anatomy(model, inputs):
            values = GateValues(
                seen=result.prediction,
                body_part=self.body_parts[result.prediction],
                confidence=result.confidence,
                probabilities=result.probabilities,
                heatmap_peak_xy=result.heatmap.peak_or_none(),
            )
            summary = f"shows a {result.prediction} ({result.confidence:.0%})"
            if result.prediction == "other":
                summary = f"shows neither a hand nor a foot ({result.confidence:.0%})"
            # not primary: the viewer lays a finding's heatmap over the image first, not this one
            outputs.append([TaskOutput(OUTPUT, False, summary, values, result.heatmap)])
        return outputs

    @classmethod
    def label(cls, output: str, values: Mapping[str, object]) -> str:
        return "Anatomy check"

    @classmethod
    def viewer_context(cls, results: Sequence[ResultView]) -> dict[str, object]:
        return {"checks": list(results)}

    @classmethod
    def measurement_groups(
        cls, result: InferenceResult, values: GateValues, context: ReportContext
    ) -> list[MeasurementsAndQualitativeEvaluations]:
        """The body part shown and its probability; agreement with the tags where they routed the image."""
        if values.seen not in SHOWN:
            raise ValueError(f"result {cls.name}/{result.output}: {values.seen!r} is not a class of the check")
        source = context.source
        evaluations = [QualitativeEvaluation(BODY_PART_SHOWN, SHOWN[values.seen])]
        if values.tagged_tasks is not None:
            evaluations.append(QualitativeEvaluation(AGREES_WITH_TAGS, YES_NO[not values.disagreement]))
        parameters = [f"followed the {values.followed} on the disagreement"] if values.followed else []
        parameters.append("ran " + (", ".join(values.tasks_run) or "no task"))
        sites = [finding_site(SHOWN[values.seen], source)] if values.body_part is not None else None
        return [
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=context.uids.derived(source.SOPInstanceUID, "tracking", result.task, result.output),
                    identifier="anatomy check",
                ),
                finding_sites=sites,
                algorithm_id=algorithm_identification(result, *parameters),
                measurements=[Measurement(name=codes.PROBABILITY, value=values.confidence, unit=codes.NO_UNITS)],
                qualitative_evaluations=evaluations,
                source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
            )
        ]

    @classmethod
    def prediction_fields(
        cls, results: Sequence[InferenceResult], heatmap_url: Callable[[InferenceResult], str]
    ) -> dict[str, object]:
        if not results:
            return {"anatomy": None}
        values = cls.values(results[0])
        return {
            "anatomy": AnatomyPrediction(
                shows=values.seen,
                confidence=values.confidence,
                probabilities=values.probabilities,
                tags_disagree=values.disagreement,
                followed=values.followed,
                tasks_run=values.tasks_run,
            )
        }
