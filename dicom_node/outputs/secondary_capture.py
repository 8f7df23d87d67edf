"""A result's Grad-CAM heatmap as a Secondary Capture Image (PS3.3 A.8.1 SC Image IOD), for the PACS.

The image is the received radiograph, scaled down, with the heatmap blended over it in colour, a colour legend,
the result in words and the warning that this is an AI result not for diagnostic use (:mod:`.render`). It
joins the study of the radiograph in a new series, and says where it comes from:

- General Image (C.7.6.1): Image Type DERIVED\\SECONDARY, a Derivation Description (C.7.6.1.1.3), the Source
  Image Sequence pointing at the radiograph, and Burned In Annotation YES.
- General Equipment (C.7.5.1) and SC Equipment (C.8.6.1): the node, as a workstation (Conversion Type WSD).
- Contributing Equipment (C.12.1.1.5): the model that computed the heatmap, as Processing Equipment.
- SC Image (C.8.6.2): no Pixel Spacing: the picture is for looking at, not for measuring on.
"""

from __future__ import annotations

import numpy as np
import pydicom
from highdicom import ContributingEquipment
from highdicom.sc import SCImage
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.ai_tasks.registry import task_type
from dicom_node.models import InferenceResult
from dicom_node.outputs.identity import AlgorithmIdentity, NodeIdentity
from dicom_node.outputs.preview import preview
from dicom_node.outputs.render import Caption, Picture, render
from dicom_node.outputs.source_header import series_laterality
from inference.pixels import radiograph_pixels
from inference.predict import Heatmap

NOT_FOR_DIAGNOSTIC_USE = "AI RESULT - NOT FOR DIAGNOSTIC USE"

# highdicom takes single letters only; C.7.6.1.1.1 also allows e.g. "FL", so the source's value replaces this
_ORIENTATION_STAND_IN = ("L", "F")


def build_secondary_capture(
    source: pydicom.Dataset,
    heatmap: Heatmap,
    result: InferenceResult,
    node: NodeIdentity,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int = 1,
    max_size: int = 1024,
    radiograph: np.ndarray | None = None,
) -> SCImage:
    """The SC image of ``result``'s ``heatmap`` over the radiograph ``source``, in ``source``'s study.

    ``max_size`` is the longest side of the written picture, in pixels; the radiograph is never enlarged.
    ``radiograph`` is the source's image as :func:`dicom_node.outputs.preview.preview` made it for
    ``max_size``, when at hand; without it the source's pixels are decoded.
    Raises ValueError when ``source`` has no pixels or lacks the UIDs to refer to it, when ``heatmap`` was
    computed on an image of another size, or when ``result`` lacks what the picture must say.
    """
    check_source(source)
    check_heatmap(heatmap, source)
    _check_result(result)
    algorithm = algorithm_identity(result)
    picture = heatmap_picture(source, heatmap, result, max_size, radiograph)
    sc = SCImage(
        pixel_array=picture.pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=node.manufacturer,
        manufacturer_model_name=node.model_name,
        software_versions=node.software_version,
        patient_id=source.get("PatientID"),
        patient_name=source.get("PatientName"),
        patient_birth_date=source.get("PatientBirthDate"),
        patient_sex=source.get("PatientSex"),
        accession_number=source.get("AccessionNumber"),
        study_id=source.get("StudyID"),
        study_date=source.get("StudyDate"),
        study_time=source.get("StudyTime"),
        referring_physician_name=source.get("ReferringPhysicianName"),
        series_description=series_description(result),
        laterality=series_laterality(source),
        patient_orientation=_ORIENTATION_STAND_IN,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[model_as_equipment(algorithm, node)],
        specific_character_set=source.get("SpecificCharacterSet"),
    )
    sc.PatientOrientation = source.get("PatientOrientation", "")  # scaled, not turned: the directions hold
    _copy_if_present(source, sc, ("StudyDescription", "BodyPartExamined"))
    _add_node_equipment(sc, node)
    _add_derivation(sc, source, result, algorithm, picture)
    return sc


def algorithm_identity(result: InferenceResult) -> AlgorithmIdentity:
    """The model behind ``result``, as its row recorded it."""
    return AlgorithmIdentity(result.model_name, result.model_version, result.weights_digest, result.demo_model)


def heatmap_picture(
    source: pydicom.Dataset,
    heatmap: Heatmap,
    result: InferenceResult,
    max_size: int,
    radiograph: np.ndarray | None = None,
) -> Picture:
    """The picture an SC image of ``result`` shows: ``source``'s radiograph (``radiograph``, or decoded), the
    heatmap and the caption."""
    if radiograph is None:
        shape = (int(source.Rows), int(source.Columns))
        radiograph = preview(radiograph_pixels(source, reduce_to=max_size), max_size, shape)
    return render(radiograph, heatmap, caption(result), max_size)


def caption(result: InferenceResult) -> Caption:
    """The words burned into the picture: the warnings, the result, the model, and what the colours show."""
    algorithm = algorithm_identity(result)
    warnings = (NOT_FOR_DIAGNOSTIC_USE,)
    if algorithm.disclaimer is not None:
        warnings += (f"DEMO MODEL: {algorithm.disclaimer.upper()}",)
    task = task_type(result.task)
    lines, shown = task.caption(result.output, task.values(result))
    model = f"Model: {algorithm.name} {algorithm.version}"
    return Caption(warnings, (*lines, model), f"Colours: Grad-CAM of {shown}")


def series_description(result: InferenceResult) -> str:
    """As the result's task names its series (``Task.series_description``)."""
    return task_type(result.task).series_description(result.output)


def check_source(source: pydicom.Dataset) -> None:
    if "PixelData" not in source:
        raise ValueError(f"the source {source.get('SOPInstanceUID', '(no SOP Instance UID)')} has no Pixel Data")
    missing = [keyword for keyword in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID") if not source.get(keyword)]
    if missing:
        raise ValueError(f"the source lacks {', '.join(missing)}: an SC image could not refer to it")


def check_heatmap(heatmap: Heatmap, source: pydicom.Dataset) -> None:
    box = heatmap.letterbox
    if (box.rows, box.columns) != (source.get("Rows"), source.get("Columns")):
        raise ValueError(
            f"the heatmap was computed on an image of {box.rows} x {box.columns} pixels, "
            f"the source has {source.get('Rows')} x {source.get('Columns')}"
        )
    if np.ndim(heatmap.values) != 2:
        raise ValueError(f"the heatmap's values must be 2-D, not of shape {np.shape(heatmap.values)}")


def _check_result(result: InferenceResult) -> None:
    task_type(result.task).values(result)  # the words of the picture are made of them
    for attribute in ("model_name", "model_version", "weights_digest"):
        if not getattr(result, attribute):
            raise ValueError(f"the result has no {attribute}: the SC image could not name its model")
    if not isinstance(result.demo_model, bool):
        raise ValueError(f"the result's demo_model must be True or False, not {result.demo_model!r}")


def _copy_if_present(source: pydicom.Dataset, sc: SCImage, keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        if source.get(keyword):
            setattr(sc, keyword, source[keyword].value)


def _add_node_equipment(sc: SCImage, node: NodeIdentity) -> None:
    """The node as General Equipment (C.7.5.1) and as the workstation of SC Equipment (C.8.6.1)."""
    sc.DeviceUID = node.device_uid
    sc.StationName = node.ae_title
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = node.manufacturer
    sc.SecondaryCaptureDeviceManufacturerModelName = node.model_name
    sc.SecondaryCaptureDeviceSoftwareVersions = node.software_version


def model_as_equipment(algorithm: AlgorithmIdentity, node: NodeIdentity) -> ContributingEquipment:
    """The model as Contributing Equipment (C.12.1.1.5): Processing Equipment (DCM 109102, CID 7005), which
    PS3.16 defines as equipment that processed instances to create new ones, as the model did for this one."""
    description = f"Computed the Grad-CAM heatmap and the result; weights SHA-256 {algorithm.weights_digest}"
    if algorithm.disclaimer is not None:
        description += f"; demo model: {algorithm.disclaimer}"
    return ContributingEquipment(
        manufacturer=node.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        # the UID of these weights names the model exactly; dciodvfy rejects Device UID in this sequence
        device_serial_number=algorithm.uid,
        contribution_description=description,
    )


def _add_derivation(
    sc: SCImage, source: pydicom.Dataset, result: InferenceResult, algorithm: AlgorithmIdentity, picture: Picture
) -> None:
    """How the picture was made from the source (General Image, C.7.6.1, and its Derivation, C.7.6.1.1.3)."""
    scale = picture.radiograph_box[2] / source.Columns
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (
        f"Grad-CAM heatmap of {algorithm.name} {algorithm.version} ({result.task}, {result.output}) blended in "
        f"colour over the source image scaled by {scale:.3f}; the result in words, a colour legend and the "
        "warning AI RESULT - NOT FOR DIAGNOSTIC USE burned in above and below it"
    )
    sc.SourceImageSequence = [_source_image_item(source)]
    sc.BurnedInAnnotation = "YES"
    _add_lossy_compression_history(sc, source)


def _source_image_item(source: pydicom.Dataset) -> pydicom.Dataset:
    """The source as the input of the image processing (C.7.6.1.1.3; DCM 121322 from CID 7202)."""
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)]
    item.SpatialLocationsPreserved = "NO"  # scaled and set between text strips
    return item


def _add_lossy_compression_history(sc: SCImage, source: pydicom.Dataset) -> None:
    """Lossy Image Compression (C.7.6.1.1.5): once "01", an image and its derivatives stay "01"; this picture is
    written uncompressed, so it adds no loss of its own."""
    if source.get("LossyImageCompression") != "01":
        sc.LossyImageCompression = "00"
        return
    sc.LossyImageCompression = "01"
    _copy_if_present(source, sc, ("LossyImageCompressionRatio", "LossyImageCompressionMethod"))
