"""The coded concepts of the node's structured report (PS3.16 TID 1500), each from a standard coding scheme
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

from dicom_node.outputs.identity import MANUFACTURER
from inference.ages import REFERENCE_NAME

PRIVATE_SCHEME = "99DCMNODE"
PRIVATE_CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="dicom-node private codes",
    responsible_organization=MANUFACTURER,
)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


# TID 1500 row 5 "Procedure reported", from CID 100 Quantitative Diagnostic Imaging Procedures. The more precise
# (43468-8, LN, "XR unspecified body region") is in pydicom's CID 100 but not in PixelMed's, which rejects it.
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")

# Finding sites (TID 1501 row 6; CID 4031 Common Anatomic Regions) and their laterality (row 7; CID 244)
HAND = CodedConcept("85562004", "SCT", "Hand")
FOOT = CodedConcept("56459004", "SCT", "Foot")
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

# The foot classes of the hallux valgus model, each the finding of its own measurement group (TID 1501 row 3b).
# Normal is "No abnormality", a finding, not the qualifier "Normal". A foot ulcer is "Ulcer" at the finding site
# Foot. No code of pes planus or of hallux valgus could be verified here (SNOMED CT 202855006, which some public
# code labels hallux valgus, is lateral epicondylitis): they stay private.
FOOT_FINDINGS: dict[str, CodedConcept] = {
    "Normal": CodedConcept("111286", "DCM", "No abnormality"),
    "Flatfoot": _private("PES-PLANUS", "Pes planus"),
    "Foot Ulcer": CodedConcept("56208002", "SCT", "Ulcer"),
    "Hallux Valgus": _private("HALLUX-VALGUS", "Hallux valgus"),
}
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
HALLUX_VALGUS_ANGLE = _private("HV-ANGLE", "Hallux valgus angle")
PRESENT = codes.SCT.Present  # CID 240 Normal-Abnormal / Present-Absent
ABSENT = codes.SCT.Absent

# Bone age. LOINC has a code of it, but none that the dictionaries here confirm: it stays private.
BONE_AGE = _private("BONE-AGE", "Bone age")
SUBJECT_AGE = CodedConcept("121033", "DCM", "Subject Age")
# TID 310 properties of the bone age: the model's uncertainty (CID 225) and its normality (CID 222, written by
# highdicom under (121402, DCM, "Normality"))
MEASUREMENT_UNCERTAINTY = CodedConcept("371884006", "SCT", "+/-, range of measurement uncertainty")
ASSESSMENTS: dict[str, CodedConcept] = {  # the node's assessments of a bone age, as CID 222 Normality Codes
    "advanced": CodedConcept("371879000", "SCT", "Abnormally high"),
    "delayed": CodedConcept("371880002", "SCT", "Abnormally low"),
    "within range": CodedConcept("17621005", "SCT", "Normal"),
}
# TID 311: the reference population at the patient's chronological age (CID 226, CID 227) and its authority
MEAN_OF_POPULATION = CodedConcept("373098007", "SCT", "Mean Value of population")
STANDARD_DEVIATION_OF_POPULATION = CodedConcept("121414", "DCM", "Standard deviation of population")
Z_SCORE_OF_MEASUREMENT = CodedConcept("121416", "DCM", "Z-Score of measurement")
POPULATION_DESCRIPTION = CodedConcept("121405", "DCM", "Population description")
REFERENCE_AUTHORITY = CodedConcept("121406", "DCM", "Reference Authority")
REFERENCE_AUTHORITIES: dict[str, CodedConcept] = {
    REFERENCE_NAME: _private("GREULICH-PYLE-1959", "Greulich and Pyle, Radiographic Atlas, 2nd ed. 1959"),
}

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
            if code.value == value:
                return CodedConcept(code.value, code.scheme_designator, code.meaning)
    return CodedConcept("OT", "DCM", "Other")
