"""The node's results for one received X-ray as a structured report: a Comprehensive 3D SR (PS3.3 A.35.13)
whose content is a TID 1500 Measurement Report (PS3.16).

The content tree, top to bottom:

- the device observer context (TID 1002 / TID 1004): the node as the observer that made the report;
- "Procedure reported": Imaging procedure (CID 100);
- the image library (TID 1600): the source image, with each TID 1602 / TID 1603 descriptor the source has;
- Measurement Groups (TID 1501), each with its tracking identifier, finding site and laterality, the algorithm
  that computed it (TID 4019), the source image, and the node's Secondary Capture and Parametric Map images of
  that result as illustrations:

  - the foot: one group per class of the model, its finding the class, its "Probability", and the class
    present or absent by the one rule of :func:`inference.predict.reported_foot_findings`; the hallux valgus
    group also has the hallux valgus angle where the model gives one;
  - the hand: one group per sex model (the model's sex is an algorithm parameter, not a finding): the bone
    age in months with its properties (TID 310): the model's sigma as the range of measurement uncertainty
    (CID 225) and, where the node compared it with the chronological age against the reference's SD at that
    age, the reference population (TID 311: its mean, SD and the Z-score, its description and coded
    authority) and the normality (CID 222); the chronological age as "Subject Age" where known.

Built by hand where highdicom cannot: the uncertainty in months (highdicom's ``MeasurementProperties`` writes
its uncertainties with the unit "1"), the population description and the coded reference authority (highdicom
writes a code meaning PixelMed does not know, and the authority as text only) and the image
library entry of a source without every projection descriptor (highdicom's needs them all).

The report is UNVERIFIED, COMPLETE and PRELIMINARY: no person has read it. Patient and study come from the
source image; the source and the illustrations are its evidence (Current Requested Procedure Evidence
Sequence). A report made again for a replaced image names the reports it supersedes (Predecessor Documents
Sequence). Each model is named as Contributing Equipment too (PS3.3 C.12.1.1.5), with the demo disclaimer
where it applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from copy import copy

import highdicom
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    DateContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageContentItem,
    Measurement,
    MeasurementProperties,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    MeasurementStatisticalProperties,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes as dicom_codes

from dicom_node.models import InferenceResult
from dicom_node.outputs import codes
from dicom_node.outputs.identity import AlgorithmIdentity, NodeIdentity
from dicom_node.outputs.source_header import pair, series_laterality, with_patient_and_study
from dicom_node.outputs.uids import InstallationUids
from inference.model_card import HALLUX_VALGUS_CLASSES
from inference.predict import reported_foot_findings

SERIES_DESCRIPTION = "AI results (structured report)"
HALLUX_VALGUS_KEYS = ("probabilities", "prediction", "threshold")
BONE_AGE_KEYS = ("sex", "age_months", "sigma_months")
ASSESSMENT_KEYS = ("chronological_age_months", "reference_sd_months", "z_score", "assessment", "reference", "flag_sds")
SEXES = {"M": "male", "F": "female"}
IMAGING_MEASUREMENTS = "126010"  # TID 1500 row 8, the container the image library goes before

Illustrations = Mapping[tuple[str, str], Sequence[pydicom.Dataset]]


def build_measurement_report(
    source: pydicom.Dataset,
    results: Sequence[InferenceResult],
    illustrations: Illustrations,
    node: NodeIdentity,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int = 1,
    predecessors: Sequence[pydicom.Dataset] = (),
) -> Comprehensive3DSR:
    """The TID 1500 Measurement Report of ``results``, all computed from ``source``, in a new series of the
    source's study.

    ``source`` needs its header only. ``illustrations`` are the images the node wrote for these results (its
    Secondary Capture and Parametric Map images), by the (task, output) of the result they show. ``predecessors``
    are the headers of the reports this one supersedes (PS3.3 C.17.2.1). Raises ValueError for no results, a
    result of an unknown task or one that lacks a value the report needs.
    """
    if not results:
        raise ValueError("a measurement report needs at least one result")
    groups = [
        group
        for result in results
        for group in measurement_groups(result, source, node.uids, illustrations.get((result.task, result.output), ()))
    ]
    content = MeasurementReport(
        observation_context=device_observation_context(node),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    _add_image_library(content, source)
    return Comprehensive3DSR(
        evidence=[_patient_and_study(source), *(image for images in illustrations.values() for image in images)],
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
        previous_versions=list(predecessors) or None,
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


def measurement_groups(
    result: InferenceResult,
    source: pydicom.Dataset,
    uids: InstallationUids,
    illustrations: Sequence[pydicom.Dataset] = (),
) -> list[MeasurementsAndQualitativeEvaluations]:
    """The TID 1501 Measurement Groups of one result, by its task, with the images that illustrate it."""
    if result.task == "hallux_valgus":
        return foot_groups(result, source, uids, illustrations)
    if result.task == "bone_age":
        return [bone_age_group(result, source, uids, illustrations)]
    raise ValueError(f"result {result.task!r}/{result.output!r}: unknown task, expected hallux_valgus or bone_age")


def foot_groups(
    result: InferenceResult,
    source: pydicom.Dataset,
    uids: InstallationUids,
    illustrations: Sequence[pydicom.Dataset] = (),
) -> list[MeasurementsAndQualitativeEvaluations]:
    """One group per class of the foot model: the class as the finding, its probability, and present or absent
    by :func:`inference.predict.reported_foot_findings`; the illustrations go to the class their heatmap shows."""
    values = _required_values(result, HALLUX_VALGUS_KEYS)
    probabilities, threshold = values["probabilities"], values["threshold"]
    try:
        present = reported_foot_findings(probabilities, threshold)
    except ValueError as error:
        raise ValueError(f"result hallux_valgus/{result.output}: {error}") from None
    shown = values.get("heatmap_of", values["prediction"])
    if shown not in HALLUX_VALGUS_CLASSES:
        raise ValueError(f"result hallux_valgus/{result.output}: the heatmap's class {shown!r} is not a class")
    groups = []
    for name in HALLUX_VALGUS_CLASSES:
        finding = codes.FOOT_FINDINGS[name]
        measurements = [Measurement(name=codes.PROBABILITY, value=probabilities[name], unit=codes.NO_UNITS)]
        if name == "Hallux Valgus" and values.get("hallux_valgus_angle_deg") is not None:
            measurements.append(
                Measurement(name=codes.HALLUX_VALGUS_ANGLE, value=values["hallux_valgus_angle_deg"], unit=codes.DEGREES)
            )
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=uids.derived(source.SOPInstanceUID, "tracking", result.task, result.output, name),
                identifier=f"foot: {name.lower()}",
            ),
            finding_type=finding,
            finding_sites=[finding_site(codes.FOOT, source)],
            algorithm_id=algorithm_identification(
                result,
                f"hallux valgus present from a probability of {threshold}",
                "flatfoot or foot ulcer present when the most probable class",
                "no abnormality present when no other class is",
            ),
            measurements=measurements,
            qualitative_evaluations=[
                QualitativeEvaluation(finding, codes.PRESENT if name in present else codes.ABSENT)
            ],
            source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
        )
        if name == shown:
            _add_illustrations(group, illustrations)
        groups.append(group)
    return groups


def bone_age_group(
    result: InferenceResult,
    source: pydicom.Dataset,
    uids: InstallationUids,
    illustrations: Sequence[pydicom.Dataset] = (),
) -> MeasurementsAndQualitativeEvaluations:
    """The bone age read by one sex model, with its properties (:func:`bone_age_properties`), and the
    chronological age where known."""
    values = _required_values(result, BONE_AGE_KEYS)
    if values["sex"] not in SEXES:
        raise ValueError(f"result bone_age/{result.output}: sex must be 'M' or 'F', got {values['sex']!r}")
    model = SEXES[values["sex"]]
    measurements = [
        Measurement(
            name=codes.BONE_AGE, value=values["age_months"], unit=codes.MONTHS, properties=bone_age_properties(result)
        )
    ]
    if values.get("chronological_age_months") is not None:
        measurements.append(
            Measurement(name=codes.SUBJECT_AGE, value=values["chronological_age_months"], unit=codes.MONTHS)
        )
    parameters = [f"model of {model} patients"]
    if values.get("z_score") is not None:
        parameters.append(f"abnormal beyond {values['flag_sds']} reference SD")
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=uids.derived(source.SOPInstanceUID, "tracking", result.task, result.output),
            identifier=f"bone age, {model} model" + (" (the patient's sex)" if result.is_primary else ""),
        ),
        finding_sites=[finding_site(codes.HAND, source)],
        algorithm_id=algorithm_identification(result, *parameters),
        measurements=measurements,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )
    _add_illustrations(group, illustrations)
    return group


def bone_age_properties(result: InferenceResult) -> MeasurementProperties:
    """TID 310 of a bone age: where the node compared it with the chronological age against the reference's SD at
    that age, the normality (CID 222) and the reference population (:func:`reference_population`); and always the
    model's sigma as the range of measurement uncertainty (CID 225), in months."""
    values = result.values or {}
    normality, population = None, None
    if values.get("z_score") is not None:
        values = _required_values(result, ASSESSMENT_KEYS)
        if values["assessment"] not in codes.ASSESSMENTS:
            raise ValueError(
                f"result bone_age/{result.output}: assessment {values['assessment']!r} is not one of "
                f"{sorted(codes.ASSESSMENTS)}"
            )
        normality = codes.ASSESSMENTS[values["assessment"]]
        population = reference_population(result)
    properties = MeasurementProperties(normality=normality, measurement_statistical_properties=population)
    properties.append(_property(codes.MEASUREMENT_UNCERTAINTY, values["sigma_months"], codes.MONTHS))
    return properties


def reference_population(result: InferenceResult) -> MeasurementStatisticalProperties:
    """TID 311: the children of the model's sex at the patient's chronological age, as the reference sees them:
    their mean bone age (the reference sets it to the chronological age), its SD, the Z-score of this bone age,
    a description and the reference as the authority."""
    values = _required_values(result, ASSESSMENT_KEYS)
    authority = codes.REFERENCE_AUTHORITIES.get(values["reference"])
    if authority is None:
        raise ValueError(
            f"result bone_age/{result.output}: reference {values['reference']!r} is not one of "
            f"{sorted(codes.REFERENCE_AUTHORITIES)}"
        )
    age = values["chronological_age_months"]
    population = MeasurementStatisticalProperties(
        values=[
            _property(codes.MEAN_OF_POPULATION, age, codes.MONTHS),
            _property(codes.STANDARD_DEVIATION_OF_POPULATION, values["reference_sd_months"], codes.MONTHS),
            _property(codes.Z_SCORE_OF_MEASUREMENT, values["z_score"], codes.NO_UNITS),
        ]
    )
    children = "boys" if values["sex"] == "M" else "girls"
    description = f"{children} aged {age:.1f} months, {values['reference']}"
    population.append(
        TextContentItem(
            codes.POPULATION_DESCRIPTION, description, relationship_type=RelationshipTypeValues.HAS_PROPERTIES
        )
    )
    population.append(
        CodeContentItem(codes.REFERENCE_AUTHORITY, authority, relationship_type=RelationshipTypeValues.HAS_PROPERTIES)
    )
    return population


def finding_site(anatomy: highdicom.sr.CodedConcept, source: pydicom.Dataset) -> FindingSite:
    """The anatomy with the source's laterality (CID 244) where it gives one: the series' or the image's."""
    side = series_laterality(source)
    return FindingSite(anatomy, laterality=codes.LATERALITIES[side] if side else None)


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


def image_library(source: pydicom.Dataset) -> ContainerContentItem:
    """TID 1600 with one entry (TID 1601): the source, with the descriptors of TID 1602 and TID 1603 it has."""
    entry = ImageContentItem(
        name=codes.SOURCE,
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    entry.ContentSequence = ContentSequence(_library_descriptors(source))
    group = ContainerContentItem(
        name=dicom_codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = ContentSequence([entry])
    library = ContainerContentItem(name=dicom_codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = ContentSequence([group])
    return library


def _library_descriptors(source: pydicom.Dataset) -> list[ContentItem]:
    acquisition = RelationshipTypeValues.HAS_ACQ_CONTEXT
    items: list[ContentItem] = [
        CodeContentItem(codes.MODALITY, codes.modality(source.get("Modality")), relationship_type=acquisition)
    ]
    if source.get("ImageLaterality") in codes.LATERALITIES:
        laterality = codes.LATERALITIES[source.ImageLaterality]
        items.append(CodeContentItem(codes.IMAGE_LATERALITY, laterality, relationship_type=acquisition))
    if source.get("StudyDate"):
        items.append(DateContentItem(codes.STUDY_DATE, source.StudyDate, relationship_type=acquisition))
    for name, keyword in ((codes.PIXEL_DATA_ROWS, "Rows"), (codes.PIXEL_DATA_COLUMNS, "Columns")):
        if source.get(keyword):
            items.append(NumContentItem(name, int(source[keyword].value), codes.PIXELS, relationship_type=acquisition))
    orientation = pair(source.get("PatientOrientation"))
    if orientation:
        for name, value in zip(
            (codes.PATIENT_ORIENTATION_ROW, codes.PATIENT_ORIENTATION_COLUMN), orientation, strict=True
        ):
            items.append(TextContentItem(name, str(value), relationship_type=acquisition))
    spacing = pair(source.get("ImagerPixelSpacing"))
    if spacing:  # row spacing (vertical), then column spacing (horizontal): PS3.3 10.7.1.3
        for name, value in ((codes.HORIZONTAL_PIXEL_SPACING, spacing[1]), (codes.VERTICAL_PIXEL_SPACING, spacing[0])):
            items.append(NumContentItem(name, float(value), codes.MILLIMETRES, relationship_type=acquisition))
    return items


def _add_image_library(content: MeasurementReport, source: pydicom.Dataset) -> None:
    """Put the source's image library before the imaging measurements (TID 1500 rows 7 and 8)."""
    items = content[0].ContentSequence
    position = next(
        i for i, item in enumerate(items) if item.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENTS
    )
    items.insert(position, image_library(source))


def _property(name: highdicom.sr.CodedConcept, value: float, unit: highdicom.sr.CodedConcept) -> NumContentItem:
    return NumContentItem(name, value, unit, relationship_type=RelationshipTypeValues.HAS_PROPERTIES)


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


def _add_illustrations(group: MeasurementsAndQualitativeEvaluations, images: Sequence[pydicom.Dataset]) -> None:
    """Reference the node's images of the group's result (TID 1501 row 10b)."""
    for image in images:
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
    return with_patient_and_study(copy(source))
