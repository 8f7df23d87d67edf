"""A result's heatmap as software can read it: a Parametric Map (PS3.3 A.75), built with highdicom.

The map has the source's pixel grid (Rows x Columns), so a viewer can lay it over the radiograph pixel for pixel.
Each stored value v in 0-1000 (16 bits; the IOD allows no 8) maps to the Grad-CAM activation v / 1000 (Real
World Value Mapping, C.7.6.16.2.11): 0 nothing, 1 the strongest in the image.

A projection radiograph has no Frame of Reference, which the Parametric Map IOD requires (with Plane Position
and Plane Orientation (Patient)). The node gives the map a Frame of Reference of its own, shared by the maps of
one source and by nothing else: the first pixel at (0, 0, 0), rows along x and columns along y, the source's
imager pixel spacing. Its tie to the radiograph is the Derivation Image Sequence: the source, with Spatial
Locations Preserved YES.
"""

from __future__ import annotations

import numpy as np
import pydicom
from highdicom import VOILUTTransformation
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.ai_tasks.registry import task_type
from dicom_node.models import InferenceResult
from dicom_node.outputs import codes
from dicom_node.outputs.identity import NodeIdentity
from dicom_node.outputs.secondary_capture import (
    algorithm_identity,
    check_heatmap,
    check_source,
    model_as_equipment,
)
from dicom_node.outputs.source_header import (
    PATIENT_AND_STUDY_KEYWORDS,
    copied,
    pair,
    series_laterality,
    with_patient_and_study,
)
from inference.predict import Heatmap

LEVELS = 1000  # stored values are thousandths of the activation
_ROWS_ALONG_X = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
# what highdicom reads of a source image besides the patient and study
SOURCE_KEYWORDS = (
    *PATIENT_AND_STUDY_KEYWORDS,
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "Rows",
    "Columns",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)


def build_parametric_map(
    source: pydicom.Dataset,
    heatmap: Heatmap,
    result: InferenceResult,
    node: NodeIdentity,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    frame_of_reference_uid: str,
    instance_number: int = 1,
) -> ParametricMap:
    """The Parametric Map of ``result``'s ``heatmap`` over ``source``, in ``source``'s study.

    ``frame_of_reference_uid`` is the Frame of Reference of the source's maps (see the module's docstring).
    Raises ValueError when ``source`` lacks the UIDs or pixels to refer to, or ``heatmap`` was computed on an
    image of another size.
    """
    check_source(source)
    check_heatmap(heatmap, source)
    algorithm = algorithm_identity(result)
    title = task_type(result.task).title
    values = np.rint(heatmap.on_image() * LEVELS).astype(np.uint16)
    parametric_map = ParametricMap(
        source_images=[_source_in_the_maps_frame(source, frame_of_reference_uid)],
        pixel_array=values,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=node.manufacturer,
        manufacturer_model_name=node.model_name,
        software_versions=node.software_version,
        device_serial_number=node.device_uid,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[_cam_mapping()],
        voi_lut_transformations=[VOILUTTransformation(window_center=LEVELS / 2, window_width=LEVELS + 1)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="HEATMAP",
        content_description=f"Grad-CAM, {title} {result.output}"[:64],
        contributing_equipment=[model_as_equipment(algorithm, node)],
    )
    parametric_map.SeriesDescription = f"AI {title} parametric map, {result.output}"
    parametric_map.Laterality = series_laterality(source)  # Type 2C for a paired body part: empty when unknown
    parametric_map.DeviceUID = node.device_uid
    parametric_map.StationName = node.ae_title
    parametric_map.PositionReferenceIndicator = None
    # highdicom draws this UID at random: derived, a run again after a crash writes the same object
    organisation = node.uids.derived(sop_instance_uid, "dimension organization")
    for item in (*parametric_map.DimensionOrganizationSequence, *parametric_map.DimensionIndexSequence):
        item.DimensionOrganizationUID = organisation
    return parametric_map


def _cam_mapping() -> RealWorldValueMapping:
    """A new item for each map: a dataset belongs to the one sequence it is put in."""
    return RealWorldValueMapping(
        lut_label="GRADCAM",
        lut_explanation="Grad-CAM activation: 0 none, 1 the strongest in the image",
        unit=codes.NO_UNITS,
        value_range=(0, LEVELS),
        slope=1 / LEVELS,
        intercept=0,
    )


def _source_in_the_maps_frame(source: pydicom.Dataset, frame_of_reference_uid: str) -> pydicom.Dataset:
    """What highdicom reads of the source, as one frame in the map's geometry: its patient, study and
    identifiers (a Type 2 attribute the source lacks present and empty), its size, the map's own Frame of
    Reference, the first pixel at the origin and the source's pixel spacing. A new dataset: the source, its
    Pixel Data left unread, is unchanged."""
    header = with_patient_and_study(copied(source, SOURCE_KEYWORDS))
    header.FrameOfReferenceUID = frame_of_reference_uid
    header.ImagePositionPatient = [0.0, 0.0, 0.0]
    header.ImageOrientationPatient = _ROWS_ALONG_X
    spacing = pair(source.get("ImagerPixelSpacing")) or pair(source.get("PixelSpacing")) or [1.0, 1.0]
    header.PixelSpacing = [float(value) for value in spacing]
    header.SliceThickness = None  # a projection has none; highdicom reads the attribute
    return header
