"""The pixel path and CAM: pure functions of inference/, on pydicom's files and on phantoms."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.networks.nets import DenseNet121
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

from dicom_node.phantoms.generator import render_phantom
from inference.cam import as_cam_network, autograd_grad_cam, class_activation_maps
from inference.pixels import _grayscale_pipeline, _native_values_from_file, radiograph_pixels, reduced, window
from inference.predict import Model, ModelInputs, _augmented_copies, predict_bone_age, predict_hallux_valgus
from inference.preprocess import Letterbox


def twins(index: int) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """A phantom and its twin with the same anatomy stored the other way round (MONOCHROME1 <-> 2)."""
    ds, _ = render_phantom(5, index, "foot")
    twin, _ = render_phantom(5, index, "foot")
    twin.PixelData = (4095 - twin.pixel_array).astype(np.uint16).tobytes()
    twin.PhotometricInterpretation = "MONOCHROME2" if ds.PhotometricInterpretation == "MONOCHROME1" else "MONOCHROME1"
    if "WindowCenter" in twin:
        twin.WindowCenter = 4095 - float(twin.WindowCenter)
    return ds, twin


@pytest.mark.parametrize("index", range(4))
def test_monochrome1_and_its_monochrome2_twin_give_the_same_pixels(index: int) -> None:
    ds, twin = twins(index)
    assert np.abs(radiograph_pixels(ds) - radiograph_pixels(twin)).max() < 2e-3


def test_linear_window_follows_the_standard() -> None:
    values = np.array([0.0, 1499.5, 1500.0, 2000.0, 2500.5, 4095.0])
    shown = window(values, center=2000.0, width=1001.0)
    assert shown[0] == 0 and shown[-1] == 1
    assert shown[3] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_pixels_of_other_kinds_of_image_land_in_zero_to_one(name: str) -> None:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not among the installed test files")
    pixels = radiograph_pixels(pydicom.dcmread(path))
    assert pixels.ndim == 2 and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() < pixels.max() <= 1.0


def test_letterbox_round_trip() -> None:
    box = Letterbox(rows=300, columns=150, size=64)
    x0, y0, width, height = box.inner
    assert (width, height) == (32, 64) and (x0, y0) == (16, 0)
    square = box.to_square(np.ones((300, 150), np.float32))
    assert square[:, :16].max() == 0 and square[:, 16:48].min() > 0.99
    assert box.to_image(np.ones((8, 8), np.float32)).shape == (300, 150)
    assert box.point_to_image(16, 0) == (0, 0)


def test_monochrome1_and_its_monochrome2_twin_get_the_same_prediction() -> None:
    model = Model.load(Path(__file__).resolve().parents[1] / "models" / "hallux-valgus-demo.yaml")
    for index in range(2):
        ds, twin = twins(index)
        [first], [second] = (predict_hallux_valgus(model, [radiograph_pixels(d)]) for d in (ds, twin))
        assert first.prediction == second.prediction
        assert first.probabilities == pytest.approx(second.probabilities, abs=1e-3)


def test_test_time_augmentation_adds_the_spread_of_its_passes_to_sigma() -> None:
    model = Model.load(Path(__file__).resolve().parents[1] / "models" / "bone-age-demo.yaml")
    hand, _ = render_phantom(5, 1, "hand")
    inputs = model.inputs([radiograph_pixels(hand)])
    [plain] = predict_bone_age(model, inputs)
    [augmented], [again] = (predict_bone_age(model, inputs, augmentations=4) for _ in range(2))
    # each pass on its own: the unvaried image and the four varied copies
    passes = [plain] + [
        predict_bone_age(model, ModelInputs(copy, inputs.letterboxes))[0]
        for copy in _augmented_copies(model, inputs.batch, 4)
    ]
    for sex in ("M", "F"):
        ages = np.array([one[sex].age_months for one in passes])
        sigmas = np.array([one[sex].sigma_months for one in passes])
        estimate = augmented[sex]
        assert plain[sex].augmentation_spread_months is None
        assert estimate.augmentation_spread_months == pytest.approx(ages.std(), rel=1e-4) and ages.std() > 0.1
        assert estimate.age_months == pytest.approx(ages.mean(), rel=1e-5)
        assert estimate.sigma_months == pytest.approx(np.sqrt(np.mean(sigmas**2) + ages.var()), rel=1e-4)
        assert (estimate.age_months, estimate.sigma_months) == (again[sex].age_months, again[sex].sigma_months)
        assert np.allclose(estimate.heatmap.values, plain[sex].heatmap.values, atol=1e-5)  # the unvaried pass


@pytest.mark.parametrize("index", range(6))
def test_the_lookup_table_gives_what_the_pipeline_gives_pixel_by_pixel(index: int) -> None:
    ds, twin = twins(index)  # with and without VOI windows, both photometric interpretations
    for each in (ds, twin):
        direct = _grayscale_pipeline(each.pixel_array, each, each.PhotometricInterpretation, each.pixel_array)
        assert np.abs(radiograph_pixels(each) - direct).max() < 1e-6


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtdose.dcm"])
def test_the_lookup_table_serves_signed_and_unsigned_files(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    stored = pixel_array(ds, index=0)
    direct = _grayscale_pipeline(stored, ds, str(ds.PhotometricInterpretation), stored)
    assert np.abs(radiograph_pixels(ds) - direct).max() < 1e-6


@pytest.mark.parametrize(
    ("case", "from_file"),
    [("12 bits", True), ("bits above Bits Stored", False), ("signed", False)],
)
def test_native_pixels_read_from_the_file_equal_pydicoms(tmp_path: Path, case: str, from_file: bool) -> None:
    ds, _ = twins(0)
    if case == "bits above Bits Stored":  # pydicom masks them; the values are read its way
        ds.PixelData = (ds.pixel_array | 0xF000).astype("<u2").tobytes()
    elif case == "signed":
        ds.PixelRepresentation = 1
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    whole = pydicom.dcmread(tmp_path / "x.dcm")
    deferred = pydicom.dcmread(tmp_path / "x.dcm", defer_size=1 << 16)
    assert (_native_values_from_file(deferred) is not None) == from_file
    np.testing.assert_array_equal(radiograph_pixels(deferred), radiograph_pixels(whole))


def test_cam_equals_autograd_grad_cam() -> None:
    torch.manual_seed(3)
    network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=4).eval()
    x = torch.randn(2, 1, 160, 160)
    cam_network = as_cam_network(network)
    with torch.no_grad():
        outputs, feature_map = cam_network(x)
        assert torch.allclose(outputs, network(x), atol=1e-5), "one pass gives the network's own outputs"
    compared = 0
    for output in range(4):
        weight = cam_network.head.weight.detach().numpy()
        ours = torch.from_numpy(class_activation_maps(feature_map.numpy(), weight, [output]))
        for i in range(2):
            reference = autograd_grad_cam(network, x[i : i + 1], output, "class_layers.relu")[0, 0]
            if reference.max() == 0:
                assert ours[i, 0].max() == 0
                continue
            correlation = torch.corrcoef(torch.stack([ours[i, 0].flatten(), reference.flatten()]))[0, 1]
            assert correlation >= 0.999
            compared += 1
    assert compared >= 4


def grayscale(values: np.ndarray, **attributes: object) -> pydicom.Dataset:
    """A minimal grayscale dataset holding ``values`` (uint16), with extra attributes."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = values.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if values.ndim == 3:
        ds.NumberOfFrames = values.shape[0]
    ds.PixelData = values.astype(np.uint16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_an_8_bit_voi_lut_longer_than_256_entries_is_applied_as_written() -> None:
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = [round(value * 255 / 4095) for value in range(4096)]
    values = np.array([[0, 1000, 2000, 4095]], np.uint16)
    shown = radiograph_pixels(grayscale(values, VOILUTSequence=[item]))
    assert shown[0] == pytest.approx([0.0, 0.244, 0.489, 1.0], abs=0.005)
    inverted = radiograph_pixels(grayscale(values, VOILUTSequence=[item], PhotometricInterpretation="MONOCHROME1"))
    assert inverted[0] == pytest.approx([1.0, 0.756, 0.511, 0.0], abs=0.005)


def test_sigmoid_and_linear_exact_windows() -> None:
    values = np.array([[1000, 2000, 3000]], np.uint16)
    sigmoid = radiograph_pixels(grayscale(values, WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID"))
    assert sigmoid[0, 1] == pytest.approx(0.5) and sigmoid[0, 0] < 0.05 and sigmoid[0, 2] > 0.95
    exact = radiograph_pixels(grayscale(values, WindowCenter=2000, WindowWidth=2000, VOILUTFunction="LINEAR_EXACT"))
    assert exact[0] == pytest.approx([0.0, 0.5, 1.0])


def test_the_modality_lut_comes_before_the_window() -> None:
    values = np.array([[500, 1000, 1500]], np.uint16)
    ds = grayscale(values, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2001)
    assert radiograph_pixels(ds)[0] == pytest.approx([0.0, 0.5, 1.0], abs=1e-3)  # 0, 1000, 2000 after rescale


def test_a_multi_frame_image_is_read_from_its_first_frame() -> None:
    frames = np.stack([np.full((4, 4), 100), np.full((4, 4), 4000)])
    frames[0, 0, 0] = 4000
    shown = radiograph_pixels(grayscale(frames, WindowCenter=2048, WindowWidth=4096))
    assert shown.shape == (4, 4) and shown[1, 1] < 0.1 and shown[0, 0] > 0.9


def test_a_heatmap_peak_maps_back_to_the_image() -> None:
    from inference.predict import Heatmap

    box = Letterbox(rows=400, columns=200, size=64)  # the image fills x 16..48 of the square
    values = np.zeros((8, 8), np.float32)
    values[1, 5] = 1.0  # square x 40..48, y 8..16: right part of the image, near the top
    x, y = Heatmap(values, box).peak()
    assert 120 <= x <= 200 and 25 <= y <= 125
    assert Heatmap(values, box).on_image().shape == (400, 200)


def test_an_instances_heatmaps_file_gives_each_map_by_name_and_an_older_single_map_file_is_read() -> None:
    import io

    from inference.predict import Heatmap, heatmap_from_bytes, heatmaps_to_bytes

    rng = np.random.default_rng(5)
    maps = {
        name: Heatmap(rng.random((6, 6)).astype(np.float32), Letterbox(300 + n, 200, 160))
        for n, name in enumerate(["bone_age-male", "bone_age-female"])
    }
    data = heatmaps_to_bytes(maps)
    for name, heatmap in maps.items():
        read = heatmap_from_bytes(data, name)
        assert read.letterbox == heatmap.letterbox
        np.testing.assert_allclose(read.values, heatmap.values, atol=1e-3)  # kept as float16
    with pytest.raises(KeyError):
        heatmap_from_bytes(data, "hallux_valgus-foot")
    older = io.BytesIO()  # one map a file, as nodes wrote them before
    np.savez(older, values=maps["bone_age-male"].values.astype(np.float16), letterbox=np.array([300, 200, 160]))
    assert heatmap_from_bytes(older.getvalue(), "bone_age-male").letterbox == Letterbox(300, 200, 160)


def test_inference_never_imports_the_node_or_the_web_app() -> None:
    import ast
    from pathlib import Path

    for path in Path(__file__).resolve().parents[1].joinpath("inference").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.split(".")[0] in ("dicom_node", "web") for name in names), f"{path}: {names}"


def test_a_reduction_averages_two_by_two_blocks_only_where_the_image_is_twice_the_size() -> None:
    values = np.array([[0, 1, 2, 3, 9], [4, 5, 6, 7, 9], [10, 10, 20, 20, 9]], np.uint16)
    np.testing.assert_array_equal(reduced(values, 2), np.array([[3, 5]], np.uint16))  # 10/4 rounds to 3, 18/4 to 5
    assert reduced(values, 3) is values, "5 pixels are not twice 3"
    signed = np.array([[-3, -4], [-4, -4]], np.int16)
    np.testing.assert_array_equal(reduced(signed, 1), np.array([[-4]], np.int16))  # -15/4 rounds to -4


def test_a_reduced_radiograph_gives_the_letterbox_and_the_inputs_of_the_full_one() -> None:
    ds, _ = render_phantom(6000, 1, "foot")
    full, half = radiograph_pixels(ds), radiograph_pixels(ds, reduce_to=1024)
    assert half.shape == (ds.Rows // 2, ds.Columns // 2)
    model = Model.load(Path(__file__).resolve().parents[1] / "models" / "hallux-valgus-demo.yaml")
    from_full, from_half = model.inputs([full]), model.inputs([half], [(ds.Rows, ds.Columns)])
    assert from_half.letterboxes == from_full.letterboxes == [Letterbox(ds.Rows, ds.Columns, model.card.input_size)]
    assert np.abs(from_half.batch - from_full.batch).mean() < 0.01 * np.ptp(from_full.batch)


def test_a_regressions_weight_magnitude_map_is_not_empty_where_its_cam_is() -> None:
    feature_map = np.zeros((1, 2, 3, 3), np.float32)
    feature_map[0, 0, 0, 0], feature_map[0, 1, 2, 2] = 1.0, 3.0  # the output reads channel 1 against its sign
    weights = np.array([[0.5, -1.0]], np.float32)
    only_against = feature_map.copy()
    only_against[0, 0] = 0.0  # only the channel the output reads with a negative weight is active
    [[reads_below]] = class_activation_maps(only_against, weights, [0])
    assert reads_below.max() == 0.0, "a CAM of a value read below the bias is empty"
    [[magnitude]] = class_activation_maps(only_against, weights, [0], weight_magnitude=True)
    assert magnitude.max() == 1.0 and np.unravel_index(magnitude.argmax(), magnitude.shape) == (2, 2)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architecture": "monai.DenseNet"}, "a monai.DenseNet card gives its layout"),
        ({"layout": {"block_config": [2, 2, 2]}}, "a monai.DenseNet card gives its layout"),
        (
            {"architecture": "monai.DenseNet", "layout": {"block_config": [2, 2, 2]}, "feature_stride": 32},
            "feature_stride must be 16: the layout has 3 dense blocks",
        ),
        ({"task": "anatomy", "outputs": ["hand", "foot"]}, "anatomy outputs must be ['hand', 'foot', 'other']"),
    ],
)
def test_a_card_whose_network_cannot_be_built_is_refused_with_the_reason(changes: dict, message: str) -> None:
    from inference.model_card import ModelCard

    card = {
        "name": "check",
        "version": "1",
        "task": "anatomy",
        "input_size": 96,
        "feature_stride": 16,
        "outputs": ["hand", "foot", "other"],
        "weights": {"format": "state_dict", "path": "check.pt", "sha256": "0" * 64},
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelCard.model_validate(card | changes)


def test_a_small_densenet_card_builds_its_network_with_the_declared_heatmap_grid() -> None:
    from inference.model_card import ModelCard
    from inference.networks import build_network

    card = ModelCard(
        name="check",
        version="1",
        task="anatomy",
        architecture="monai.DenseNet",
        layout={"init_features": 16, "growth_rate": 8, "block_config": (2, 2, 2)},
        input_size=96,
        feature_stride=16,
        outputs=["hand", "foot", "other"],
        weights={"format": "state_dict", "path": "check.pt", "sha256": "0" * 64},
    )
    network = as_cam_network(build_network(card).eval())
    with torch.no_grad():
        outputs, feature_map = network(torch.zeros(1, 1, 96, 96))
    assert outputs.shape == (1, 3) and feature_map.shape[-2:] == (6, 6)
