"""The node's results for one received X-ray as a structured report: a Comprehensive 3D SR (PS3.3 A.35.13)
whose content is a TID 1500 Measurement Report (PS3.16).

The content tree, top to bottom:

- the device observer context (TID 1002 / TID 1004): the node as the observer that made the report;
- "Procedure reported": Imaging procedure (CID 100);
- the image library (TID 1600): the source image, with each TID 1602 / TID 1603 descriptor the source has;
- Measurement Groups (TID 1501), each with its tracking identifier, finding site and laterality, the algorithm
  that computed it (TID 4019), the source image, and the node's Secondary Capture and Parametric Map images of
  that result as illustrations. Each task makes its own groups (``Task.measurement_groups``, whose module
  describes them) from the parts below: finding sites, algorithm identification, properties, illustrations.

Built by hand where highdicom cannot: the image library entry of a source without every projection descriptor
(highdicom's needs them all), and properties with units of their own (:func:`property_item`; highdicom's
``MeasurementProperties`` writes its uncertainties with the unit "1").

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
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom.sr.codedict import codes as dicom_codes

from dicom_node.ai_tasks.interface import ReportContext
from dicom_node.ai_tasks.registry import task_type
from dicom_node.models import InferenceResult
from dicom_node.outputs import codes
from dicom_node.outputs.identity import AlgorithmIdentity, NodeIdentity
from dicom_node.outputs.source_header import pair, series_laterality, with_patient_and_study
from dicom_node.outputs.uids import InstallationUids

SERIES_DESCRIPTION = "AI results (structured report)"
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
    """The TID 1501 Measurement Groups of one result, as its task makes them, with the images that illustrate
    it; ValueError for a result of a task not installed, or one whose values the task cannot read."""
    task = task_type(result.task)
    return task.measurement_groups(result, task.values(result), ReportContext(source, uids, illustrations))


def finding_site(site: highdicom.sr.CodedConcept, source: pydicom.Dataset) -> FindingSite:
    """The body part ``site`` with the source's laterality (CID 244) where it gives one: the series' or the
    image's."""
    side = series_laterality(source)
    return FindingSite(site, laterality=codes.LATERALITIES[side] if side else None)


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


def property_item(name: highdicom.sr.CodedConcept, value: float, unit: highdicom.sr.CodedConcept) -> NumContentItem:
    return NumContentItem(name, value, unit, relationship_type=RelationshipTypeValues.HAS_PROPERTIES)


def _algorithm(result: InferenceResult) -> AlgorithmIdentity:
    return AlgorithmIdentity(result.model_name, result.model_version, result.weights_digest, result.demo_model)


def _algorithms(results: Sequence[InferenceResult]) -> list[AlgorithmIdentity]:
    """The distinct models behind ``results``, in order of first use."""
    return list(dict.fromkeys(_algorithm(result) for result in results))


def add_illustrations(group: MeasurementsAndQualitativeEvaluations, images: Sequence[pydicom.Dataset]) -> None:
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
