"""The optimised runtime (ONNX Runtime on a graph exported from the same weights) agrees with PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from dicom_node.phantoms import generate_phantoms, read_labels
from inference.model_card import ModelLoadError
from inference.pixels import radiograph_pixels
from inference.predict import Model, predict_bone_age, predict_hallux_valgus

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[np.ndarray]]:
    out = tmp_path_factory.mktemp("phantoms")
    labels = generate_phantoms(out, 6, seed=93, task="both")
    by_task: dict[str, list[np.ndarray]] = {"hand": [], "foot": []}
    for label in read_labels(out / "labels.csv"):
        by_task[label.task].append(radiograph_pixels(pydicom.dcmread(out / label.file)))
    assert len(labels) == 6
    return by_task


@pytest.mark.parametrize("card", ["hallux-valgus-demo.yaml", "bone-age-demo.yaml"])
def test_onnx_runtime_gives_the_outputs_and_heatmaps_of_pytorch(card: str, images, tmp_path: Path) -> None:
    reference = Model.load(MODELS / card, "torch")
    optimised = Model.load(MODELS / card, "onnxruntime", cache_dir=tmp_path)
    batch, _ = reference.inputs(images["foot"] + images["hand"])  # both models see both kinds: the work is the same
    expected_outputs, expected_maps = reference.run(batch, [0, 1])
    outputs, maps = optimised.run(batch, [0, 1])
    np.testing.assert_allclose(outputs, expected_outputs, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(maps, expected_maps, atol=1e-3)


def test_the_predictions_agree_and_the_exported_graph_is_reused(images, tmp_path: Path) -> None:
    torch_foot = Model.load(MODELS / "hallux-valgus-demo.yaml", "torch")
    onnx_foot = Model.load(MODELS / "hallux-valgus-demo.yaml", "onnxruntime", cache_dir=tmp_path)
    [graph] = tmp_path.glob("hallux-valgus-demo-*.onnx")
    exported = graph.stat().st_mtime_ns
    for expected, result in zip(
        predict_hallux_valgus(torch_foot, images["foot"]), predict_hallux_valgus(onnx_foot, images["foot"]), strict=True
    ):
        assert result.prediction == expected.prediction
        assert result.probabilities == pytest.approx(expected.probabilities, abs=1e-4)
    Model.load(MODELS / "hallux-valgus-demo.yaml", "onnxruntime", cache_dir=tmp_path)
    assert graph.stat().st_mtime_ns == exported, "loaded from the cache, not exported again"

    torch_hand = Model.load(MODELS / "bone-age-demo.yaml", "torch")
    onnx_hand = Model.load(MODELS / "bone-age-demo.yaml", "onnxruntime", cache_dir=tmp_path)
    for expected, result in zip(
        predict_bone_age(torch_hand, images["hand"]), predict_bone_age(onnx_hand, images["hand"]), strict=True
    ):
        for sex in ("M", "F"):
            assert result[sex].age_months == pytest.approx(expected[sex].age_months, abs=0.05)
            assert result[sex].sigma_months == pytest.approx(expected[sex].sigma_months, abs=0.05)


def test_a_damaged_cached_graph_is_exported_again(images, tmp_path: Path) -> None:
    Model.load(MODELS / "bone-age-demo.yaml", "onnxruntime", cache_dir=tmp_path)
    [graph] = tmp_path.glob("*.onnx")
    graph.write_bytes(graph.read_bytes()[:1000])  # cut short, as by a crash of an older version without fsync
    model = Model.load(MODELS / "bone-age-demo.yaml", "onnxruntime", cache_dir=tmp_path)
    assert graph.stat().st_size > 1_000_000 and len(predict_bone_age(model, images["hand"][:1])) == 1


def test_an_unusable_cache_is_a_model_load_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelLoadError, match=r"bone-age-demo.yaml: cannot run on onnxruntime: "):
        Model.load(MODELS / "bone-age-demo.yaml", "onnxruntime", cache_dir=blocker / "onnx")


def test_the_cache_key_follows_what_shapes_the_graph(tmp_path: Path) -> None:
    card = yaml.safe_load((MODELS / "hallux-valgus-demo.yaml").read_text())
    (tmp_path / card["weights"]["path"]).symlink_to(MODELS / card["weights"]["path"])
    names = set()
    for stride in (16, 32):
        path = tmp_path / f"stride{stride}.yaml"
        path.write_text(yaml.safe_dump({**card, "feature_stride": stride}))
        Model.load(path, "onnxruntime", cache_dir=tmp_path / "cache")
        names = {graph.name for graph in (tmp_path / "cache").glob("*.onnx")}
    assert len(names) == 2, "another heatmap grid is another graph"
