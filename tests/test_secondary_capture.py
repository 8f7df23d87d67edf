"""The Grad-CAM Secondary Capture: a valid SC image in the source's study, its picture, and its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_node.models import InferenceResult
from dicom_node.outputs.identity import NodeIdentity
from dicom_node.outputs.render import Picture
from dicom_node.outputs.secondary_capture import build_secondary_capture, caption, heatmap_picture
from dicom_node.outputs.uids import InstallationUids
from dicom_node.phantoms.foot import FOOT_EXTENT_MM, draw_foot
from dicom_node.phantoms.generator import render_phantom
from dicom_node.phantoms.hand import HAND_EXTENT_MM, draw_hand
from dicom_node.phantoms.radiograph import MAX_VALUE, Canvas, Exposure, Placement, expose
from dicom_node.synthetic import Demographics, dx_dataset
from inference.predict import Heatmap
from inference.preprocess import Letterbox
from tests.validators import dciodvfy_errors

ROWS, COLUMNS = 400, 300
PEAK_XY = (200, 120)  # where the test heatmaps peak, in source pixels: off the corners of the image
NODE = NodeIdentity("DICOMNODE", InstallationUids(secret=b"\x05" * 32))


def phantom(kind: str = "foot", *, monochrome1: bool = False) -> pydicom.Dataset:
    """A small phantom radiograph (ROWS x COLUMNS) of a foot with hallux valgus or of a 10-year-old's hand."""
    extent = FOOT_EXTENT_MM if kind == "foot" else HAND_EXTENT_MM
    spacing = (extent[1] - extent[0]) / (ROWS * 0.8)
    middle = (extent[0] + extent[1]) / 2
    canvas = Canvas(Placement(ROWS, COLUMNS, spacing, (COLUMNS / 2, ROWS / 2 + middle / spacing), 0.0, False))
    rng = np.random.default_rng(7)
    if kind == "foot":
        draw_foot(canvas, "Hallux Valgus", 1.0, rng)
    else:
        draw_hand(canvas, 120.0, "M", rng)
    pixels = expose(canvas, Exposure(1.0, 1.0, 1.0, (0.0, 0.0, 0.0, 0.0), "R"), rng)
    if monochrome1:
        pixels = (MAX_VALUE - pixels).astype(np.uint16)
    who = Demographics(patient_name="PHANTOM^TEST", sex="M", body_part=kind.upper(), view_position="AP")
    return dx_dataset(pixels, who, pixel_spacing_mm=round(spacing, 4), monochrome1=monochrome1)


def heatmap_peaking_at(x: float, y: float, rows: int = ROWS, columns: int = COLUMNS) -> Heatmap:
    """A Gaussian heatmap over a 224-pixel model input whose maximum lies on image pixel (x, y)."""
    box = Letterbox(rows, columns, 224)
    x0, y0, _, _ = box.inner
    yy, xx = np.mgrid[0:224, 0:224] + 0.5
    peak_x, peak_y = x0 + x * box.scale, y0 + y * box.scale
    return Heatmap(np.exp(-((xx - peak_x) ** 2 + (yy - peak_y) ** 2) / (2 * 12.0**2)).astype(np.float32), box)


def foot_result(*, demo: bool = False) -> InferenceResult:
    probabilities = {"Normal": 0.05, "Flatfoot": 0.03, "Foot Ulcer": 0.05, "Hallux Valgus": 0.87}
    values = {
        "probabilities": probabilities,
        "prediction": "Hallux Valgus",
        "confidence": 0.87,
        "hallux_valgus_detected": True,
        "threshold": 0.3,
        "hallux_valgus_angle_deg": 31.4,
        "heatmap_of": "Hallux Valgus",
        "heatmap_peak_xy": list(PEAK_XY),
    }
    return result_row("hallux_valgus", "foot", values, "hallux-valgus-demo" if demo else "hallux-valgus", demo)


def bone_age_result(*, demo: bool = False, output: str = "male") -> InferenceResult:
    values = {
        "sex": "M" if output == "male" else "F",
        "age_months": 122.4,
        "age_years": 10.2,
        "sigma_months": 9.6,
        "chronological_age_months": 114.0,
        "difference_months": 8.4,
        "z_score": 0.8,
        "assessment": "within range",
    }
    return result_row("bone_age", output, values, "bone-age-demo" if demo else "bone-age", demo)


def result_row(task: str, output: str, values: dict, model: str, demo: bool) -> InferenceResult:
    """A result as the inference job records it, not added to any session."""
    return InferenceResult(
        task=task,
        output=output,
        is_primary=True,
        summary="",
        values=values,
        heatmap_path="",
        model_name=model,
        model_version="1.0.0",
        weights_digest="0" * 64,
        demo_model=demo,
        timings_ms={},
    )


def build(source: pydicom.Dataset, result: InferenceResult, **options) -> pydicom.Dataset:
    return build_secondary_capture(
        source,
        heatmap_peaking_at(*PEAK_XY, source.Rows, source.Columns),
        result,
        NODE,
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        **options,
    )


def written(sc: pydicom.Dataset, tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    path = tmp_path / "sc.dcm"
    sc.save_as(path)
    return path, pydicom.dcmread(path)


@pytest.mark.parametrize(
    "kind, result, monochrome1",
    [
        ("foot", foot_result(), False),
        ("foot", foot_result(demo=True), False),
        ("foot", foot_result(), True),
        ("hand", bone_age_result(), False),
        ("hand", bone_age_result(demo=True, output="female"), True),
    ],
    ids=["foot", "foot-demo", "foot-monochrome1", "bone-age", "bone-age-demo-female-monochrome1"],
)
def test_the_written_file_passes_dciodvfy(
    kind: str, result: InferenceResult, monochrome1: bool, tmp_path: Path
) -> None:
    path, _ = written(build(phantom(kind, monochrome1=monochrome1), result), tmp_path)
    assert dciodvfy_errors(path) == []


def test_it_joins_the_source_study_in_a_new_series(tmp_path: Path) -> None:
    source = phantom()
    _, sc = written(build(source, foot_result()), tmp_path)
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "BodyPartExamined",
    ):
        assert sc[keyword].value == source[keyword].value, keyword
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID and sc.SeriesNumber == 901
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.SOPInstanceUID != source.SOPInstanceUID
    assert sc.Laterality == source.ImageLaterality and sc.PatientOrientation == source.PatientOrientation
    assert sc.SeriesDescription == "AI hallux valgus heatmap"


def test_it_says_how_it_was_derived_and_from_what(tmp_path: Path) -> None:
    source = phantom("hand")
    _, sc = written(build(source, bone_age_result(output="female")), tmp_path)
    assert sc.SeriesDescription == "AI bone age heatmap, female model"
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES" and sc.ConversionType == "WSD" and sc.LossyImageCompression == "00"
    assert "Grad-CAM heatmap of bone-age 1.0.0" in sc.DerivationDescription
    [reference] = sc.SourceImageSequence
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    [purpose] = reference.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    assert (sc.Manufacturer, sc.ManufacturerModelName, sc.SoftwareVersions) == (
        NODE.manufacturer,
        NODE.model_name,
        NODE.software_version,
    )


def test_contributing_equipment_names_the_model(tmp_path: Path) -> None:
    result = foot_result(demo=True)
    _, sc = written(build(phantom(), result), tmp_path)
    # highdicom adds an item of its own, naming itself as the software that wrote the object
    [model] = [item for item in sc.ContributingEquipmentSequence if item.ManufacturerModelName != "highdicom"]
    assert (model.ManufacturerModelName, model.SoftwareVersions) == (result.model_name, result.model_version)
    assert model.Manufacturer == NODE.manufacturer
    [purpose] = model.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert result.weights_digest in model.ContributionDescription and "synthetic" in model.ContributionDescription


@pytest.mark.parametrize("max_size", [512, 1024])
def test_the_image_is_rgb_and_no_larger_than_max_size(max_size: int, tmp_path: Path) -> None:
    _, sc = written(build(phantom(), foot_result(), max_size=max_size), tmp_path)
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert max(sc.Rows, sc.Columns) <= max_size
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)


def test_the_heatmap_is_red_at_its_peak_and_the_radiograph_gray_far_from_it(tmp_path: Path) -> None:
    source, result = phantom(), foot_result()
    picture = heatmap_picture(source, heatmap_peaking_at(*PEAK_XY), result, 1024)
    _, sc = written(build(source, result), tmp_path)
    pixels = sc.pixel_array.astype(int)
    assert np.array_equal(pixels, picture.pixels)
    x, y = picture.to_picture(*PEAK_XY, ROWS, COLUMNS)
    red, green, blue = pixels[y, x]
    assert red > green + 50 and red > blue + 50
    x0, y0, width, height = picture.radiograph_box
    for corner_x, corner_y in ((x0 + 2, y0 + 2), (x0 + width - 3, y0 + height - 3)):
        red, green, blue = pixels[corner_y, corner_x]
        assert red == green == blue


def test_a_monochrome1_source_gives_the_picture_of_its_monochrome2_twin() -> None:
    heatmap, result = heatmap_peaking_at(*PEAK_XY), foot_result()
    plain = heatmap_picture(phantom(), heatmap, result, 1024)
    inverted = heatmap_picture(phantom(monochrome1=True), heatmap, result, 1024)
    assert np.abs(plain.pixels.astype(int) - inverted.pixels.astype(int)).max() <= 1


def test_a_demo_model_adds_its_disclaimer_to_the_banner() -> None:
    source, heatmap = phantom(), heatmap_peaking_at(*PEAK_XY)
    real = heatmap_picture(source, heatmap, foot_result(), 1024)
    demo = heatmap_picture(source, heatmap, foot_result(demo=True), 1024)
    assert demo.radiograph_box[1] > real.radiograph_box[1], "the banner above the image grew"
    added_lines = demo.pixels[real.radiograph_box[1] : demo.radiograph_box[1]]
    assert warning_coloured(added_lines).any()
    assert warning_coloured(real.pixels[: real.radiograph_box[1]]).any()
    assert (
        caption(foot_result(demo=True)).warnings[1] == "DEMO MODEL: TRAINED ON SYNTHETIC PHANTOMS; NOT FOR CLINICAL USE"
    )


def warning_coloured(pixels: np.ndarray) -> np.ndarray:
    """Where ``pixels`` are the banner's yellow: red and green high, blue low."""
    red, green, blue = (pixels[..., channel].astype(int) for channel in range(3))
    return (red > 200) & (green > 150) & (blue < 80)


def test_the_result_is_in_words() -> None:
    foot = caption(foot_result())
    assert foot.warnings == ("AI RESULT - NOT FOR DIAGNOSTIC USE",)
    assert foot.lines[0] == "Hallux Valgus 87 %" and "Hallux valgus angle 31 deg" in foot.lines
    assert foot.legend == "Colours: Grad-CAM of Hallux Valgus"
    below = foot_result()
    below.values = below.values | {"hallux_valgus_detected": False, "threshold": 0.9}
    assert "Below the hallux valgus threshold 90 %: no abnormality reported" in caption(below).lines, "as the SR"
    assert not any(line.startswith("Below") for line in foot.lines)
    hand = caption(bone_age_result())
    assert hand.lines[0] == "Bone age 10.2 y +- 0.8 y (male model)"
    assert hand.lines[1] == "Chronological age 9.5 y, Z-score +0.8 (within range)"


def test_the_picture_keeps_the_peak_in_the_radiograph_area() -> None:
    picture: Picture = heatmap_picture(phantom(), heatmap_peaking_at(*PEAK_XY), foot_result(), 1024)
    x0, y0, width, height = picture.radiograph_box
    x, y = picture.to_picture(*PEAK_XY, ROWS, COLUMNS)
    assert x0 <= x < x0 + width and y0 <= y < y0 + height


def test_a_source_orientation_highdicom_cannot_take_is_copied_verbatim(tmp_path: Path) -> None:
    source = phantom()
    source.PatientOrientation = ["P", "FL"]
    path, sc = written(build(source, foot_result()), tmp_path)
    assert list(sc.PatientOrientation) == ["P", "FL"]
    assert dciodvfy_errors(path) == []


def test_a_lossy_source_keeps_its_lossy_history(tmp_path: Path) -> None:
    source = phantom()
    source.LossyImageCompression, source.LossyImageCompressionRatio = "01", 8.5
    source.LossyImageCompressionMethod = "ISO_10918_1"
    path, sc = written(build(source, foot_result()), tmp_path)
    assert (sc.LossyImageCompression, sc.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert dciodvfy_errors(path) == []


def test_a_source_without_pixel_data_is_refused() -> None:
    source = phantom()
    del source.PixelData
    with pytest.raises(ValueError, match="has no Pixel Data"):
        build(source, foot_result())


def test_a_heatmap_of_another_image_is_refused() -> None:
    source = phantom()
    with pytest.raises(ValueError, match="computed on an image of 300 x 400"):
        build_secondary_capture(
            source,
            heatmap_peaking_at(100, 100, rows=COLUMNS, columns=ROWS),
            foot_result(),
            NODE,
            series_instance_uid=generate_uid(),
            series_number=901,
            sop_instance_uid=generate_uid(),
        )


@pytest.mark.parametrize(
    "result, missing",
    [
        (foot_result(), "confidence"),
        (foot_result(), "hallux_valgus_detected"),
        (bone_age_result(), "sigma_months"),
    ],
)
def test_a_result_without_the_values_to_show_is_refused(result: InferenceResult, missing: str) -> None:
    result.values = {key: value for key, value in result.values.items() if key != missing}
    with pytest.raises(ValueError, match=f"result lack {missing}"):
        build(phantom(), result)


def test_a_result_that_does_not_say_whether_its_model_is_a_demo_is_refused() -> None:
    result = foot_result()
    result.demo_model = None
    with pytest.raises(ValueError, match="demo_model must be True or False"):
        build(phantom(), result)


def test_a_max_size_too_small_for_the_text_is_refused() -> None:
    with pytest.raises(ValueError, match="max_size must be at least 512"):
        build(phantom(), foot_result(), max_size=300)


RENDERINGS = Path(__file__).parent / "renderings"


@pytest.mark.parametrize(
    "kind, index, result, max_size, peak",
    [
        ("foot", 1, foot_result(demo=True), 1024, (900, 1300)),
        ("hand", 0, bone_age_result(demo=True, output="female"), 512, (700, 1500)),
    ],
    ids=["foot-1024", "hand-512"],
)
def test_the_picture_from_the_preview_matches_the_one_from_the_full_radiograph(
    kind: str, index: int, result: InferenceResult, max_size: int, peak: tuple[int, int]
) -> None:
    """The picture drawn as the node now draws it (the radiograph reduced before its grayscale pipeline, a preview
    at the picture's scale, the heatmap resized once) differs from the one drawn from the full-size radiograph and
    full-size heatmap before (``tests/renderings/*-d856f49.png``: ``heatmap_picture`` of commit d856f49 on the same
    phantom, heatmap and result) by less than one grey level on average, and has the same layout."""
    ds, _ = render_phantom(6000, index, kind)
    heatmap = heatmap_peaking_at(*peak, ds.Rows, ds.Columns)
    picture = heatmap_picture(ds, heatmap, result, max_size)
    before = np.asarray(Image.open(RENDERINGS / f"{kind}-sc-d856f49.png"))
    assert picture.pixels.shape == before.shape
    difference = np.abs(picture.pixels.astype(np.int16) - before)
    assert difference.mean() < 1.0
    x0, y0, width, height = picture.radiograph_box
    assert difference[y0 : y0 + height, x0 : x0 + width].mean() < 1.0
    difference[y0 : y0 + height, x0 : x0 + width] = 0
    assert not difference.any()  # the text and the legend as they were
