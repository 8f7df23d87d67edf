"""The TID 1500 structured report: valid for dciodvfy and PixelMed's DicomSRValidator, and readable back."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from dicom_node.ai_tasks import bone_age as hand_task
from dicom_node.ai_tasks import hallux_valgus as foot_task
from dicom_node.models import InferenceResult
from dicom_node.outputs import codes
from dicom_node.outputs.identity import NodeIdentity
from dicom_node.outputs.report import SERIES_DESCRIPTION, build_measurement_report
from dicom_node.outputs.uids import InstallationUids
from dicom_node.synthetic import Demographics, dx_dataset
from inference.predict import reported_foot_findings
from tests.validators import dciodvfy_errors, sr_validator_errors

NODE = NodeIdentity("DICOMNODE", InstallationUids(secret=b"\x05" * 32))
ALGORITHM_ROWS = ("111001", "111003", "111002")  # TID 4019 Algorithm Name, Version, Parameters
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


def captures_of(
    source: pydicom.Dataset, results: list[InferenceResult]
) -> dict[tuple[str, str], list[pydicom.Dataset]]:
    return {(result.task, result.output): [secondary_capture(source)] for result in results}


def foot_only() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    return source_image("FOOT"), [foot_result()]


def hand_compared() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    return source_image("HAND"), bone_age_results(chronological=True)


def hand_without_age() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    return source_image("HAND"), bone_age_results(chronological=False)


def both_tasks() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    return source_image("FOOT"), [foot_result(angle=None), *bone_age_results(chronological=True)]


def anatomy_result(
    seen: str, body_part: str | None, tagged: list[str] | None, run: list[str], followed: str | None = None
) -> InferenceResult:
    """The anatomy check's values as the index keeps them: the routing keys it set, the defaults left out."""
    values = {
        "seen": seen,
        "body_part": body_part,
        "confidence": 0.97,
        "probabilities": {"hand": 0.01, "foot": 0.02, "other": 0.97} | {seen: 0.97},
        "heatmap_peak_xy": [3.5, 4.5],
        "tagged_tasks": tagged,
        "tasks_run": run,
    }
    if followed is not None:
        values |= {"disagreement": True, "followed": followed}
    return result("anatomy", "body_part", values, primary=False)


def foot_checked_against_hand_tags() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    check = anatomy_result("foot", "FOOT", ["bone_age"], ["hallux_valgus"], followed="image")
    return source_image("HAND"), [check, foot_result()]


def other_checked_against_hand_tags() -> tuple[pydicom.Dataset, list[InferenceResult]]:
    return source_image("HAND"), [anatomy_result("other", None, ["bone_age"], [], followed="image")]


@pytest.mark.parametrize(
    "case",
    [
        foot_only,
        hand_compared,
        hand_without_age,
        both_tasks,
        foot_checked_against_hand_tags,
        other_checked_against_hand_tags,
    ],
)
def test_the_report_passes_dciodvfy_and_the_sr_validator(case, tmp_path: Path) -> None:
    source, results = case()
    path = tmp_path / "report.dcm"
    report(source, results, captures_of(source, results)).save_as(path)
    assert dciodvfy_errors(path) == []
    assert sr_validator_errors(path) == []


def _measurements(group) -> dict[str, tuple[float, str]]:
    """A group's numbers by concept name: (value, unit meaning)."""
    return {m.name.meaning: (m.value, m.unit.meaning) for m in group.get_measurements()}


def _properties(measurement) -> dict[str, object]:
    """The HAS PROPERTIES children of a measurement (TID 310): a number as (value, unit meaning), a code as its
    meaning, a text as itself."""
    found: dict[str, object] = {}
    for item in measurement[0].get("ContentSequence", []):
        if item.RelationshipType != "HAS PROPERTIES":
            continue
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            value = item.MeasuredValueSequence[0]
            found[name] = (float(value.NumericValue), value.MeasurementUnitsCodeSequence[0].CodeMeaning)
        elif item.ValueType == "CODE":
            found[name] = item.ConceptCodeSequence[0].CodeMeaning
        else:
            found[name] = item.TextValue
    return found


def _algorithm_rows(group) -> list[tuple[str, str]]:
    return [(item.name.meaning, item.value) for item in group[0].ContentSequence if item.name.value in ALGORITHM_ROWS]


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
    assert evidence == {source.SOPInstanceUID} | {c.SOPInstanceUID for images in captures.values() for c in images}
    [observer] = sr.content.get_observer_contexts()
    assert observer.observer_identifying_attributes.uid == NODE.device_uid

    *feet, male, female = sr.content.get_image_measurement_groups()
    assert [group.finding_type for group in feet] == list(foot_task.FINDINGS.values())
    for group in (*feet, male, female):
        [site] = group.finding_sites
        assert site.laterality == codes.LATERALITIES["R"], "the source is a right foot and hand"
        assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
    assert _measurements(feet[3]) == {"Probability": (pytest.approx(0.8), "no units")}
    assert ("Algorithm Name", "bone-age-net") in _algorithm_rows(male)
    assert ("Algorithm Parameters", "model of male patients") in _algorithm_rows(male)
    assert ("Algorithm Parameters", "model of female patients") in _algorithm_rows(female)
    assert not any(group.get_qualitative_evaluations() for group in (male, female)), "the model's sex is no finding"

    [bone_age] = male.get_measurements(name=hand_task.BONE_AGE)
    assert (bone_age.value, bone_age.unit) == (150.0, codes.MONTHS)
    assert _properties(bone_age) == {
        "+/-, range of measurement uncertainty": (9.5, "month"),
        "Normality": "Normal",
        "Mean Value of population": (130.5, "month"),
        "Standard deviation of population": (10.0, "month"),
        "Z-Score of measurement": (1.95, "no units"),
        "Population description": f"boys aged 130.5 months, {REFERENCE}",
        "Reference Authority": hand_task.REFERENCE_AUTHORITIES[REFERENCE].meaning,
    }
    assert _measurements(male)["Subject Age"] == (130.5, "month")
    [female_age] = female.get_measurements(name=hand_task.BONE_AGE)
    assert _properties(female_age) == {"+/-, range of measurement uncertainty": (10.5, "month")}
    illustrated = {
        (result.task, result.output): [
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for group in groups
            for item in group[0].ContentSequence
            if item.name == codes.ILLUSTRATION_OF_FINDING
        ]
        for result, groups in zip(results, (feet, [male], [female]), strict=True)
    }
    assert illustrated == {key: [image.SOPInstanceUID for image in images] for key, images in captures.items()}


def _dsrdump(sr: pydicom.Dataset, path: Path) -> list[str]:
    sr.save_as(path)
    return subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=True).stdout.splitlines()


def test_dcmtk_reads_each_value_with_its_unit(tmp_path: Path) -> None:
    source, results = both_tasks()
    lines = _dsrdump(report(source, results), tmp_path / "report.dcm")
    numbers = [line.strip() for line in lines if "NUM:" in line]
    without_unit = [line for line in numbers if not re.search(r'="[-\d.]+" \([^,]+,UCUM,"[^"]+"\)>$', line)]
    assert numbers and without_unit == []
    names = [re.search(r'NUM:\(,,"([^"]+)"\)', line)[1] for line in numbers]
    assert names.count("Probability") == 4, "the foot: one probability per class"
    assert names.count("Bone age") == 2, "the hand: one bone age per sex model"


def test_dcmtk_reads_one_bone_age_per_sex_model_with_its_uncertainty_as_a_property(tmp_path: Path) -> None:
    source, results = hand_compared()
    lines = _dsrdump(report(source, results), tmp_path / "report.dcm")
    bone_ages = [i for i, line in enumerate(lines) if re.search(r'NUM:\(,,"Bone age"\)="[\d.]+" \(mo,UCUM', line)]
    assert [re.search(r'="([\d.]+)"', lines[i])[1] for i in bone_ages] == ["150.0", "160.0"]
    for i, sigma in zip(bone_ages, ("9.5", "10.5"), strict=True):
        indent = len(lines[i]) - len(lines[i].lstrip())
        children = []
        for line in lines[i + 1 :]:
            if len(line) - len(line.lstrip()) <= indent:
                break
            children.append(line.strip())
        assert (
            f'<has properties NUM:(,,"+/-, range of measurement uncertainty")="{sigma}" (mo,UCUM,"month")>' in children
        )


def _with_values(original: InferenceResult, **changes: object) -> InferenceResult:
    values = {key: value for key, value in (original.values | changes).items() if value is not ...}
    return result(original.task, original.output, values)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda: result("fracture", "hand", {}), "no task 'fracture' is installed"),
        (lambda: _with_values(foot_result(), probabilities=...), "result lack probabilities"),
        (lambda: _with_values(foot_result(), prediction="Gout"), "heatmap's class 'Gout' is not a class"),
        (lambda: _with_values(foot_result(), probabilities={"Gout": 1.0}), "probabilities must name"),
        (lambda: _with_values(bone_age_results(True)[1], sigma_months=...), "result lack sigma_months"),
        (lambda: _with_values(bone_age_results(True)[0], reference=...), "lacks the values reference"),
        (lambda: _with_values(bone_age_results(True)[0], assessment="tall"), "assessment: .* \\(got 'tall'\\)"),
        (lambda: _with_values(bone_age_results(True)[0], reference="Tanner"), "reference 'Tanner' is not one of"),
        (lambda: _with_values(bone_age_results(True)[1], sex="X"), "sex: Input should be 'M' or 'F' \\(got 'X'\\)"),
    ],
)
def test_an_invalid_result_raises_value_error(bad, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        report(source_image("HAND"), [bad()])


def test_no_results_raise_value_error() -> None:
    with pytest.raises(ValueError, match="at least one result"):
        report(source_image("HAND"), [])


def _image_library_descriptors(sr: pydicom.Dataset) -> dict[str, object]:
    [library] = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    [entry] = library.ContentSequence[0].ContentSequence
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    values: dict[str, object] = {}
    for item in entry.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            values[name] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "CODE":
            values[name] = item.ConceptCodeSequence[0].CodeMeaning
        else:
            values[name] = str(item.get("TextValue") or item.get("Date"))
    return values


@pytest.mark.parametrize(
    ("modality", "meaning"), [("DX", "Digital Radiography"), ("OT", "Other"), ("ZZ", "Other"), ("", "Other")]
)
def test_the_sources_modality_is_coded_from_cid_29_else_as_other(modality: str, meaning: str) -> None:
    """An uploaded picture's Secondary Capture has Modality OT, which is in CID 33 only."""
    source = source_image("FOOT")
    source.Modality = modality
    assert _image_library_descriptors(report(source, [foot_result()]))["Modality"] == meaning


def test_the_image_library_names_the_source_with_the_descriptors_it_has(tmp_path: Path) -> None:
    full = report(source_image("HAND"), bone_age_results(chronological=False))
    assert _image_library_descriptors(full) == {
        "Modality": "Digital Radiography",
        "Image Laterality": "Right",
        "Study Date": "20260115",
        "Pixel Data Rows": 16.0,
        "Pixel Data Columns": 16.0,
        "Patient Orientation Row": "L",
        "Patient Orientation Column": "F",
        "Horizontal Pixel Spacing": 0.15,
        "Vertical Pixel Spacing": 0.15,
    }
    bare = source_image("HAND")
    del bare.ImagerPixelSpacing, bare.PatientOrientation, bare.ImageLaterality, bare.AccessionNumber
    bare.Modality = "XA"
    sr = report(bare, bone_age_results(chronological=False))
    assert _image_library_descriptors(sr) == {
        "Modality": "X-Ray Angiography",
        "Study Date": "20260115",
        "Pixel Data Rows": 16.0,
        "Pixel Data Columns": 16.0,
    }
    assert not sr.AccessionNumber and sr.StudyInstanceUID == bare.StudyInstanceUID
    sr.save_as(tmp_path / "report.dcm")
    assert dciodvfy_errors(tmp_path / "report.dcm") == []
    assert sr_validator_errors(tmp_path / "report.dcm") == []


def foot_with(probabilities: dict[str, float], threshold: float) -> InferenceResult:
    return result(
        "hallux_valgus",
        "foot",
        {
            "probabilities": probabilities,
            "prediction": max(probabilities, key=probabilities.__getitem__),
            "confidence": max(probabilities.values()),
            "threshold": threshold,
            "hallux_valgus_detected": probabilities["Hallux Valgus"] >= threshold,
        },
    )


def _presence(sr: pydicom.Dataset) -> dict[str, str]:
    """Each foot group's finding and whether the group says it is present."""
    presence = {}
    for group in highdicom.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups():
        [evaluation] = group.get_qualitative_evaluations()
        assert evaluation.name == group.finding_type, "the evaluation is of the group's own finding"
        presence[group.finding_type.meaning] = evaluation.value.meaning
    return presence


HV_PROBABILITY = 0.3


def _probabilities(top: str) -> dict[str, float]:
    """``top`` most probable; hallux valgus 0.3 unless it is the top class (then 0.4)."""
    rest = [name for name in FOOT_CLASSES if name not in (top, "Hallux Valgus")]
    if top == "Hallux Valgus":
        return {"Hallux Valgus": 0.4} | dict.fromkeys(rest, 0.2)
    return {top: 0.5, "Hallux Valgus": HV_PROBABILITY} | dict.fromkeys(rest, 0.1)


FOOT_CLASSES = ("Normal", "Flatfoot", "Foot Ulcer", "Hallux Valgus")


@pytest.mark.parametrize("top", FOOT_CLASSES)
@pytest.mark.parametrize("threshold", [0.25, 0.35, 0.45], ids=["below", "between", "above"])
def test_no_foot_group_contradicts_another_whatever_the_class_and_threshold(top: str, threshold: float) -> None:
    probabilities = _probabilities(top)
    presence = _presence(report(source_image("FOOT"), [foot_with(probabilities, threshold)]))
    meaning = {name: concept.meaning for name, concept in foot_task.FINDINGS.items()}
    present = {name for name in FOOT_CLASSES if presence[meaning[name]] == "Present"}
    assert set(presence.values()) <= {"Present", "Absent"} and len(presence) == 4
    assert present == reported_foot_findings(probabilities, threshold)
    assert ("Hallux Valgus" in present) == (probabilities["Hallux Valgus"] >= threshold), "the threshold decides"
    assert ("Normal" in present) == (present == {"Normal"}), "no abnormality never beside an abnormality"
    assert present, "a foot has at least one finding"
    if top in ("Flatfoot", "Foot Ulcer"):
        assert top in present


@pytest.mark.parametrize(
    ("probabilities", "threshold", "expected"),
    [
        ({"Normal": 0.7, "Flatfoot": 0.1, "Foot Ulcer": 0.1, "Hallux Valgus": 0.1}, 0.3, {"Normal"}),
        ({"Normal": 0.6, "Flatfoot": 0.0, "Foot Ulcer": 0.0, "Hallux Valgus": 0.4}, 0.3, {"Hallux Valgus"}),
        ({"Normal": 0.2, "Flatfoot": 0.5, "Foot Ulcer": 0.0, "Hallux Valgus": 0.3}, 0.3, {"Flatfoot", "Hallux Valgus"}),
        ({"Normal": 0.3, "Flatfoot": 0.2, "Foot Ulcer": 0.1, "Hallux Valgus": 0.4}, 0.5, {"Normal"}),
        ({"Normal": 0.1, "Flatfoot": 0.1, "Foot Ulcer": 0.5, "Hallux Valgus": 0.3}, 0.31, {"Foot Ulcer"}),
    ],
)
def test_the_reported_foot_findings_follow_one_rule(probabilities, threshold: float, expected: set[str]) -> None:
    assert reported_foot_findings(probabilities, threshold) == expected


def test_pixelmed_still_checks_the_bone_ages_properties(tmp_path: Path, monkeypatch) -> None:
    """The validator's wrapper sets aside PixelMed's reports of TID 310 items against TID 300's any-concept rows
    (tests/validators.py); TID 310 itself still judges them."""
    monkeypatch.setitem(hand_task.ASSESSMENTS, "within range", codes.PRESENT)  # not a CID 222 normality
    source, results = hand_compared()
    report(source, results).save_as(tmp_path / "report.dcm")
    [error] = sr_validator_errors(tmp_path / "report.dcm")
    assert "Template 310" in error and "not found in context group 222" in error


def test_a_report_made_again_names_the_one_it_supersedes(tmp_path: Path) -> None:
    source, results = foot_only()
    first = report(source, results)
    second = build_measurement_report(
        source,
        results,
        {},
        NODE,
        series_instance_uid=first.SeriesInstanceUID,
        series_number=9010,
        sop_instance_uid=generate_uid(),
        predecessors=[first],
    )
    [study] = second.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [instance] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (first.StudyInstanceUID, first.SeriesInstanceUID)
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        first.SOPClassUID,
        first.SOPInstanceUID,
    )
    assert "PredecessorDocumentsSequence" not in first
    second.save_as(tmp_path / "report.dcm")
    assert dciodvfy_errors(tmp_path / "report.dcm") == [], "the SR Document General module with its predecessors"


def _evaluations(group) -> dict[str, str]:
    return {item.name.meaning: item.value.meaning for item in group.get_qualitative_evaluations()}


def _read_back(sr: pydicom.Dataset, path: Path) -> list:
    sr.save_as(path)
    return highdicom.sr.srread(path).content.get_image_measurement_groups()


def test_the_anatomy_check_reports_what_the_image_shows_and_its_disagreement_with_the_tags(tmp_path: Path) -> None:
    source, results = foot_checked_against_hand_tags()
    sr = report(source, results, {("hallux_valgus", "foot"): [secondary_capture(source)]})
    check, *feet = _read_back(sr, tmp_path / "checked.dcm")
    assert len(feet) == 4 and check.tracking_identifier == "anatomy check"
    assert _evaluations(check) == {
        "Body part shown in the image": "Foot",
        "Agrees with the body part of the DICOM attributes": "No",
    }
    assert [site.value.meaning for site in check.finding_sites] == ["Foot"]
    assert _measurements(check) == {"Probability": (pytest.approx(0.97), "no units")}
    assert ("Algorithm Parameters", "followed the image on the disagreement") in _algorithm_rows(check)
    assert ("Algorithm Parameters", "ran hallux_valgus") in _algorithm_rows(check)
    untagged = anatomy_result("foot", "FOOT", None, ["hallux_valgus"])
    alone, _, _, _, _ = _read_back(report(source, [untagged, foot_result()]), tmp_path / "untagged.dcm")
    assert _evaluations(alone) == {"Body part shown in the image": "Foot"}, "no tags to agree with"
    unsure = anatomy_result("foot", "FOOT", ["bone_age"], ["bone_age"], followed="tags")
    [by_tags, *_] = _read_back(report(source, [unsure, *bone_age_results(True)]), tmp_path / "unsure.dcm")
    assert _evaluations(by_tags)["Agrees with the body part of the DICOM attributes"] == "No"
    assert ("Algorithm Parameters", "followed the tags on the disagreement") in _algorithm_rows(by_tags)
    [nothing] = _read_back(report(source, other_checked_against_hand_tags()[1]), tmp_path / "other.dcm")
    assert _evaluations(nothing)["Body part shown in the image"] == "Neither hand nor foot"
    assert not nothing.finding_sites
