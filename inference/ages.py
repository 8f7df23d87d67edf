"""Chronological age from DICOM attributes, and bone age compared with it against a published reference.

Chronological age comes from PatientBirthDate and StudyDate (DA, ``YYYYMMDD``, PS3.5 section 6.2), else from
PatientAge (AS, ``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``). A month is 30.4375 days, a week 7 days.

The reference: standard deviations of skeletal age by chronological age and sex from the Brush Foundation
Study, as published with the Greulich-Pyle atlas (Greulich WW, Pyle SI. Radiographic Atlas of Skeletal
Development of the Hand and Wrist, 2nd ed. Stanford University Press, 1959). The values were transcribed from
two independent public code bases that agree on every one of them (GitHub lolzballs/mie429
``app/growth_chart.py`` at commit 11ac2193, "Brush Foundation Study"; and a radiology bone-age report app,
"the Brush Foundation data"); they were not checked against a printed atlas. Between the tabulated ages the
SD is interpolated linearly, a choice of this node; outside the table (below 3 months, above 17 years for
boys and 16 years for girls) no Z-score is given.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

DAYS_PER_MONTH = 30.4375
Sex = Literal["M", "F"]

# chronological age (months) -> SD of skeletal age (months), Brush Foundation via Greulich & Pyle (1959)
REFERENCE_AGES_MONTHS = (
    3,
    6,
    9,
    12,
    18,
    24,
    30,
    36,
    42,
    48,
    54,
    60,
    72,
    84,
    96,
    108,
    120,
    132,
    144,
    156,
    168,
    180,
    192,
    204,
)
REFERENCE_SD_MONTHS: dict[Sex, tuple[float, ...]] = {
    "M": (
        0.69, 1.13, 1.43, 1.97, 3.52, 3.92, 4.52, 5.08, 5.40, 6.66, 8.36, 8.79,
        9.17, 8.91, 9.10, 9.00, 9.79, 10.09, 10.38, 10.44, 10.72, 11.32, 12.86, 13.05,
    ),
    "F": (
        0.72, 1.16, 1.36, 1.77, 3.49, 4.64, 5.37, 5.97, 7.48, 8.98, 10.73, 11.65,
        10.23, 9.64, 10.23, 10.74, 11.73, 11.94, 10.24, 10.67, 11.30, 9.23, 7.31,
    ),
}  # fmt: skip
REFERENCE_NAME = "Greulich & Pyle 1959 (Brush Foundation SDs)"

_AGE_STRING = re.compile(r"(\d{3})([DWMY])")
_MONTHS_PER_UNIT = {"D": 1 / DAYS_PER_MONTH, "W": 7 / DAYS_PER_MONTH, "M": 1.0, "Y": 12.0}


@dataclass(frozen=True)
class ChronologicalAge:
    months: float | None
    source: str  # how it was found, or why it could not be


def chronological_age(birth_date: str | None, study_date: str | None, patient_age: str | None) -> ChronologicalAge:
    """Age at the study from the DICOM values (strings as stored); ``months`` is None with the reason when
    neither the dates nor PatientAge give one."""
    birth, study = _date(birth_date), _date(study_date)
    problems = []
    if birth and study:
        if study >= birth:
            return ChronologicalAge((study - birth).days / DAYS_PER_MONTH, "PatientBirthDate and StudyDate")
        problems.append("StudyDate is before PatientBirthDate")
    else:
        for name, text, parsed in (("PatientBirthDate", birth_date, birth), ("StudyDate", study_date, study)):
            problems.append(f"{name} is {'missing' if not text else 'not a valid date'}" if not parsed else "")
    match = _AGE_STRING.fullmatch((patient_age or "").strip())
    if match:
        return ChronologicalAge(int(match[1]) * _MONTHS_PER_UNIT[match[2]], "PatientAge")
    problems.append("PatientAge is " + ("missing" if not patient_age else "not a valid age string"))
    return ChronologicalAge(None, "; ".join(problem for problem in problems if problem))


def _date(text: str | None) -> dt.date | None:
    try:
        return dt.datetime.strptime((text or "").strip(), "%Y%m%d").date()
    except ValueError:
        return None


def reference_sd_months(chronological_months: float, sex: Sex) -> float | None:
    """The reference SD of bone age at this chronological age and sex, or None outside the table."""
    sds = REFERENCE_SD_MONTHS[sex]
    ages = REFERENCE_AGES_MONTHS[: len(sds)]
    if not ages[0] <= chronological_months <= ages[-1]:
        return None
    return float(np.interp(chronological_months, ages, sds))


@dataclass(frozen=True)
class AgeComparison:
    """Bone age against chronological age: the difference, its Z-score and the reading of it."""

    difference_months: float  # bone age - chronological age
    reference_sd_months: float | None
    z_score: float | None
    assessment: Literal["advanced", "delayed", "within range"] | None  # None without a Z-score


def compare_with_chronological_age(
    bone_age_months: float, chronological_months: float, sex: Sex, flag_sds: float
) -> AgeComparison:
    """Flag a bone age more than ``flag_sds`` reference SDs from the chronological age."""
    difference = bone_age_months - chronological_months
    sd = reference_sd_months(chronological_months, sex)
    if sd is None:
        return AgeComparison(difference, None, None, None)
    z = difference / sd
    assessment = "advanced" if z > flag_sds else "delayed" if z < -flag_sds else "within range"
    return AgeComparison(difference, sd, z, assessment)
