"""The coded concepts of the node's structured report (PS3.16 TID 1500), each from a standard coding scheme
where one was found, else from the node's private scheme ``99DCMNODE``, declared in the report's Coding Scheme
Identification Sequence (PS3.3 C.12.1.1.2; designators beginning with "99" are private, PS3.16 section 8.2).

Standard codes: DCM (PS3.16 Annex D), SCT (SNOMED CT), LN (LOINC), UCUM units.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from dicom_node.outputs.identity import MANUFACTURER

PRIVATE_SCHEME = "99DCMNODE"
PRIVATE_CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="dicom-node private codes",
    responsible_organization=MANUFACTURER,
)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


# TID 1500 "Procedure reported", from CID 100 Quantitative Diagnostic Imaging Procedures. The more precise
# LOINC 43468-8 "XR unspecified body region" joined CID 100 after the edition PixelMed's validator checks against.
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")

# Finding sites (TID 1501 row 6; CID 4031 Common Anatomic Regions)
HAND = CodedConcept("85562004", "SCT", "Hand")
FOOT = CodedConcept("56459004", "SCT", "Foot")

# Units (UCUM)
MONTHS = CodedConcept("mo", "UCUM", "month")
DEGREES = CodedConcept("deg", "UCUM", "degree")
NO_UNITS = CodedConcept("1", "UCUM", "no units")

# The foot classes of the hallux valgus model: the finding (TID 1501 row 3b "Finding") and its probability.
# SNOMED CT 202855006 is "Lateral epicondylitis", not hallux valgus: no SNOMED CT code of hallux valgus could be
# verified, so the node's own code names it.
HALLUX_VALGUS = _private("HALLUX-VALGUS", "Hallux valgus")
FOOT_FINDINGS: dict[str, CodedConcept] = {
    "Normal": CodedConcept("17621005", "SCT", "Normal"),
    "Flatfoot": CodedConcept("53226007", "SCT", "Pes planus"),
    "Foot Ulcer": CodedConcept("95345008", "SCT", "Ulcer of foot"),
    "Hallux Valgus": HALLUX_VALGUS,
}
FOOT_CLASS_PROBABILITIES: dict[str, CodedConcept] = {
    "Normal": _private("P-NORMAL", "Probability of a normal foot"),
    "Flatfoot": _private("P-FLATFOOT", "Probability of pes planus"),
    "Foot Ulcer": _private("P-FOOT-ULCER", "Probability of ulcer of foot"),
    "Hallux Valgus": _private("P-HALLUX-VALGUS", "Probability of hallux valgus"),
}
HALLUX_VALGUS_ANGLE = _private("HV-ANGLE", "Hallux valgus angle")
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent

# Bone age (LOINC 85151-9 "XR Bone age": the bone age in time units, by any X-ray method)
BONE_AGE = CodedConcept("85151-9", "LN", "Bone age")
AGE = CodedConcept("30525-0", "LN", "Age")
BONE_AGE_MINUS_AGE = _private("BA-MINUS-AGE", "Bone age minus chronological age")
BONE_AGE_MODEL_SEX = _private("BA-MODEL-SEX", "Sex of the bone age model")
SEXES: dict[str, CodedConcept] = {"M": codes.DCM.Male, "F": codes.DCM.Female}  # CID 7455 Sex

# The bone age's uncertainty: a TID 300 "Derivation" (CID 7464 General Region of Interest Measurement Modifiers)
STANDARD_DEVIATION = CodedConcept("386136009", "SCT", "Standard Deviation")
# The bone age against the reference population (CID 226, CID 227) and its normality (CID 222)
STANDARD_DEVIATION_OF_POPULATION = CodedConcept("121414", "DCM", "Standard deviation of population")
Z_SCORE_OF_MEASUREMENT = CodedConcept("121416", "DCM", "Z-Score of measurement")
NORMALITY = CodedConcept("121402", "DCM", "Normality")
ASSESSMENTS: dict[str, CodedConcept] = {  # the node's assessments of a bone age, as CID 222 Normality Codes
    "advanced": CodedConcept("371879000", "SCT", "Abnormally high"),
    "delayed": CodedConcept("371880002", "SCT", "Abnormally low"),
    "within range": CodedConcept("17621005", "SCT", "Normal"),
}

# The node's Secondary Capture images, referenced in each measurement group (TID 1501 row 10b)
ILLUSTRATION_OF_FINDING = CodedConcept("125201", "DCM", "Illustration of Finding")
