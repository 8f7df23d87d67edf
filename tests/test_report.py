"""The TID 1500 structured report: valid for dciodvfy and PixelMed's DicomSRValidator, and readable back."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from dicom_node.models import InferenceResult
from dicom_node.outputs import codes
from dicom_node.outputs.identity import NodeIdentity
from dicom_node.outputs.report import SERIES_DESCRIPTION, build_measurement_report
from dicom_node.outputs.uids import InstallationUids
from dicom_node.synthetic import Demographics, dx_dataset
from tests.validators import dciodvfy_errors, sr_validator_errors

NODE = NodeIdentity("DICOMNODE", InstallationUids(secret=b"\x05" * 32))
ALGORITHM_ROWS = ("111001", "111003")  # TID 4019 Algorithm Name, Algorithm Version
REFERENCE = "Greulich & Pyle 1959 (Brush Foundation SDs)"


def source_image(body_part: str) -> pydicom.Dataset:
    """A small DX image of a boy born 2015-03-01, studied 2026-01-15 (130.5 months)."""
    who = Demographics(sex="M", birth_date=dt.date(2015, 3, 1), study_date=dt.date(2026, 1, 15), body_part=body_part)
    return dx_dataset(np.zeros((16, 16), np.uint16), who)


def secondary_capture(source: pydicom.Dataset) -> pydicom.Dataset:
    """What evidence needs of a Secondary Capture image the node wrote."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = source.StudyInstanceUID
    return ds


def result(task: str, output: str, values: dict, *, primary: bool = True) -> InferenceResult:
    model = ("hallux-valgus-net", "1.0") if task == "hallux_valgus" else ("bone-age-net", "2.1")
    return InferenceResult(
        task=task,
        output=output,
        is_primary=primary,
        summary="",
        values=values,
        model_name=model[0],
        model_version=model[1],
        weights_digest=f"sha256:{model[0]}",
        demo_model=True,
    )


def foot_result(angle: float | None = 27.5) -> InferenceResult:
    return result(
        "hallux_valgus",
        "foot",
        {
            "probabilities": {"Normal": 0.1, "Flatfoot": 0.05, "Foot Ulcer": 0.05, "Hallux Valgus": 0.8},
            "prediction": "Hallux Valgus",
            "confidence": 0.8,
            "hallux_valgus_detected": True,
            "threshold": 0.5,
            "hallux_valgus_angle_deg": angle,
            "heatmap_peak_xy": [3, 4],
        },
    )


def bone_age_results(chronological: bool) -> list[InferenceResult]:
    """The male (primary, compared with the chronological age when known) and the female reading."""
    age = 130.5 if chronological else None
    male = {"sex": "M", "age_months": 150.0, "age_years": 12.5, "sigma_months": 9.5, "chronological_age_months": age}
    female = {"sex": "F", "age_months": 160.0, "age_years": 13.3, "sigma_months": 10.5, "chronological_age_months": age}
    if chronological:
        male |= {
            "difference_months": 19.5,
            "reference_sd_months": 10.0,
            "z_score": 1.95,
            "assessment": "within range",
            "reference": REFERENCE,
            "flag_sds": 2.0,
        }
    return [result("bone_age", "male", male), result("bone_age", "female", female, primary=False)]


def report(source: pydicom.Dataset, results: list[InferenceResult], captures: Mapping = MappingProxyType({})):
    return build_measurement_report(
        source,
        results,
        captures,
        NODE,
        series_instance_uid=generate_uid(),
        series_number=9001,
        sop_instance_uid=generate_uid(),
    )


def captures_of(source: pydicom.Dataset, results: list[InferenceResult]) -> dict[tuple[str, str], pydicom.Dataset]:
    return {(result.task, result.output): secondary_capture(source) for result in results}


def foot_only() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    return source_image("FOOT"), [foot_result()]


def hand_compared() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    return source_image("HAND"), bone_age_results(chronological=True)


def hand_without_age() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    return source_image("HAND"), bone_age_results(chronological=False)


def both_tasks() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    return source_image("FOOT"), [foot_result(angle=None), *bone_age_results(chronological=True)]


@pytest.mark.parametrize("case", [foot_only, hand_compared, hand_without_age, both_tasks])
def test_the_report_passes_dciodvfy_and_the_sr_validator(case, tmp_path: Path) -> None:
    source, results = case()
    path = tmp_path / "report.dcm"
    report(source, results, captures_of(source, results)).save_as(path)
    assert dciodvfy_errors(path) == []
    assert sr_validator_errors(path) == []


def _measurements(group) -> dict[tuple[str, str | None], float]:
    """A group's numbers by (concept name, derivation)."""
    return {(m.name.meaning, m.derivation.meaning if m.derivation else None): m.value for m in group.get_measurements()}


def test_the_saved_report_reads_back_with_its_values_and_references(tmp_path: Path) -> None:
    source, results = both_tasks()
    captures = captures_of(source, results)
    path = tmp_path / "report.dcm"
    report(source, results, captures).save_as(path)

    sr = highdicom.sr.srread(path)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SeriesDescription == SERIES_DESCRIPTION
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.Manufacturer) == ("UNVERIFIED", "COMPLETE", NODE.manufacturer)
    evidence = {sop_instance_uid for _, _, sop_instance_uid, _ in sr.get_evidence(current_procedure_only=True)}
    assert evidence == {source.SOPInstanceUID} | {capture.SOPInstanceUID for capture in captures.values()}
    [observer] = sr.content.get_observer_contexts()
    assert observer.observer_identifying_attributes.uid == NODE.device_uid

    foot, male, female = sr.content.get_image_measurement_groups()
    assert foot.finding_type == codes.HALLUX_VALGUS
    assert foot.get_qualitative_evaluations()[0].value == codes.PRESENT
    assert _measurements(foot)[("Probability of hallux valgus", None)] == pytest.approx(0.8)
    assert ("Hallux valgus angle", None) not in _measurements(foot)
    assert male.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    algorithm = {item.name.meaning: item.value for item in male[0].ContentSequence if item.name.value in ALGORITHM_ROWS}
    assert algorithm["Algorithm Name"] == "bone-age-net" and algorithm["Algorithm Version"] == "2.1"
    assert _measurements(male) == pytest.approx(
        {
            ("Bone age", None): 150.0,
            ("Bone age", "Standard Deviation"): 9.5,
            ("Age", None): 130.5,
            ("Bone age minus chronological age", None): 19.5,
            ("Standard deviation of population", None): 10.0,
            ("Z-Score of measurement", None): 1.95,
        }
    )
    assert _measurements(female) == pytest.approx(
        {("Bone age", None): 160.0, ("Bone age", "Standard Deviation"): 10.5, ("Age", None): 130.5}
    )
    sexes = [group.get_qualitative_evaluations(name=codes.BONE_AGE_MODEL_SEX)[0].value for group in (male, female)]
    assert [sex.value for sex in sexes] == ["M", "F"]
    for group, result in zip((foot, male, female), results, strict=True):
        illustrations = [
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in group[0].ContentSequence
            if item.name == codes.ILLUSTRATION_OF_FINDING
        ]
        assert illustrations == [captures[(result.task, result.output)].SOPInstanceUID], "each group shows its own"


def test_a_foot_angle_is_reported_in_degrees(tmp_path: Path) -> None:
    source, results = foot_only()
    report(source, results).save_as(tmp_path / "report.dcm")
    [foot] = highdicom.sr.srread(tmp_path / "report.dcm").content.get_image_measurement_groups()
    [angle] = foot.get_measurements(name=codes.HALLUX_VALGUS_ANGLE)
    assert angle.value == pytest.approx(27.5) and angle.unit == codes.DEGREES


def _with_values(original: InferenceResult, **changes: object) -> InferenceResult:
    values = {key: value for key, value in (original.values | changes).items() if value is not ...}
    return result(original.task, original.output, values)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda: result("fracture", "hand", {}), "unknown task"),
        (lambda: _with_values(foot_result(), probabilities=...), "lacks the values probabilities"),
        (lambda: _with_values(foot_result(), prediction="Gout"), "must be among"),
        (lambda: _with_values(bone_age_results(True)[1], sigma_months=...), "lacks the values sigma_months"),
        (lambda: _with_values(bone_age_results(True)[0], reference=...), "lacks the values reference"),
        (lambda: _with_values(bone_age_results(True)[0], assessment="tall"), "assessment 'tall'"),
        (lambda: _with_values(bone_age_results(True)[1], sex="X"), "sex must be"),
    ],
)
def test_an_invalid_result_raises_value_error(bad, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        report(source_image("HAND"), [bad()])


def test_no_results_raise_value_error() -> None:
    with pytest.raises(ValueError, match="at least one result"):
        report(source_image("HAND"), [])


def test_a_source_without_projection_descriptors_is_left_out_of_the_image_library() -> None:
    source = source_image("HAND")
    del source.ImagerPixelSpacing, source.AccessionNumber
    sr = report(source, bone_age_results(chronological=False))
    concepts = [item.ConceptNameCodeSequence[0].CodeValue for item in sr.ContentSequence]
    assert "126010" in concepts and "111028" not in concepts  # Imaging Measurements, no Image Library
    assert not sr.AccessionNumber and sr.StudyInstanceUID == source.StudyInstanceUID
