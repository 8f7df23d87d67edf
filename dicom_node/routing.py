"""Which tasks run on a stored instance, decided from its header before any pixel is decoded.

Objects that carry no image for the models (structured reports, presentation states, key object selections)
and derived images (among them the node's own Secondary Captures coming back from the PACS) are skipped with
a reason that the job records. Otherwise the first configured rule whose pattern matches one of its
attributes decides; an instance that no rule decides runs ``undecided_tasks`` (by default every task).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.config import InferenceSettings, TaskName


@dataclass(frozen=True)
class Route:
    tasks: tuple[TaskName, ...]
    reason: str  # why these tasks, or why none; free of patient data


def route(ds: Dataset, settings: InferenceSettings) -> Route:
    """The tasks for ``ds`` (a header is enough) and the reason."""
    if "PixelData" not in ds:
        return Route((), f"skipped: no image ({_sop_class_name(ds)})")
    image_type = ds.get("ImageType") or []
    image_type = [str(value).upper() for value in ([image_type] if isinstance(image_type, str) else image_type)]
    if settings.skip_derived and image_type[:1] == ["DERIVED"]:
        return Route((), "skipped: derived image (ImageType " + "\\".join(image_type) + f", {_sop_class_name(ds)})")
    for number, rule in enumerate(settings.rules, start=1):
        pattern = re.compile(rule.pattern, re.IGNORECASE)
        for attribute in rule.attributes:
            value = str(ds.get(attribute, "") or "")
            if value and pattern.search(value):
                return Route(tuple(rule.tasks), f"rule {number} matched {attribute}")
    return Route(tuple(settings.undecided_tasks), "no rule matched")


def _sop_class_name(ds: Dataset) -> str:
    sop_class = ds.get("SOPClassUID")
    return getattr(sop_class, "name", None) or str(sop_class or "no SOP Class UID")
