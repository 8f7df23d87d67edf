"""The heatmap as a Parametric Map: valid for dciodvfy, on the source's pixel grid, its values the heatmap's
through the real-world value mapping, and tied to the source it was computed on."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.uid import ParametricMapStorage, generate_uid
from sqlalchemy import select

from dicom_node.config import InferenceSettings, Settings
from dicom_node.inference_jobs import InferenceModels
from dicom_node.models import Instance
from dicom_node.node import Node
from dicom_node.outputs.parametric_map import LEVELS, build_parametric_map
from dicom_node.synthetic import Demographics, dx_dataset, synthetic_dx
from inference.predict import Heatmap
from inference.preprocess import Letterbox
from tests.dicom_peers import free_port
from tests.serve_process import DEMO_CARDS
from tests.test_output_uids import _receive_and_infer, _run_all
from tests.test_report import NODE, bone_age_results, foot_result
from tests.validators import dciodvfy_errors

ROWS, COLUMNS = 300, 200


def source_image() -> pydicom.Dataset:
    who = Demographics(sex="F", birth_date=dt.date(2014, 5, 1), study_date=dt.date(2026, 2, 1), body_part="HAND")
    return dx_dataset(np.zeros((ROWS, COLUMNS), np.uint16), who)


def heatmap(rows: int = ROWS, columns: int = COLUMNS) -> Heatmap:
    return Heatmap(np.random.default_rng(3).random((7, 7)).astype(np.float32), Letterbox(rows, columns, 224))


def parametric_map(
    source: pydicom.Dataset, frame_of_reference_uid: str, heat: Heatmap | None = None, task: str = "bone_age"
):
    result = foot_result() if task == "hallux_valgus" else bone_age_results(chronological=False)[0]
    return build_parametric_map(
        source,
        heat or heatmap(),
        result,
        NODE,
        series_instance_uid=generate_uid(),
        series_number=9102,
        sop_instance_uid=generate_uid(),
        frame_of_reference_uid=frame_of_reference_uid,
    )


@pytest.mark.parametrize("task", ["bone_age", "hallux_valgus"])
def test_the_map_passes_dciodvfy_and_reads_back_as_the_heatmap(tmp_path: Path, task: str) -> None:
    source, frame = source_image(), generate_uid()
    parametric_map(source, frame, task=task).save_as(tmp_path / "map.dcm")
    assert dciodvfy_errors(tmp_path / "map.dcm") == []

    read = highdicom.pm.ParametricMap.from_dataset(pydicom.dcmread(tmp_path / "map.dcm"))
    assert read.SOPClassUID == ParametricMapStorage
    assert (read.Rows, read.Columns, read.NumberOfFrames) == (ROWS, COLUMNS, 1)
    assert (read.StudyInstanceUID, read.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert read.FrameOfReferenceUID == frame and "FrameOfReferenceUID" not in source, "the source keeps its header"
    [mapping] = read.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    values = read.pixel_array.astype(float) * mapping.RealWorldValueSlope + mapping.RealWorldValueIntercept
    np.testing.assert_allclose(values, heatmap().on_image(), atol=0.5 / LEVELS + 1e-6)
    [derivation] = read.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
    [reference] = derivation.SourceImageSequence
    assert (reference.ReferencedSOPInstanceUID, reference.SpatialLocationsPreserved) == (source.SOPInstanceUID, "YES")
    assert read.ContentQualification == "RESEARCH" and read.Laterality == "R"


def test_a_bare_deferred_or_multi_frame_source_gives_a_valid_map_and_keeps_its_pixels_unread(tmp_path: Path) -> None:
    source = source_image()
    for keyword in ("PatientName", "PatientBirthDate", "AccessionNumber", "StudyID", "StudyTime", "ImagerPixelSpacing"):
        delattr(source, keyword)
    del source.PixelSpacing, source.ImageLaterality
    source.NumberOfFrames = 1
    source.save_as(tmp_path / "source.dcm", enforce_file_format=True)
    deferred = pydicom.dcmread(tmp_path / "source.dcm", defer_size=1024)
    parametric_map(deferred, generate_uid()).save_as(tmp_path / "map.dcm")
    assert deferred.get_item("PixelData", keep_deferred=True).value is None, "the map never reads the source's pixels"
    assert dciodvfy_errors(tmp_path / "map.dcm") == []
    written = pydicom.dcmread(tmp_path / "map.dcm")
    assert written.AccessionNumber == "" and written.Laterality == ""
    assert written.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing == [1.0, 1.0]


def test_the_same_inputs_give_the_same_map(tmp_path: Path) -> None:
    """A run again after a crash writes the same object: the UIDs, highdicom's dimension organisation
    included; only the times of creation differ."""
    source, frame, sop_instance_uid = source_image(), generate_uid(), generate_uid()
    maps = []
    for _ in range(2):
        built = build_parametric_map(
            source,
            heatmap(),
            foot_result(),
            NODE,
            series_instance_uid="1.2.3",
            series_number=9101,
            sop_instance_uid=sop_instance_uid,
            frame_of_reference_uid=frame,
        )
        for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
            delattr(built, keyword)
        for equipment in built.ContributingEquipmentSequence:
            equipment.pop("ContributionDateTime", None)
        encoded = io.BytesIO()
        built.save_as(encoded)
        maps.append(encoded.getvalue())
    assert maps[0] == maps[1]
    assert built.DimensionOrganizationSequence[0].DimensionOrganizationUID.startswith("2.25.")


def test_a_heatmap_of_another_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match="computed on an image of 100 x 200 pixels"):
        parametric_map(source_image(), generate_uid(), heatmap(rows=100))


def test_the_maps_of_one_source_share_a_frame_of_reference_in_the_outputs_job(
    tmp_path: Path, onnx_graphs: Path
) -> None:
    """One map per result, the maps of a source in one frame of their own; with outputs.parametric_maps false,
    none."""
    source = tmp_path / "source.dcm"
    synthetic_dx("MAPS-1", side=128, seed=5).save_as(source, enforce_file_format=True)
    frames: dict[bool, list[str]] = {}
    for enabled in (True, False):
        settings = Settings(
            dicom={"host": "127.0.0.1", "port": free_port()},
            storage={"root": tmp_path / f"storage-{enabled}"},
            workers={"count": 0},
            mlflow={"enabled": False},
            outputs={"parametric_maps": enabled},
        )
        node = Node(settings, models=InferenceModels.load(InferenceSettings(**DEMO_CARDS), onnx_graphs))
        try:
            _receive_and_infer(node, source)
            _run_all(node)
            with node.sessions() as session:
                paths = session.scalars(select(Instance.path).where(Instance.sop_class_uid == ParametricMapStorage))
                results = session.scalars(select(Instance).where(Instance.source_instance_pk.is_(None))).one().results
                frames[enabled] = [pydicom.dcmread(node.store.absolute(p)).FrameOfReferenceUID for p in paths]
                count = len(results)
        finally:
            node.engine.dispose()
    assert len(frames[True]) == count >= 1 and len(set(frames[True])) == 1
    assert frames[False] == []
