"""The phantom generator: deterministic, realistic DICOM, and labels that agree with what was drawn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw

from dicom_node.phantoms import LABEL_COLUMNS, generate_phantoms, read_labels
from dicom_node.phantoms.foot import FOOT_CLASSES, draw_foot
from dicom_node.phantoms.generator import SIDE_RANGE, render_phantom
from dicom_node.phantoms.hand import CARPALS, FULL_MATURITY_MONTHS, draw_hand, maturity
from dicom_node.phantoms.radiograph import Canvas, Exposure, Placement, clear_of


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("phantoms")
    return out, generate_phantoms(out, 16, seed=3, task="both")


@pytest.mark.parametrize("kind", ["hand", "foot"])
def test_the_same_seed_and_index_give_the_same_instance(kind: str) -> None:
    first, first_label = render_phantom(5, 2, kind)
    again, again_label = render_phantom(5, 2, kind)
    other, _ = render_phantom(6, 2, kind)
    assert first.PixelData == again.PixelData and first_label == again_label
    assert (first.SOPInstanceUID, first.StudyInstanceUID) == (again.SOPInstanceUID, again.StudyInstanceUID)
    assert first.PixelData != other.PixelData and first.SOPInstanceUID != other.SOPInstanceUID


def test_a_larger_set_extends_a_smaller_one(tmp_path: Path) -> None:
    small = generate_phantoms(tmp_path / "small", 2, seed=12, task="foot")
    large = generate_phantoms(tmp_path / "large", 3, seed=12, task="foot")
    assert large[:2] == small
    assert (tmp_path / "small" / small[1].file).read_bytes() == (tmp_path / "large" / large[1].file).read_bytes()


def test_parallel_workers_write_the_same_set_as_one_process(tmp_path: Path) -> None:
    alone = generate_phantoms(tmp_path / "alone", 4, seed=13, task="both")
    parallel = generate_phantoms(tmp_path / "parallel", 4, seed=13, task="both", workers=2)
    assert parallel == alone
    assert (tmp_path / "parallel" / "labels.csv").read_bytes() == (tmp_path / "alone" / "labels.csv").read_bytes()
    for label in alone:
        assert (tmp_path / "parallel" / label.file).read_bytes() == (tmp_path / "alone" / label.file).read_bytes()


def test_files_and_labels_csv_agree(phantom_set) -> None:
    out, labels = phantom_set
    assert read_labels(out / "labels.csv") == labels
    assert (out / "labels.csv").read_text().splitlines()[0].split(",") == list(LABEL_COLUMNS)
    assert sorted(path.name for path in out.glob("*.dcm")) == sorted(label.file for label in labels)
    assert {label.task for label in labels} == {"hand", "foot"}


def test_files_are_realistic_dx_images(phantom_set) -> None:
    out, labels = phantom_set
    photometrics, windows = set(), 0
    for label in labels:
        ds = pydicom.dcmread(out / label.file)
        assert ds.Modality == "DX" and ds.BodyPartExamined == label.task.upper()
        assert ds.PatientID == label.patient_id and ds.PatientSex == label.sex
        for keyword in ("PatientName", "PatientBirthDate", "StudyDate", "ViewPosition", "PixelSpacing"):
            assert ds.get(keyword), keyword
        assert SIDE_RANGE[0] <= ds.Rows <= SIDE_RANGE[1] and SIDE_RANGE[0] <= ds.Columns <= SIDE_RANGE[1]
        assert ds.BitsStored == 12 and ds.pixel_array.max() <= 4095
        assert ds.PhotometricInterpretation == label.photometric_interpretation
        photometrics.add(ds.PhotometricInterpretation)
        windows += "WindowCenter" in ds
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert 0 < windows < len(labels)


def test_finding_boxes_lie_in_the_image_and_only_pathology_has_one(phantom_set) -> None:
    out, labels = phantom_set
    for label in labels:
        if label.foot_class == "Normal":
            assert label.finding_box is None
            continue
        ds = pydicom.dcmread(out / label.file, stop_before_pixels=True)
        x0, y0, x1, y1 = label.finding_box
        assert 0 <= x0 < x1 < ds.Columns and 0 <= y0 < y1 < ds.Rows


def test_the_collimator_never_covers_a_finding() -> None:
    exposure = Exposure(1.0, 1.0, 1.0, collimation=(0.3, 0.3, 0.3, 0.3), marker="R")
    cleared = clear_of(exposure, (100, 200, 900, 700), rows=1000, columns=1000)
    left, top, right, bottom = cleared.collimation
    assert left * 1000 <= 100 and top * 1000 <= 200 and (1 - right) * 1000 >= 900 and (1 - bottom) * 1000 >= 700
    assert clear_of(exposure, (400, 400, 600, 600), 1000, 1000).collimation == exposure.collimation


def canvas(rotation: float = 7.0, mirrored: bool = False) -> Canvas:
    return Canvas(Placement(2400, 1800, 0.15, (900.0, 1400.0), rotation, mirrored))


def principal_axis_deg(canvas: Canvas, name: str) -> float:
    """Orientation of a drawn bone, measured from its rasterised pixels (second moments)."""
    mask = Image.new("L", (canvas.placement.columns, canvas.placement.rows))
    ImageDraw.Draw(mask).polygon([tuple(p) for p in canvas.to_pixels(canvas.drawn_mm[name])], fill=1)
    ys, xs = np.nonzero(np.asarray(mask))
    covariance = np.cov(np.stack([xs, ys]))
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    x, y = eigenvectors[:, np.argmax(eigenvalues)]
    return float(np.degrees(np.arctan2(x, -y))) % 180


@pytest.mark.parametrize("foot_class", ["Hallux Valgus", "Normal", "Flatfoot"])
@pytest.mark.parametrize("mirrored", [False, True])
def test_hallux_valgus_angle_measured_from_the_drawn_bones_matches_the_label(foot_class: str, mirrored: bool) -> None:
    for seed in range(4):
        drawing = canvas(rotation=seed * 5 - 8, mirrored=mirrored)
        truth = draw_foot(drawing, foot_class, 1.0, np.random.default_rng(seed))
        difference = abs(principal_axis_deg(drawing, "hallux p1") - principal_axis_deg(drawing, "mt1")) % 180
        measured = min(difference, 180 - difference)  # between two axes, not directions
        assert measured == pytest.approx(truth.hallux_valgus_angle, abs=1.5)
        assert (truth.hallux_valgus_angle > 15) == (foot_class == "Hallux Valgus")


def test_every_foot_class_can_be_drawn_and_an_unknown_one_cannot() -> None:
    for foot_class in FOOT_CLASSES:
        draw_foot(canvas(), foot_class, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown foot class"):
        draw_foot(canvas(), "Gout", 1.0, np.random.default_rng(0))


def test_skeletal_maturity_advances_with_bone_age() -> None:
    truths = [draw_hand(canvas(), months, "F", np.random.default_rng(0)) for months in (12, 48, 96, 150, 180)]
    carpals = [len(truth.ossified_carpals) for truth in truths]
    assert carpals == sorted(carpals) and carpals[0] <= 2 and carpals[-1] == len(CARPALS)
    assert truths[0].fused_fraction == 0 and truths[-1].fused_fraction > 0.5
    assert truths[0].growth < truths[-1].growth


def test_girls_mature_earlier_so_the_same_hand_reads_younger_on_the_female_scale() -> None:
    girl = draw_hand(canvas(), 120, "F", np.random.default_rng(1))
    boy_same_age = draw_hand(canvas(), 120, "M", np.random.default_rng(1))
    boy_same_maturity = draw_hand(
        canvas(), 120 * FULL_MATURITY_MONTHS["M"] / FULL_MATURITY_MONTHS["F"], "M", np.random.default_rng(1)
    )
    assert maturity(120, "F") > maturity(120, "M")
    assert girl.maturity > boy_same_age.maturity
    assert girl.maturity == pytest.approx(boy_same_maturity.maturity)
    assert girl.ossified_carpals == boy_same_maturity.ossified_carpals


def test_phantoms_command_writes_the_set(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node.cli",
            "phantoms",
            "--out",
            tmp_path,
            "--n",
            "2",
            "--seed",
            "9",
            "--task",
            "hand",
            "--compress",
            "jpeg-ls",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "not patients" in result.stdout
    labels = read_labels(tmp_path / "labels.csv")
    assert [label.task for label in labels] == ["hand", "hand"]
    stored = pydicom.dcmread(tmp_path / labels[0].file)
    original, _ = render_phantom(9, 0, "hand")
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert np.array_equal(stored.pixel_array, original.pixel_array), "lossless"
