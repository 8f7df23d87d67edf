"""Training and evaluation end to end on a few phantoms, model cards and the loading of outside weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from monai.networks.nets import DenseNet121
from PIL import Image

from dicom_node.cli import main
from dicom_node.phantoms import generate_phantoms
from inference.model_card import DEMO_DISCLAIMER, ModelLoadError, read_card, sha256_of
from inference.predict import Model, predict_anatomy, predict_bone_age, predict_hallux_valgus
from inference.training.datasets import DatasetError, read_examples


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, 12, seed=41, task="all")  # 4 hands, 4 feet, 4 other body parts
    return out


@pytest.fixture(scope="module")
def trained(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The three models after two training steps each at a small input size, logged to a temporary store; the foot
    and bone-age models as the demo ones are trained, with the finer heatmap grid and the localisation term."""
    work = tmp_path_factory.mktemp("training")
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    for task, options in (
        ("hallux-valgus", ["--feature-stride", "16", "--localisation-weight", "0.5"]),
        ("bone-age", ["--feature-stride", "16", "--localisation-weight", "0.5"]),
        ("anatomy", []),
    ):
        code = main(
            ["train", task, "--data", str(phantoms), "--out", str(work / "models"), "--epochs", "1", "--max-steps", "2"]
            + ["--batch-size", "4", "--input-size", "64", "--mlflow-uri", tracking, "--workers", "1", *options]
        )
        assert code == 0
    return work, tracking


def test_training_logs_runs_and_registers_models_in_mlflow(trained: tuple[Path, str]) -> None:
    work, tracking = trained
    mlflow.set_tracking_uri(tracking)
    client = MlflowClient()
    runs = mlflow.search_runs(experiment_names=["training"], output_format="list")
    assert len(runs) == 3
    for run in runs:
        small = run.data.tags["task"] == "anatomy"
        assert run.data.params["architecture"] == ("monai.DenseNet" if small else "monai.DenseNet121")
        assert run.data.params["input_size"] == "64"
        assert run.data.params["bf16"] == "False"
        assert "val_loss" in run.data.metrics and "train_loss" in run.data.metrics
        assert any(item.path == "card" for item in client.list_artifacts(run.info.run_id))
    foot_run = next(run for run in runs if run.data.tags["task"] == "hallux_valgus")
    assert foot_run.data.params["feature_stride"] == "16" and foot_run.data.params["localisation_weight"] == "0.5"
    assert int(foot_run.data.params["examples_with_finding_box"]) > 0
    hand_run = next(run for run in runs if run.data.tags["task"] == "bone_age")
    assert hand_run.data.params["heatmap"] == "weight_magnitude"
    assert int(hand_run.data.params["examples_with_finding_box"]) == 4, "each hand's wrist box"
    anatomy_run = next(run for run in runs if run.data.tags["task"] == "anatomy")
    assert "images of pydicom's test files as other" in anatomy_run.data.params["data"]
    names = {model.name for model in client.search_registered_models()}
    assert names == {"hallux-valgus-demo", "bone-age-demo", "anatomy-demo"}


def test_trained_cards_load_and_say_they_are_demo_models(trained: tuple[Path, str], phantoms: Path) -> None:
    models = trained[0] / "models"
    foot, hand = Model.load(models / "hallux-valgus-demo.yaml"), Model.load(models / "bone-age-demo.yaml")
    assert foot.card.demo and DEMO_DISCLAIMER in foot.card.disclaimer and DEMO_DISCLAIMER in foot.card.label
    assert "synthetic phantoms" in (models / "bone-age-demo.yaml").read_text()
    assert foot.weights_digest == sha256_of(models / "hallux-valgus-demo.pt")
    image = np.random.default_rng(0).random((300, 200)).astype(np.float32)
    [foot_result] = predict_hallux_valgus(foot, [image])
    assert sum(foot_result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert foot_result.heatmap.on_image().shape == (300, 200)
    assert foot.card.feature_stride == 16 and foot_result.heatmap.values.shape == (4, 4)  # 64 px / 16
    [estimates] = predict_bone_age(hand, [image])
    assert set(estimates) == {"M", "F"} and all(estimate.sigma_months > 0 for estimate in estimates.values())
    assert hand.card.heatmap == "weight_magnitude"
    anatomy = Model.load(models / "anatomy-demo.yaml")
    assert anatomy.card.layout is not None and anatomy.card.feature_stride == 16
    [check] = predict_anatomy(anatomy, [image])
    assert set(check.probabilities) == {"hand", "foot", "other"} and check.heatmap.values.shape == (4, 4)


def test_training_can_start_from_a_cards_weights(trained: tuple[Path, str], phantoms: Path) -> None:
    work, tracking = trained
    start = work / "models" / "anatomy-demo.yaml"
    out = work / "fine-tuned"
    code = main(
        ["train", "anatomy", "--data", str(phantoms), "--out", str(out), "--epochs", "1", "--max-steps", "1"]
        + ["--batch-size", "4", "--input-size", "64", "--mlflow-uri", tracking, "--workers", "1"]
        + ["--initial-card", str(start), "--version", "1.1.0"]
    )
    assert code == 0
    assert "fine-tuned from anatomy-demo 1.0.0" in read_card(out / "anatomy-demo.yaml").training_data
    wrong = main(
        ["train", "anatomy", "--data", str(phantoms), "--out", str(out), "--max-steps", "1", "--input-size", "64"]
        + ["--mlflow-uri", tracking, "--workers", "1", "--initial-card", str(work / "models" / "bone-age-demo.yaml")]
    )
    assert wrong == 2


def test_evaluate_writes_a_report_and_updates_the_cards(trained: tuple[Path, str], phantoms: Path) -> None:
    work, tracking = trained
    models = work / "models"
    report = models / "EVALUATION.md"
    code = main(
        ["evaluate", "--data", str(phantoms), "--foot-card", str(models / "hallux-valgus-demo.yaml")]
        + ["--hand-card", str(models / "bone-age-demo.yaml"), "--anatomy-card", str(models / "anatomy-demo.yaml")]
        + ["--out", str(report), "--update-cards"]
        + ["--mlflow-uri", tracking]
    )
    assert code == 0
    text = report.read_text()
    assert "not for clinical use" in text and "| hallux_valgus_recall |" in text
    assert (models / "evaluation" / "confusion_matrix.png").is_file()
    assert "| anatomy_accuracy |" in text and (models / "evaluation" / "anatomy_confusion_matrix.png").is_file()
    card = read_card(models / "bone-age-demo.yaml")
    assert "evaluation_bone_age_mae_months_male" in card.metrics
    assert "evaluation_hand_heatmap_empty_share" in card.metrics
    anatomy_metrics = read_card(models / "anatomy-demo.yaml").metrics
    assert {"evaluation_anatomy_accuracy", "evaluation_anatomy_other_recall"} <= set(anatomy_metrics)
    assert not any(key.startswith("evaluation_bone_age") for key in anatomy_metrics)
    assert Model.load(models / "bone-age-demo.yaml").card.metrics == card.metrics, "the card still loads"


def write_card(path: Path, weights_file: Path, **changes: object) -> Path:
    card = {
        "name": "seed-foot",
        "version": "0.1",
        "task": "hallux_valgus",
        "in_channels": 3,
        "input_size": 64,
        "outputs": ["Normal", "Flatfoot", "Foot Ulcer", "Hallux Valgus"],
        "weights": {"format": "state_dict", "path": weights_file.name, "sha256": sha256_of(weights_file)},
    }
    card.update(changes)
    path.write_text(yaml.safe_dump(card))
    return path


@pytest.fixture
def seed_weights(tmp_path: Path) -> Path:
    """A state dict as the hallux valgus seed project saved it: DenseNet121, RGB input, 4 classes, in a
    checkpoint of a DataParallel model."""
    network = DenseNet121(spatial_dims=2, in_channels=3, out_channels=4)
    state = {f"module.{key}": value for key, value in network.state_dict().items()}
    path = tmp_path / "monai_densenet_efficient.pth"
    torch.save({"model_state_dict": state, "epoch": 12}, path)
    return path


def test_a_seed_style_state_dict_loads_given_a_card(tmp_path: Path, seed_weights: Path) -> None:
    model = Model.load(write_card(tmp_path / "seed.yaml", seed_weights))
    [result] = predict_hallux_valgus(model, [np.zeros((100, 80), np.float32)])
    assert result.prediction in model.card.outputs


def test_a_wrong_checksum_is_a_clear_error(tmp_path: Path, seed_weights: Path) -> None:
    card = write_card(tmp_path / "seed.yaml", seed_weights)
    text = card.read_text().replace(sha256_of(seed_weights), "f" * 64)
    card.write_text(text)
    with pytest.raises(
        ModelLoadError,
        match=r"seed.yaml: weights monai_densenet_efficient.pth have sha256 [0-9a-f]{64}, the card says f{64}",
    ):
        Model.load(card)


def test_weights_of_another_shape_are_a_clear_error(tmp_path: Path, seed_weights: Path) -> None:
    card = write_card(tmp_path / "seed.yaml", seed_weights, in_channels=1)
    with pytest.raises(ModelLoadError, match="weights do not fit monai.DenseNet121 with in_channels=1 and 4 outputs"):
        Model.load(card)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"outputs": ["Normal", "Other"]}, "outputs must be"),
        ({"demo": True}, "disclaimer must say"),
        ({"input_size": 8}, "input_size"),
        ({"weights": {"format": "state_dict", "path": "x.pt"}}, "need a path and their sha256"),
    ],
)
def test_an_invalid_card_names_the_problem(tmp_path: Path, seed_weights: Path, change: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        Model.load(write_card(tmp_path / "bad.yaml", seed_weights, **change))


def test_the_rsna_layout_is_read(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for identifier in (1377, 1378):
        Image.fromarray((np.random.default_rng(identifier).random((40, 30)) * 255).astype(np.uint8)).save(
            tmp_path / "images" / f"{identifier}.png"
        )
    (tmp_path / "boneage-training-dataset.csv").write_text(
        "id,boneage,male\n1377,180,False\n1378,12,True\n1379,50,True\n"
    )
    examples = read_examples(tmp_path, "rsna", "bone_age")
    assert [(e.path.name, e.sex, e.bone_age_months) for e in examples] == [
        ("1377.png", "F", 180.0),
        ("1378.png", "M", 12.0),
    ]


def test_the_folders_layout_is_read_and_a_stray_folder_is_an_error(tmp_path: Path, phantoms: Path) -> None:
    feet = sorted(phantoms.glob("foot_*.dcm"))
    for folder, source in (("Normal", feet[0]), ("Foot_Ulcer", feet[1]), ("hallux valgus", feet[2])):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / source.name)
    classes = [example.foot_class for example in read_examples(tmp_path, "folders", "hallux_valgus")]
    assert sorted(classes) == [0, 2, 3]
    (tmp_path / "Gout").mkdir()
    with pytest.raises(DatasetError, match="Gout: not a class folder"):
        read_examples(tmp_path, "folders", "hallux_valgus")


def test_a_registered_mlflow_model_loads_through_a_card(trained: tuple[Path, str], tmp_path: Path) -> None:
    _, tracking = trained
    mlflow.set_tracking_uri(tracking)
    card = tmp_path / "registry.yaml"
    card.write_text(
        yaml.safe_dump(
            {
                "name": "from-registry",
                "version": "1",
                "task": "bone_age",
                "input_size": 64,
                "outputs": ["male_mean", "male_log_variance", "female_mean", "female_log_variance"],
                "weights": {"format": "mlflow", "uri": "models:/bone-age-demo/1"},
            }
        )
    )
    model = Model.load(card)
    assert model.cam_network is not None, "the registered network keeps the layers the heatmaps need"
    images = [np.random.default_rng(i).random((90, 70)).astype(np.float32) for i in range(3)]
    assert len(predict_bone_age(model, images)) == 3


def test_torchscript_weights_load_and_a_wrong_output_count_is_refused(tmp_path: Path) -> None:
    network = DenseNet121(spatial_dims=2, in_channels=1, out_channels=4).eval()
    scripted = tmp_path / "foot.ts"
    torch.jit.script(network).save(str(scripted))
    good = write_card(tmp_path / "ts.yaml", scripted, in_channels=1)
    text = good.read_text().replace("format: state_dict", "format: torchscript")
    good.write_text(text)
    [result] = predict_hallux_valgus(Model.load(good), [np.zeros((50, 50), np.float32)])
    assert result.prediction in ("Normal", "Flatfoot", "Foot Ulcer", "Hallux Valgus")

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(text.replace("- Hallux Valgus", "- Hallux Valgus\n- hallux_valgus_angle"))
    with pytest.raises(ModelLoadError, match=r"gives \(1, 4\) outputs, the card lists 5"):
        Model.load(wrong)
    wrapped = tmp_path / "wrapped.ts"  # not MONAI's layout: autograd Grad-CAM's, which has no magnitude map
    torch.jit.script(torch.nn.Sequential(network)).save(str(wrapped))
    magnitudes = write_card(tmp_path / "magnitudes.yaml", wrapped, in_channels=1, heatmap="weight_magnitude")
    magnitudes.write_text(magnitudes.read_text().replace("format: state_dict", "format: torchscript"))
    with pytest.raises(ModelLoadError, match="a weight_magnitude heatmap needs a network that ends in global"):
        Model.load(magnitudes)


def test_a_file_that_is_not_a_state_dict_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "weights.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="weights.pt is not a state_dict"):
        Model.load(write_card(tmp_path / "junk.yaml", junk))


def test_the_loaded_seed_weights_compute_what_the_original_network_did(tmp_path: Path) -> None:
    torch.manual_seed(7)
    original = DenseNet121(spatial_dims=2, in_channels=3, out_channels=4).eval()
    path = tmp_path / "seed.pth"
    torch.save({f"module.{k}": v for k, v in original.state_dict().items()}, path)
    model = Model.load(write_card(tmp_path / "seed.yaml", path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.network(x), original(x), atol=1e-5)


def test_classification_metrics_of_a_known_confusion() -> None:
    from inference.training.evaluate import classification_metrics, interval_coverage

    truth = np.array([0, 0, 1, 1, 2, 3, 3, 3])
    predicted = np.array([0, 1, 1, 1, 2, 3, 3, 0])
    metrics, confusion = classification_metrics(truth, predicted)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [1, 0, 0, 2]]
    assert metrics["hallux_valgus_accuracy"] == pytest.approx(6 / 8)
    assert metrics["hallux_valgus_recall"] == pytest.approx(2 / 3)
    assert metrics["hallux_valgus_precision"] == pytest.approx(1.0)
    assert metrics["normal_precision"] == pytest.approx(0.5)
    assert metrics["flatfoot_f1"] == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))
    assert interval_coverage(np.array([0.5, 1.0, 1.9, 2.5])) == pytest.approx(0.75)
