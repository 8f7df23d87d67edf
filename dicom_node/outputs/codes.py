"""The coded concepts of the node's structured report (PS3.16 TID 1500) that every task shares (each task
declares its own findings and measurements in its module), each from a standard coding scheme
where the dictionaries that ship with the node confirm it (pydicom's code dictionary, PixelMed's context
groups: ``tests/test_codes.py`` checks every one), else from the node's private scheme ``99DCMNODE``, declared
in the report's Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2; designators beginning with "99" are
private, PS3.16 section 8.2). ``docs/conformance.md`` lists the private codes and why each is private.

Standard codes: DCM (PS3.16 Annex D), SCT (SNOMED CT), LN (LOINC), UCUM units.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.outputs.identity import MANUFACTURER

PRIVATE_SCHEME = "99DCMNODE"
PRIVATE_CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="dicom-node private codes",
    responsible_organization=MANUFACTURER,
)


def private(value: str, meaning: str) -> CodedConcept:
    """A code of the node's private scheme; each must have its row in docs/conformance.md, section 8.3.2."""
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


# TID 1500 row 5 "Procedure reported", from CID 100 Quantitative Diagnostic Imaging Procedures. The more precise
# (43468-8, LN, "XR unspecified body region") is in pydicom's CID 100 but not in PixelMed's, which rejects it.
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")

# The laterality of a finding site (TID 1501 row 7; CID 244)
LATERALITIES: dict[str, CodedConcept] = {
    "R": CodedConcept("24028007", "SCT", "Right"),
    "L": CodedConcept("7771000", "SCT", "Left"),
}

# Units (UCUM)
MONTHS = CodedConcept("mo", "UCUM", "month")
DEGREES = CodedConcept("deg", "UCUM", "degree")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
PIXELS = CodedConcept("{pixels}", "UCUM", "pixels")
MILLIMETRES = CodedConcept("mm", "UCUM", "millimeter")

# Shared by the tasks' measurement groups: a class's probability, and a finding present or absent (CID 240)
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent

# The node's Secondary Capture images and Parametric Maps, referenced in each measurement group (TID 1501 row 10b)
ILLUSTRATION_OF_FINDING = CodedConcept("125201", "DCM", "Illustration of Finding")

# TID 1601, TID 1602, TID 1603: the image library entry and its descriptors
SOURCE = CodedConcept("260753009", "SCT", "Source")
MODALITY = CodedConcept("121139", "DCM", "Modality")
IMAGE_LATERALITY = CodedConcept("111027", "DCM", "Image Laterality")
STUDY_DATE = CodedConcept("111060", "DCM", "Study Date")
PIXEL_DATA_ROWS = CodedConcept("110910", "DCM", "Pixel Data Rows")
PIXEL_DATA_COLUMNS = CodedConcept("110911", "DCM", "Pixel Data Columns")
PATIENT_ORIENTATION_ROW = CodedConcept("111044", "DCM", "Patient Orientation Row")
PATIENT_ORIENTATION_COLUMN = CodedConcept("111043", "DCM", "Patient Orientation Column")
HORIZONTAL_PIXEL_SPACING = CodedConcept("111026", "DCM", "Horizontal Pixel Spacing")
VERTICAL_PIXEL_SPACING = CodedConcept("111066", "DCM", "Vertical Pixel Spacing")


def modality(value: str | None) -> CodedConcept:
    """The code of a source's Modality: from CID 29 Acquisition Modality (TID 1602 row 1), else from CID 33
    Modality (a Secondary Capture's OT, "Other"; CID 29 is extensible), else Other."""
    for group in (codes.cid29, codes.cid33):
        for keyword in dir(group):
            code = getattr(group, keyword)
            if isinstance(code, Code) and code.value == value:  # the group's codes, not its methods
                return CodedConcept(code.value, code.scheme_designator, code.meaning)
    return CodedConcept("OT", "DCM", "Other")
