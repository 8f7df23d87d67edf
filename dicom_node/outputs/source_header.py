"""What the node's objects take from the source's header, read as highdicom reads it."""

from __future__ import annotations

from collections.abc import Iterable

import pydicom
from pydicom.multival import MultiValue

# Type 2 attributes of the Patient and General Study modules that highdicom copies from a source (PS3.3 C.7.1.1,
# C.7.2.1): present in every object, empty where the source lacks them
PATIENT_AND_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)


def with_patient_and_study(header: pydicom.Dataset) -> pydicom.Dataset:
    """``header`` with each of :data:`PATIENT_AND_STUDY_KEYWORDS` it lacks present and empty (changed in place)."""
    for keyword in PATIENT_AND_STUDY_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def copied(source: pydicom.Dataset, keywords: Iterable[str]) -> pydicom.Dataset:
    """A new dataset of the ``keywords`` the source has (its other elements, Pixel Data first, left unread)."""
    header = pydicom.Dataset()
    for keyword in keywords:
        if keyword in source:
            header[keyword] = source[keyword]
    return header


def series_laterality(source: pydicom.Dataset) -> str | None:
    """The laterality of what the node writes about ``source`` (General Series, C.7.3.1): the source's series'
    or image's, L or R; None for none or another value (an image's may also be B(oth) or U(npaired))."""
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    return laterality if laterality in ("L", "R") else None


def pair(value: object) -> list | None:
    """A two-valued attribute's values; None for one absent, empty or of another multiplicity."""
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else []
    return values if len(values) == 2 else None
