"""``labels.csv`` of a phantom set: the ground truth of each file, read by training and evaluation."""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class PhantomLabel:
    """One row of ``labels.csv``: the ground truth of one file. Empty fields do not apply to the task."""

    file: str
    task: str
    sex: str
    chronological_age_months: float
    bone_age_months: float | None
    foot_class: str | None
    hallux_valgus_angle_deg: float | None
    intermetatarsal_angle_deg: float | None
    finding_x0: int | None
    finding_y0: int | None
    finding_x1: int | None
    finding_y1: int | None
    photometric_interpretation: str
    patient_id: str

    @property
    def finding_box(self) -> tuple[int, int, int, int] | None:
        if self.finding_x0 is None:
            return None
        return (self.finding_x0, self.finding_y0, self.finding_x1, self.finding_y1)


LABEL_COLUMNS = tuple(field.name for field in fields(PhantomLabel))


def read_labels(path: Path) -> list[PhantomLabel]:
    """Read ``labels.csv`` back into :class:`PhantomLabel` rows with their types."""
    types = {field.name: field.type for field in fields(PhantomLabel)}
    rows = []
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            values = {}
            for key, text in row.items():
                kind = types[key]
                if text == "":
                    values[key] = None
                elif "float" in kind:
                    values[key] = float(text)
                elif "int" in kind:
                    values[key] = int(text)
                else:
                    values[key] = text
            rows.append(PhantomLabel(**values))
    return rows
