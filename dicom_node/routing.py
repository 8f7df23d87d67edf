"""Which tasks run on a stored instance: decided from its header (:func:`route`), then, where a gate is configured,
from what the image shows (:func:`follow_the_image`).

Objects that carry no image for the models (structured reports, presentation states, key object selections)
and derived images (among them the node's own Secondary Captures coming back from the PACS) are skipped with
a reason that the job records. Otherwise the first configured rule whose pattern matches one of its
attributes decides; an instance that no rule decides runs ``undecided_tasks``.

A gate (:class:`dicom_node.ai_tasks.interface.GateTask`) then looks at every image that is not skipped. It judges
the tasks of the body parts it tells apart (say, a hand's and a foot's); the others run as routed. Where no rule
decided, the image goes to those of ``undecided_tasks`` (by default every task but the gate) that read the body part
the gate sees, or that it cannot judge. Where a rule routed it only to tasks of another body part that the gate
judges, that is a disagreement, which the gate's result records: with the gate at least ``min_confidence`` sure, its
``policy`` says whether the node follows the image (the default) or the tags; less sure, the node follows the tags.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.ai_tasks.interface import GateSettings, GateTask, GateValues, Task
from dicom_node.config import InferenceSettings, TaskName


@dataclass(frozen=True)
class Route:
    tasks: tuple[TaskName, ...]
    reason: str  # why these tasks, or why none; free of patient data
    by_tags: bool = False  # a rule matched the header
    skipped: bool = False  # no image for the models: no task reads it, nor a gate

    def models(self, settings: InferenceSettings) -> tuple[TaskName, ...]:
        """The tasks whose models may read the image: with a gate, any task, as the image may show any body part."""
        if settings.gate is not None and not self.skipped:
            return tuple(settings.tasks)
        return self.tasks


def route(ds: Dataset, settings: InferenceSettings) -> Route:
    """The tasks for ``ds`` (a header is enough) and the reason."""
    if "PixelData" not in ds:
        return Route((), f"skipped: no image ({_sop_class_name(ds)})", skipped=True)
    image_type = ds.get("ImageType") or []
    image_type = [str(value).upper() for value in ([image_type] if isinstance(image_type, str) else image_type)]
    if settings.skip_derived and image_type[:1] == ["DERIVED"]:
        reason = "skipped: derived image (ImageType " + "\\".join(image_type) + f", {_sop_class_name(ds)})"
        return Route((), reason, skipped=True)
    for number, rule in enumerate(settings.rules, start=1):
        pattern = re.compile(rule.pattern, re.IGNORECASE)
        for attribute in rule.attributes:
            value = str(ds.get(attribute, "") or "")
            if value and pattern.search(value):
                return Route(tuple(rule.tasks), f"rule {number} matched {attribute}", by_tags=True)
    return Route(tuple(settings.undecided_tasks), "no rule matched")


def follow_the_image(
    route: Route,
    seen: GateValues,
    gate: GateTask,
    tasks: Mapping[TaskName, Task],
    undecided_tasks: Sequence[TaskName],
) -> tuple[Route, GateValues]:
    """The route of an image whose header gave ``route`` and in which ``gate`` saw ``seen``, and the gate's values
    with what the node did. ``tasks``: the configured tasks, whose ``body_part`` says what each reads. The gate
    judges only the tasks of the body parts it tells apart (``gate.body_parts``): the others run as routed."""
    known = {part for part in gate.body_parts.values() if part}
    judged = {name for name, task in tasks.items() if task.body_part in known}
    shows = {name for name, task in tasks.items() if seen.body_part and task.body_part == seen.body_part}
    what = f"the image shows {'a ' + seen.seen if shows else 'no body part a task reads'} ({seen.confidence:.0%})"
    if not route.by_tags:
        chosen = tuple(name for name in tasks if name in undecided_tasks and (name in shows or name not in judged))
        reason = f"{route.reason}; {what}"
        return Route(chosen, reason), seen.model_copy(update={"tagged_tasks": None, "tasks_run": list(chosen)})
    tagged = {"tagged_tasks": list(route.tasks)}
    if not any(name in judged for name in route.tasks) or any(name in shows for name in route.tasks):
        return route, seen.model_copy(update=tagged | {"tasks_run": list(route.tasks), "disagreement": False})
    settings: GateSettings = gate.settings
    if seen.confidence < settings.min_confidence:
        followed, why = "tags", f", below min_confidence {settings.min_confidence:.0%}: followed the tags"
    else:
        followed = "image" if settings.policy == "trust_image" else "tags"
        why = f": followed the {followed}"
    chosen = route.tasks
    if followed == "image":  # the tasks of what it shows, and those of the tags that it cannot judge
        chosen = tuple(name for name in tasks if name in shows or (name in route.tasks and name not in judged))
    values = seen.model_copy(update=tagged | {"tasks_run": list(chosen), "disagreement": True, "followed": followed})
    return Route(chosen, f"{route.reason}, but {what}{why}", by_tags=True), values


def _sop_class_name(ds: Dataset) -> str:
    sop_class = ds.get("SOPClassUID")
    return getattr(sop_class, "name", None) or str(sop_class or "no SOP Class UID")
