"""What a task declares, and what the node does with it.

A task is a subclass of :class:`Task`. The node (inference jobs, outputs, tracking, web) knows tasks only
through this interface:

- its name, its settings (``inference.tasks.<name>`` in config.yaml, with the path of its model card) and the
  pattern of its default routing rule;
- :meth:`Task.predict`: a batch of model inputs and the images' headers in, one :class:`TaskOutput` per output
  and image out: a summary in words, the values as a pydantic model (:attr:`Task.values_type`), and a heatmap;
- the Secondary Capture's words (:meth:`Task.caption`) and series (:attr:`Task.series_numbers`);
- the TID 1501 Measurement Groups of the structured report (:meth:`Task.measurement_groups`);
- the fields it adds to the seed projects' responses (``/predict``, ``/predict_base64``, ``/results``:
  :attr:`Task.prediction_fields_type`, :attr:`Task.listing_fields_type`) and its part of the viewer's image page
  (:attr:`Task.viewer_template`, a Jinja template beside the task's module).

A :class:`GateTask` runs on every image before the others and says which body part the image shows; the node
routes by it (:func:`dicom_node.routing.follow_the_image`) and records what it did in the gate's values
(:class:`GateValues`).

The outputs are built from the values recorded in the index, never from today's settings: a report made
again says what the model said then.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import pydicom
    from highdicom.sr import MeasurementsAndQualitativeEvaluations

    from dicom_node.models import InferenceResult
    from dicom_node.outputs.uids import InstallationUids
    from inference.predict import Heatmap, Model, ModelInputs


# The node's series in a study: each task numbers its Secondary Captures (Task.series_numbers); the Parametric
# Maps of an output follow MAP_SERIES_OFFSET later; the report has its own.
MAP_SERIES_OFFSET = 100
REPORT_SERIES_NUMBER = 9010
RESERVED_SERIES_NUMBERS = (REPORT_SERIES_NUMBER,)


class TaskSettings(BaseModel):
    """A task's section of ``inference.tasks``: its model card (YAML beside its weights, relative to the working
    directory), and whatever else the task declares in its subclass."""

    model_config = ConfigDict(extra="forbid")

    card: Path


class TaskValues(BaseModel):
    """The values of one result as the index keeps them (``InferenceResult.values``, JSON). Keys written by
    another version of the node that this one does not know are ignored on reading."""

    model_config = ConfigDict(extra="ignore")

    heatmap_peak_xy: list[float] | None = None  # where the heatmap peaks, in image pixels; None for an empty map


class ResultView(Protocol):
    """A recorded result as the viewer has it."""

    id: int
    output: str
    is_primary: bool
    summary: str
    values: dict[str, Any]


SettingsT = TypeVar("SettingsT", bound=TaskSettings)
ValuesT = TypeVar("ValuesT", bound=TaskValues)


@dataclass(frozen=True)
class TaskOutput(Generic[ValuesT]):
    """One output of a task for one image: one row of the index's results, one Secondary Capture, one map."""

    output: str  # one of the task's series_numbers (at most 16 characters)
    is_primary: bool  # the output that answers for the image (of two sex models, the patient's)
    summary: str  # the result in a line of words, free of patient data
    values: ValuesT
    heatmap: Heatmap


@dataclass(frozen=True)
class ReportContext:
    """What a task's measurement groups refer to: the source image, the installation's UIDs, and the node's own
    images (Secondary Capture, Parametric Map) of the result."""

    source: pydicom.Dataset
    uids: InstallationUids
    illustrations: Sequence[pydicom.Dataset] = ()


class Task(ABC, Generic[SettingsT, ValuesT]):
    """An AI task: one model card, the outputs it gives for an image, and how the node shows them."""

    name: ClassVar[str]  # the key in config.yaml, the index and MLflow: lowercase letters, digits and "_"
    title: ClassVar[str]  # in words, for series descriptions: "fracture detection"
    body_part: ClassVar[str]  # BodyPartExamined (PS3.16 CID 4031) of an uploaded picture routed to it
    routing_pattern: ClassVar[str]  # the default rule: a regular expression on the routed attributes
    series_numbers: ClassVar[Mapping[str, int]]  # output -> the Series Number of its Secondary Captures
    settings_type: ClassVar[type[TaskSettings]]
    values_type: ClassVar[type[TaskValues]]
    moved_settings: ClassVar[Mapping[str, str]] = {}  # an old key of ``inference`` -> its key in the task's section
    illustrated: ClassVar[bool] = True  # False: its results get no Secondary Capture or Parametric Map, the report only

    def __init__(self, settings: SettingsT) -> None:
        self.settings = settings

    # --- inference -------------------------------------------------------------------------------------------

    @abstractmethod
    def predict(
        self, model: Model, inputs: ModelInputs, headers: Sequence[pydicom.Dataset]
    ) -> list[list[TaskOutput[ValuesT]]]:
        """For each image of ``inputs`` (whose headers are ``headers``), its outputs."""

    # --- reading recorded results ----------------------------------------------------------------------------

    @classmethod
    def values(cls, result: InferenceResult) -> ValuesT:
        """``result``'s values as :attr:`values_type`; ValueError naming what is missing or wrong."""
        cls.series_number(result.output)
        if not isinstance(result.values, Mapping):
            raise ValueError(f"the result's values must be a mapping, not {type(result.values).__name__}")
        try:
            return cls.values_type.model_validate(result.values)
        except ValidationError as error:
            missing = [str(item["loc"][0]) for item in error.errors() if item["type"] == "missing"]
            if missing:
                raise ValueError(f"the values of a {cls.name} result lack {', '.join(missing)}") from None
            item = error.errors()[0]
            where = "".join(f"{part}: " for part in item["loc"][:1])
            message = item["msg"].removeprefix("Value error, ")
            got = f" (got {item['input']!r})" if isinstance(item.get("input"), str | int | float) else ""
            raise ValueError(f"the values of a {cls.name} result: {where}{message}{got}") from None

    # --- the Secondary Capture -------------------------------------------------------------------------------

    @classmethod
    def series_number(cls, output: str) -> int:
        """The Series Number of ``output``'s Secondary Captures; ValueError for an output the task does not have."""
        if output not in cls.series_numbers:
            raise ValueError(f"task {cls.name!r} has no output {output!r}; it has {', '.join(cls.series_numbers)}")
        return cls.series_numbers[output]

    @classmethod
    @abstractmethod
    def caption(cls, output: str, values: ValuesT) -> tuple[tuple[str, ...], str]:
        """The lines of words that state the result, and what the heatmap's colours show ("the fracture")."""

    @classmethod
    def series_description(cls, output: str) -> str:
        """The Secondary Captures' series: "AI <title> heatmap", or, for a task of several outputs,
        "AI <title> heatmap, <output> model"."""
        if len(cls.series_numbers) == 1:
            return f"AI {cls.title} heatmap"
        return f"AI {cls.title} heatmap, {output} model"

    # --- the structured report -------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def measurement_groups(
        cls, result: InferenceResult, values: ValuesT, context: ReportContext
    ) -> list[MeasurementsAndQualitativeEvaluations]:
        """The TID 1501 Measurement Groups of one result (:mod:`dicom_node.outputs.report` has the parts every
        group shares)."""

    # --- the HTTP API and the viewer -------------------------------------------------------------------------

    prediction_fields_type: ClassVar[type[BaseModel] | None] = None  # its fields of a /predict response
    listing_fields_type: ClassVar[type[BaseModel] | None] = None  # and of a prediction listed by /results
    viewer_template: ClassVar[Path | None] = None  # None: the viewer shows each result's summary

    @classmethod
    def prediction_fields(
        cls, results: Sequence[InferenceResult], heatmap_url: Callable[[InferenceResult], str]
    ) -> dict[str, object]:
        """The values of :attr:`prediction_fields_type`'s fields from the task's results of one image, every field
        None when there are none (the task did not run)."""
        return {}

    @classmethod
    def listing_fields(cls, prediction: Mapping[str, object]) -> dict[str, object]:
        """The values of :attr:`listing_fields_type`'s fields, from those of :meth:`prediction_fields`."""
        return {}

    @classmethod
    def label(cls, output: str, values: Mapping[str, object]) -> str:
        """A result in a few words, as the viewer heads it: "<Title>, <output>"."""
        return f"{cls.title.capitalize()}, {output}"

    @classmethod
    def viewer_context(cls, results: Sequence[ResultView]) -> dict[str, object]:
        """What :attr:`viewer_template` is rendered with, from the task's results of one image (the API's
        ``ResultOut``: ``id``, ``output``, ``is_primary``, ``summary``, ``values`` ...); it also gets the macros
        ``result_meta(result)`` and ``result_label(result)``."""
        return {"results": list(results)}


# --- a task that looks at every image first ------------------------------------------------------------------


class GateSettings(TaskSettings):
    """A gate's section of ``inference.tasks``: what the node does when the DICOM tags route an image to tasks of
    another body part than the gate sees: ``policy`` where the gate is at least ``min_confidence`` sure, else it
    follows the tags."""

    policy: Literal["trust_image", "trust_tags"] = Field(
        "trust_image", description="trust_image: run the tasks of what the image shows; trust_tags: those of the tags."
    )
    min_confidence: float = Field(0.9, gt=0, le=1, description="Below it, the node follows the tags.")


class GateValues(TaskValues):
    """What a gate saw in an image (:meth:`GateTask.predict`), and what the node did with it
    (:func:`dicom_node.routing.follow_the_image`)."""

    seen: str  # the class the gate's model gives, as the task names it ("hand", "other")
    body_part: str | None  # the BodyPartExamined it means (a task's ``body_part``); None: none of the tasks'
    confidence: float
    probabilities: dict[str, float]
    tagged_tasks: list[str] | None = None  # the tasks the DICOM tags routed the image to; None: they did not say
    tasks_run: list[str] = []
    disagreement: bool = False  # the tags routed the image only to tasks of another body part the gate judges
    followed: Literal["image", "tags"] | None = None  # on a disagreement, which one the node followed


class GateTask(Task[SettingsT, GateValues]):
    """A task that runs on every image the models read, before the others, and says which body part it shows; its
    result is recorded where it routed the image to a task or disagreed with the tags, and shows in the report, the
    API and the viewer, never as an image of its own."""

    settings_type: ClassVar[type[TaskSettings]] = GateSettings
    values_type = GateValues
    illustrated = False
    routing_pattern = r"(?!)"  # no rule of the tags routes to a gate
    body_parts: ClassVar[Mapping[str, str | None]]  # each class of its model -> the BodyPartExamined it means

    @abstractmethod
    def predict(
        self, model: Model, inputs: ModelInputs, headers: Sequence[pydicom.Dataset]
    ) -> list[list[TaskOutput[GateValues]]]:
        """For each image, one output whose values say what it shows (the routing fields left at their defaults)."""

    @classmethod
    def caption(cls, output: str, values: GateValues) -> tuple[tuple[str, ...], str]:
        return (f"{cls.title.capitalize()}: {values.seen} ({values.confidence:.0%})",), f"the {values.seen}"
