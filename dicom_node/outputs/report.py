"""The node's results for one received X-ray as a structured report: a Comprehensive 3D SR (PS3.3 A.35.13)
whose content is a TID 1500 Measurement Report (PS3.16).

The content tree, top to bottom:

- the device observer context (TID 1002 / TID 1004): the node as the observer that made the report;
- "Procedure reported": Imaging procedure (CID 100);
- the image library (TID 1600): the source image;
- one Measurement Group (TID 1501) per result, each with its tracking identifier, finding site, the algorithm
  that computed it (TID 4019), the source image and the node's Secondary Capture images as illustrations:

  - hallux valgus: the predicted class as "Finding", the probability of each class, the hallux valgus angle
    where the model gives one, and a qualitative evaluation "Hallux valgus" present or absent (the probability
    of hallux valgus against the threshold, named among the algorithm parameters);
  - bone age, one group per sex model: the bone age in months and its standard deviation (a second "Bone age"
    with the derivation "Standard Deviation"), the chronological age where known, the sex of the model; where
    the node compared bone age with chronological age, the difference and, where the reference has an SD at
    that age, the reference SD, the Z-score and the normality.

Properties of a measurement (TID 310, TID 311) would fit the SD and the Z-score better, but PixelMed's
DicomSRValidator rejects every HAS PROPERTIES child of a TID 300 measurement; they are measurements of the
group instead.

The report is UNVERIFIED, COMPLETE and PRELIMINARY: no person has read it. Patient and study come from the
source image; the source and the Secondary Capture images are its evidence (Current Requested Procedure
Evidence Sequence). Each model is named as Contributing Equipment too (PS3.3 C.12.1.1.5), with the demo
disclaimer where it applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from copy import copy
from dataclasses import dataclass

import highdicom
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes as dicom_codes

from dicom_node.models import InferenceResult
from dicom_node.outputs import codes
from dicom_node.outputs.identity import AlgorithmIdentity, NodeIdentity
from dicom_node.outputs.uids import InstallationUids

SERIES_DESCRIPTION = "AI results (structured report)"
HALLUX_VALGUS_KEYS = ("probabilities", "prediction", "hallux_valgus_detected", "threshold")
BONE_AGE_KEYS = ("sex", "age_months", "sigma_months")
COMPARISON_KEYS = ("difference_months",)
ASSESSMENT_KEYS = ("reference_sd_months", "z_score", "assessment", "reference", "flag_sds")
# Type 2 attributes of the Patient and General Study modules that highdicom copies from the source
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
# TID 1603 Image Library Entry Descriptors for Projection Radiography: what highdicom reads from the source
PROJECTION_DESCRIPTOR_KEYWORDS = ("Rows", "Columns", "PatientOrientation", "ImagerPixelSpacing")


def build_measurement_report(
    source: pydicom.Dataset,
    results: Sequence[InferenceResult],
    secondary_captures: Mapping[tuple[str, str], pydicom.Dataset],
    node: NodeIdentity,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """The TID 1500 Measurement Report of ``results``, all computed from ``source``, in a new series of the
    source's study.

    ``source`` needs its header only. ``secondary_captures`` are the images the node wrote for these results,
    by the (task, output) of the result each shows; a measurement group references its own. Raises ValueError
    for no results, a result of an unknown task or one that lacks a value the report needs.
    """
    if not results:
        raise ValueError("a measurement report needs at least one result")
    groups = [
        measurement_group(result, source, node.uids, secondary_captures.get((result.task, result.output)))
        for result in results
    ]
    content = MeasurementReport(
        observation_context=device_observation_context(node),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=[source] if _has_library_descriptors(source) else None,
    )
    return Comprehensive3DSR(
        evidence=[_patient_and_study(source), *secondary_captures.values()],
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=node.manufacturer,
        manufacturer_model_name=node.model_name,
        software_versions=node.software_version,
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        coding_schemes=[codes.PRIVATE_CODING_SCHEME],
        contributing_equipment=[contributing_equipment(algorithm, node) for algorithm in _algorithms(results)],
    )


def device_observation_context(node: NodeIdentity) -> ObservationContext:
    """TID 1001 with a device observer (TID 1002, TID 1004): the node, by its device UID and AE title."""
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=dicom_codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=node.device_uid,
                name=node.ae_title,
                manufacturer_name=node.manufacturer,
                model_name=node.model_name,
            ),
        )
    )


def measurement_group(
    result: InferenceResult,
    source: pydicom.Dataset,
    uids: InstallationUids,
    secondary_capture: pydicom.Dataset | None = None,
) -> MeasurementsAndQualitativeEvaluations:
    """The TID 1501 Measurement Group of one result, by its task, with the Secondary Capture that shows it."""
    tracking_uid = uids.derived(source.SOPInstanceUID, "tracking", result.task, result.output)
    if result.task == "hallux_valgus":
        group = hallux_valgus_group(result, source, tracking_uid)
    elif result.task == "bone_age":
        group = bone_age_group(result, source, tracking_uid)
    else:
        raise ValueError(f"result {result.task!r}/{result.output!r}: unknown task, expected hallux_valgus or bone_age")
    if secondary_capture is not None:
        _add_illustration(group, secondary_capture)
    return group


def hallux_valgus_group(
    result: InferenceResult, source: pydicom.Dataset, tracking_uid: str
) -> MeasurementsAndQualitativeEvaluations:
    """The foot classification: the predicted class as the finding, each class's probability, the hallux valgus
    angle when the model gives one, and whether hallux valgus is flagged (its probability at the threshold)."""
    values = _required_values(result, HALLUX_VALGUS_KEYS)
    probabilities, prediction = values["probabilities"], values["prediction"]
    if set(probabilities) != set(codes.FOOT_FINDINGS) or prediction not in codes.FOOT_FINDINGS:
        raise ValueError(
            f"result hallux_valgus/{result.output}: the classes and the prediction must be among "
            f"{sorted(codes.FOOT_FINDINGS)}, got {sorted(probabilities)} and {prediction!r}"
        )
    measurements = [
        Measurement(name=codes.FOOT_CLASS_PROBABILITIES[name], value=probabilities[name], unit=codes.NO_UNITS)
        for name in codes.FOOT_FINDINGS
    ]
    if values.get("hallux_valgus_angle_deg") is not None:
        measurements.append(
            Measurement(name=codes.HALLUX_VALGUS_ANGLE, value=values["hallux_valgus_angle_deg"], unit=codes.DEGREES)
        )
    flagged = codes.PRESENT if values["hallux_valgus_detected"] else codes.ABSENT
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier="hallux valgus classification"),
        finding_type=codes.FOOT_FINDINGS[prediction],
        finding_sites=[FindingSite(codes.FOOT)],
        algorithm_id=algorithm_identification(result, f"hallux valgus threshold {values['threshold']}"),
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(codes.HALLUX_VALGUS, flagged)],
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )


def bone_age_group(
    result: InferenceResult, source: pydicom.Dataset, tracking_uid: str
) -> MeasurementsAndQualitativeEvaluations:
    """The bone age read by one sex model and its standard deviation; the chronological age where known; and,
    where the node compared the two, the difference, the reference SD, the Z-score and the normality."""
    values = _required_values(result, BONE_AGE_KEYS)
    if values["sex"] not in codes.SEXES:
        raise ValueError(f"result bone_age/{result.output}: sex must be 'M' or 'F', got {values['sex']!r}")
    measurements = [
        Measurement(name=codes.BONE_AGE, value=values["age_months"], unit=codes.MONTHS),
        Measurement(
            name=codes.BONE_AGE,
            value=values["sigma_months"],
            unit=codes.MONTHS,
            derivation=codes.STANDARD_DEVIATION,
        ),
    ]
    if values.get("chronological_age_months") is not None:
        measurements.append(Measurement(name=codes.AGE, value=values["chronological_age_months"], unit=codes.MONTHS))
    evaluations = [QualitativeEvaluation(codes.BONE_AGE_MODEL_SEX, codes.SEXES[values["sex"]])]
    parameters = []
    if "difference_months" in values:
        comparison = comparison_with_age(result)
        measurements += comparison.measurements
        evaluations += comparison.evaluations
        parameters = comparison.parameters
    model = "male" if values["sex"] == "M" else "female"
    label = f"bone age, {model} model" + (" (the patient's sex)" if result.is_primary else "")
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=label),
        finding_sites=[FindingSite(codes.HAND)],
        algorithm_id=algorithm_identification(result, *parameters),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )


@dataclass(frozen=True)
class AgeComparison:
    """Bone age against chronological age, as TID 1501 content and the algorithm parameters it used."""

    measurements: list[Measurement]
    evaluations: list[QualitativeEvaluation]
    parameters: list[str]


def comparison_with_age(result: InferenceResult) -> AgeComparison:
    """The difference of bone age and chronological age; where the reference gives an SD at this age, the SD,
    the Z-score (CID 226, CID 227) and the node's assessment as the normality (CID 222)."""
    values = _required_values(result, COMPARISON_KEYS)
    measurements = [Measurement(name=codes.BONE_AGE_MINUS_AGE, value=values["difference_months"], unit=codes.MONTHS)]
    if values.get("z_score") is None:
        return AgeComparison(measurements, [], [])
    values = _required_values(result, ASSESSMENT_KEYS)
    if values["assessment"] not in codes.ASSESSMENTS:
        raise ValueError(
            f"result bone_age/{result.output}: assessment {values['assessment']!r} is not one of "
            f"{sorted(codes.ASSESSMENTS)}"
        )
    measurements += [
        Measurement(
            name=codes.STANDARD_DEVIATION_OF_POPULATION, value=values["reference_sd_months"], unit=codes.MONTHS
        ),
        Measurement(name=codes.Z_SCORE_OF_MEASUREMENT, value=values["z_score"], unit=codes.NO_UNITS),
    ]
    evaluations = [QualitativeEvaluation(codes.NORMALITY, codes.ASSESSMENTS[values["assessment"]])]
    parameters = [f"reference {values['reference']}", f"flagged beyond {values['flag_sds']} reference SD"]
    return AgeComparison(measurements, evaluations, parameters)


def algorithm_identification(result: InferenceResult, *parameters: str) -> AlgorithmIdentification:
    """TID 4019: the model's name and version; its weights digest, any setting that shaped the result and,
    for a demo model, its disclaimer as parameters."""
    algorithm = _algorithm(result)
    disclaimer = [f"demo model: {algorithm.disclaimer}"] if algorithm.demo else []
    return AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"weights {algorithm.weights_digest}", *parameters, *disclaimer],
    )


def contributing_equipment(algorithm: AlgorithmIdentity, node: NodeIdentity) -> highdicom.ContributingEquipment:
    """The model as processing equipment (PS3.3 C.12.1.1.5), with the demo disclaimer where it applies."""
    return highdicom.ContributingEquipment(
        manufacturer=node.manufacturer,
        purpose_of_reference=dicom_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contribution_description=algorithm.disclaimer,
    )


def _algorithm(result: InferenceResult) -> AlgorithmIdentity:
    return AlgorithmIdentity(result.model_name, result.model_version, result.weights_digest, result.demo_model)


def _algorithms(results: Sequence[InferenceResult]) -> list[AlgorithmIdentity]:
    """The distinct models behind ``results``, in order of first use."""
    return list(dict.fromkeys(_algorithm(result) for result in results))


def _required_values(result: InferenceResult, keys: Sequence[str]) -> dict:
    values = result.values or {}
    missing = [key for key in keys if values.get(key) is None]
    if missing:
        raise ValueError(f"result {result.task}/{result.output} lacks the values {', '.join(missing)}")
    return values


def _add_illustration(group: MeasurementsAndQualitativeEvaluations, image: pydicom.Dataset) -> None:
    """Reference the node's Secondary Capture image of the group's result (TID 1501 row 10b)."""
    group[0].ContentSequence.append(
        ImageContentItem(
            name=codes.ILLUSTRATION_OF_FINDING,
            referenced_sop_class_uid=image.SOPClassUID,
            referenced_sop_instance_uid=image.SOPInstanceUID,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )


def _patient_and_study(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source's header with the Type 2 patient and study attributes that highdicom reads present, empty
    where the source lacks them (PS3.3 C.7.1.1, C.7.2.1)."""
    header = copy(source)
    for keyword in PATIENT_AND_STUDY_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _has_library_descriptors(source: pydicom.Dataset) -> bool:
    """Whether the source has what its image library entry must describe (TID 1602, TID 1603); a projection
    image without them is left out of the library and stays referenced in each group and as evidence."""
    return all(keyword in source for keyword in PROJECTION_DESCRIPTOR_KEYWORDS)
