"""An example task: the sigmoid of a model's first output as a "score" of the whole image, with that output's
class activation map as the heatmap. It is not a medical task; it shows every part a task declares."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from highdicom.sr import (
    CodedConcept,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydantic import BaseModel, Field

from dicom_node.ai_tasks.interface import ReportContext, Task, TaskOutput, TaskSettings, TaskValues
from dicom_node.models import InferenceResult
from dicom_node.outputs import codes
from dicom_node.outputs.report import add_illustrations, algorithm_identification, finding_site
from inference.predict import Heatmap, Model, ModelInputs

TOE = CodedConcept("29707007", "SCT", "Toe")  # CID 4031


class ExampleSettings(TaskSettings):
    scale: float = Field(1.0, gt=0, description="The first output is multiplied by this before the sigmoid.")


class ExampleValues(TaskValues):
    score: float


class ExampleFields(BaseModel):
    """What the example adds to a /predict response."""

    example_score: float | None = Field(description="The score, 0-1; null when the example did not run.")


class ExampleTask(Task[ExampleSettings, ExampleValues]):
    name = "example"
    title = "example"
    body_part = "TOE"
    routing_pattern = r"\bTOE\b"
    series_numbers = {"main": 9050}
    settings_type = ExampleSettings
    values_type = ExampleValues
    prediction_fields_type = ExampleFields
    viewer_template = Path(__file__).with_name("templates") / "example.html"

    def predict(
        self, model: Model, inputs: ModelInputs, headers: Sequence[pydicom.Dataset]
    ) -> list[list[TaskOutput[ExampleValues]]]:
        outputs, maps = model.run(inputs.batch, [0])
        scores = 1 / (1 + np.exp(-self.settings.scale * outputs[:, 0]))
        return [
            [
                TaskOutput(
                    "main", True, f"example score {score:.2f}", ExampleValues(score=float(score)), Heatmap(cam, box)
                )
            ]
            for score, cam, box in zip(scores, maps[:, 0], inputs.letterboxes, strict=True)
        ]

    @classmethod
    def caption(cls, output: str, values: ExampleValues) -> tuple[tuple[str, ...], str]:
        return (f"Example score {values.score:.2f}",), "the first output"

    @classmethod
    def measurement_groups(
        cls, result: InferenceResult, values: ExampleValues, context: ReportContext
    ) -> list[MeasurementsAndQualitativeEvaluations]:
        source = context.source
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=context.uids.derived(source.SOPInstanceUID, "tracking", result.task, result.output),
                identifier="example score",
            ),
            finding_sites=[finding_site(TOE, source)],
            algorithm_id=algorithm_identification(result),
            measurements=[Measurement(name=codes.PROBABILITY, value=values.score, unit=codes.NO_UNITS)],
            source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
        )
        add_illustrations(group, context.illustrations)
        return [group]

    @classmethod
    def prediction_fields(
        cls, results: Sequence[InferenceResult], heatmap_url: Callable[[InferenceResult], str]
    ) -> dict[str, object]:
        return {"example_score": cls.values(results[0]).score if results else None}

    @classmethod
    def label(cls, output: str, values: Mapping[str, object]) -> str:
        return "Example score"
