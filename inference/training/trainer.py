"""Training of the two models on MONAI DenseNet121, tracked in MLflow, ending in weights and a model card.

- hallux_valgus: 5 outputs, the logits of Normal, Flatfoot, Foot Ulcer and Hallux Valgus (cross-entropy)
  and the hallux valgus angle / 45 degrees (smooth L1, where the label has an angle). Where the labels give
  the finding's box, a localisation term asks the true class's activation map to lie in that box (the
  attention supervision of Li et al., "Tell me where to look", CVPR 2018), so that the heatmap shows the
  finding and not only what tells the classes apart in the training set.
- bone_age: one backbone with a head per sex, 4 outputs: mean and log-variance of the normalised bone age on
  the male and on the female scale (heteroscedastic Gaussian negative log-likelihood, each head trained on
  its sex's images). Skeletal maturity looks the same in both sexes; what differs is the age it stands for,
  so the heads share the features and one forward pass gives both sexes' readings.
  Its heatmap is the map of the heads' weight magnitudes (:func:`inference.cam.class_activation_maps`); with
  ``localisation_weight``, the localisation term asks it to lie in the wrist box of each hand phantom (carpal
  ossification centres and the distal radial and ulnar growth plates), where bone age shows.
- anatomy: 3 outputs, the logits of hand, foot and other (cross-entropy), on a small DenseNet
  (:data:`ANATOMY_LAYOUT`) that costs a fraction of a millisecond: it runs on every image.
A validation split (never the evaluation set) picks the best epoch and calibrates the bone-age sigmas.
``initial_card`` starts from the weights of a card of the same task (fine-tuning) instead of random ones.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import mlflow
import mlflow.pytorch
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from inference.cam import as_cam_network
from inference.model_card import (
    ANATOMY_CLASSES,
    BONE_AGE_OUTPUTS,
    DEMO_DISCLAIMER,
    HALLUX_VALGUS_ANGLE,
    HALLUX_VALGUS_CLASSES,
    LOG_VARIANCE_RANGE,
    DenseNetLayout,
    ModelCard,
    ModelLoadError,
    Preprocessing,
    TargetScaling,
    Weights,
    read_card,
    sha256_of,
)
from inference.networks import build_network, load_network
from inference.training.augment import augment
from inference.training.datasets import Example, TaskName, finding_masks

log = logging.getLogger(__name__)
_Z95 = NormalDist().inv_cdf(0.975)
# The anatomy check's network: 3 dense blocks of 2 layers on 16 features growing by 8, a 16-pixel heatmap grid
ANATOMY_LAYOUT = DenseNetLayout(init_features=16, growth_rate=8, block_config=(2, 2, 2))


@dataclass(frozen=True)
class TrainingOptions:
    input_size: int = 160
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    validation_fraction: float = 0.1
    seed: int = 0
    max_steps: int | None = None  # stop early (smoke tests)
    feature_stride: Literal[16, 32] = 32  # input pixels per heatmap cell; see inference.networks.densenet121
    localisation_weight: float = 0.0  # weight of the finding-box term (where the labels give boxes)
    initial_card: Path | None = None  # start from this card's weights (of the same task and outputs)
    # bfloat16 autocast pays only on CPUs with AVX512-BF16 or AMX; on an AVX2 CPU (AMD Zen 3) a DenseNet121
    # training step measured 8x slower than float32, so it is opt-in
    bf16: bool = False


@dataclass(frozen=True)
class TrainedModel:
    card_path: Path
    run_id: str
    validation: dict[str, float]


def outputs_of(task: TaskName, examples: list[Example]) -> list[str]:
    """The network's outputs; the angle only where the labels give angles to learn it from."""
    if task == "bone_age":
        return list(BONE_AGE_OUTPUTS)
    if task == "anatomy":
        return list(ANATOMY_CLASSES)
    with_angle = any(example.hallux_valgus_angle_deg is not None for example in examples)
    return [*HALLUX_VALGUS_CLASSES, HALLUX_VALGUS_ANGLE] if with_angle else list(HALLUX_VALGUS_CLASSES)


def train_model(
    task: TaskName,
    examples: list[Example],
    inputs: torch.Tensor,
    options: TrainingOptions,
    out_dir: Path,
    name: str,
    version: str,
    data_description: str,
    demo: bool,
) -> TrainedModel:
    """Train, pick the best epoch on the validation split, write ``<name>.pt`` and ``<name>.yaml`` to
    ``out_dir``, and log the run (params, per-epoch metrics, card and weights, registered model) to the
    active MLflow tracking URI."""
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    targets = _targets(task, examples)
    order = np.random.default_rng(options.seed).permutation(len(examples))
    n_validation = max(1, round(len(examples) * options.validation_fraction))
    validation, training = order[:n_validation], order[n_validation:]
    scaling, preprocessing = TargetScaling(), Preprocessing()
    layout = ANATOMY_LAYOUT if task == "anatomy" else None
    card = ModelCard(
        name=name,
        version=version,
        task=task,
        architecture="monai.DenseNet" if layout else "monai.DenseNet121",
        layout=layout,
        input_size=options.input_size,
        feature_stride=layout.feature_stride if layout else options.feature_stride,
        heatmap="weight_magnitude" if task == "bone_age" else "class_activation",
        preprocessing=preprocessing,
        outputs=outputs_of(task, examples),
        target_scaling=scaling,
        weights=Weights(format="state_dict", path=f"{name}.pt", sha256="0" * 64),  # written below
        demo=demo,
        disclaimer=DEMO_DISCLAIMER if demo else "",
    )
    network = build_network(card)
    initial = _initial_card(options.initial_card, card) if options.initial_card is not None else None
    if initial is not None:
        network.load_state_dict(load_network(initial, options.initial_card).state_dict())
    cam_network = as_cam_network(network)  # the same modules, also returning the last feature map
    masks = finding_masks(examples, options.input_size) if options.localisation_weight > 0 else None
    optimiser = torch.optim.AdamW(network.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    steps_per_epoch = max(1, len(training) // options.batch_size)
    total_steps = min(options.epochs * steps_per_epoch, options.max_steps or 10**9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, options.learning_rate, total_steps=total_steps)

    with mlflow.start_run(run_name=f"train {name} {version}") as run:
        mlflow.set_tags({"task": task, "demo": str(demo)})
        mlflow.log_params(
            {
                **asdict(options),
                "task": task,
                "architecture": card.architecture,
                "layout": str(card.layout.model_dump()) if card.layout else "DenseNet121",
                "heatmap": card.heatmap,
                "examples_training": len(training),
                "examples_validation": len(validation),
                "examples_with_finding_box": 0 if masks is None else int(masks.flatten(1).any(1).sum()),
                "data": data_description,
            }
        )
        best_loss, best_state, best_metrics, step = float("inf"), None, {}, 0
        for epoch in range(options.epochs):
            network.train()
            started, losses = time.perf_counter(), []
            for batch in np.array_split(
                np.random.default_rng([options.seed, epoch]).permutation(training), steps_per_epoch
            ):
                moved, moved_masks = augment(
                    inputs[batch].float(), generator, None if masks is None else masks[batch].float()
                )
                x = (moved - preprocessing.mean) / preprocessing.std
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=options.bf16):
                    out, feature_map = cam_network(x)
                batch_targets = {key: value[batch] for key, value in targets.items()}
                loss = _loss(task, out.float(), batch_targets, scaling)
                if moved_masks is not None:
                    loss = loss + options.localisation_weight * localisation_loss(
                        feature_map.float(),
                        _heatmap_weights(card, cam_network.head.weight, batch_targets),
                        moved_masks > 0.5,
                    )
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(loss.item())
                step += 1
                if step >= total_steps:
                    break
            metrics = _validate(
                task,
                network,
                inputs[validation],
                {k: v[validation] for k, v in targets.items()},
                options,
                scaling,
                preprocessing,
            )
            metrics.update(train_loss=float(np.mean(losses)), epoch_seconds=time.perf_counter() - started)
            mlflow.log_metrics(metrics, step=epoch)
            log.info("epoch %d: %s", epoch, {key: round(value, 4) for key, value in metrics.items()})
            if metrics["val_loss"] < best_loss:
                best_loss, best_state = (
                    metrics["val_loss"],
                    {k: v.detach().clone() for k, v in network.state_dict().items()},
                )
                best_metrics = metrics
            if step >= total_steps:
                break
        if best_state is None:
            raise RuntimeError("no epoch gave a finite validation loss")
        network.load_state_dict(best_state)
        network.eval()
        sigma_scale = (
            _calibrate_sigma(network, inputs[validation], targets, validation, options, scaling, preprocessing)
            if task == "bone_age"
            else 1.0
        )

        out_dir.mkdir(parents=True, exist_ok=True)
        weights_path = out_dir / f"{name}.pt"
        # float16 halves the file; loading casts back to float32, and predictions agree within 1e-3
        torch.save(
            {key: value.half() if value.is_floating_point() else value for key, value in network.state_dict().items()},
            weights_path,
        )
        started_from = f", fine-tuned from {initial.name} {initial.version}" if initial else ""
        card = card.model_copy(
            update={
                "sigma_scale": round(sigma_scale, 4),
                "weights": Weights(format="state_dict", path=weights_path.name, sha256=sha256_of(weights_path)),
                "training_data": f"{data_description}; trained {dt.date.today().isoformat()}{started_from}, "
                f"MLflow run {run.info.run_id}",
                "intended_use": _INTENDED_USE[task] + (f" Demo weights, {DEMO_DISCLAIMER}." if demo else ""),
                "limitations": _LIMITATIONS[task]
                + ([_LOCALISATION_LIMITATION] if masks is not None else [])
                + ([f"Demo model: {DEMO_DISCLAIMER}."] if demo else []),
                "metrics": {
                    f"validation_{key}": round(value, 4)
                    for key, value in best_metrics.items()
                    if key.startswith("val_")
                },
            }
        )
        card_path = out_dir / f"{name}.yaml"
        write_card(card, card_path)
        mlflow.log_metric("sigma_scale", sigma_scale)
        mlflow.log_artifact(str(card_path), artifact_path="card")
        mlflow.log_artifact(str(weights_path), artifact_path="card")
        # pickle, not pt2: an exported graph cannot go to eval mode, fixes its batch size and loses the
        # feature layers the heatmaps need; a card with weights: {format: mlflow} loads this one
        mlflow.pytorch.log_model(
            network.float(),
            name="model",
            registered_model_name=name,
            serialization_format="pickle",
            pip_requirements=["torch", "monai"],
        )
        return TrainedModel(card_path, run.info.run_id, best_metrics)


def write_card(card: ModelCard, path: Path) -> None:
    header = f"# Model card of {card.name} {card.version}\n"
    if card.demo:
        header += f"# DEMO MODEL: {DEMO_DISCLAIMER}.\n"
    path.write_text(header + yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False, width=110))


_INTENDED_USE = {
    "anatomy": "Checks what body part a radiograph shows (hand, foot or other) before the node's other models read "
    "it: routes images whose DICOM tags do not say, and flags those whose tags say otherwise.",
    "hallux_valgus": "Triage aid that flags dorsoplantar foot radiographs for Normal, Flatfoot, Foot Ulcer or Hallux "
    "Valgus, with a class activation map, for review by a radiologist.",
    "bone_age": "Bone-age estimate from a PA hand radiograph on the male and the female scale, with an uncertainty "
    "sigma and a heatmap of where the age is read (the map of the heads' weight magnitudes: a regression's class "
    "activation map is empty wherever the hand reads younger than the heads' bias), for review by a radiologist.",
}
_LIMITATIONS = {
    "anatomy": [
        "Three classes only: a hand, a foot, or anything else; it knows no view, side or other body part.",
        "It answers for every image; an image unlike its training data can get a confident wrong answer.",
    ],
    "hallux_valgus": [
        "One dorsoplantar view only; no lateral view, so flatfoot is judged from DP signs alone.",
        "The angle output is a regression, not a measurement between landmarks.",
    ],
    "bone_age": [
        "Children and adolescents only; meaningless once the growth plates have fused.",
        "Sigma is calibrated on a validation split of the training distribution only.",
    ],
}


_LOCALISATION_LIMITATION = (
    "The heatmap was trained to lie on the labelled finding boxes of the training images (localisation term): "
    "it shows where the model looks, it is not a segmentation, and on images unlike the training data it can "
    "look in the wrong place."
)


def _targets(task: TaskName, examples: list[Example]) -> dict[str, torch.Tensor]:
    if task == "anatomy":
        return {"class": torch.tensor([ANATOMY_CLASSES.index(example.anatomy) for example in examples])}
    if task == "hallux_valgus":
        angles = [example.hallux_valgus_angle_deg for example in examples]
        return {
            "class": torch.tensor([example.foot_class for example in examples]),
            "angle": torch.tensor([angle if angle is not None else 0.0 for angle in angles]),
            "has_angle": torch.tensor([angle is not None for angle in angles]),
        }
    return {
        "male": torch.tensor([example.sex == "M" for example in examples]),
        "age": torch.tensor([example.bone_age_months for example in examples], dtype=torch.float32),
    }


def _initial_card(card_path: Path, card: ModelCard) -> ModelCard:
    """The card at ``card_path``, checked to be of ``card``'s task, outputs and layout."""
    initial = read_card(card_path)
    if (initial.task, initial.outputs, initial.layout) != (card.task, card.outputs, card.layout):
        raise ModelLoadError(f"{card_path}: not a {card.task} model with the outputs {card.outputs}")
    return initial


def _heatmap_weights(card: ModelCard, head_weight: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weights (B x C) of each image's heatmap as inference makes it (of the card's kind): the true class's, or
    for a bone age its own sex's mean head's."""
    if card.task == "bone_age":
        weights = head_weight[torch.where(targets["male"], 0, 2)]
    else:
        weights = head_weight[targets["class"]]
    return weights.abs() if card.heatmap == "weight_magnitude" else weights


def localisation_loss(feature_map: torch.Tensor, weights: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """How far each image's heatmap (the feature map weighted by its row of ``weights``, B x C) is from lying
    inside its finding box.

    The map (B x h x w, before the ReLU of the CAM) becomes a distribution over cells by a softmax; the loss
    is minus the log of its mass on the cells whose centre lies in the box (``masks``: B x 1 x S x S, bool,
    over the S x S input). That is the pointing game made differentiable: the map's maximum falls on one of
    those cells once they hold most of the mass. A box too small to hold a cell centre counts the cells it
    overlaps. Images without a box (an all-false mask) do not count; with none, the loss is zero.
    """
    has_box = masks.flatten(1).any(1)
    if not has_box.any():
        return feature_map.sum() * 0.0
    feature_map, weights, masks = feature_map[has_box], weights[has_box], masks[has_box, 0]
    maps = torch.einsum("bchw,bc->bhw", feature_map, weights)
    (height, width), size = maps.shape[1:], masks.shape[-1]
    rows = ((torch.arange(height) + 0.5) * size / height).long()
    columns = ((torch.arange(width) + 0.5) * size / width).long()
    centres = masks[:, rows][:, :, columns]
    overlapped = F.adaptive_max_pool2d(masks[:, None].float(), (height, width))[:, 0] > 0
    inside = torch.where(centres.flatten(1).any(1)[:, None, None], centres, overlapped).flatten(1)
    log_share = torch.log_softmax(maps.flatten(1), dim=1).masked_fill(~inside, float("-inf"))
    return -torch.logsumexp(log_share, dim=1).mean()


def _head(out: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of each image's own sex's head."""
    mean = torch.where(male, out[:, 0], out[:, 2])
    log_variance = torch.where(male, out[:, 1], out[:, 3]).clamp(*LOG_VARIANCE_RANGE)
    return mean, log_variance


def _loss(task: TaskName, out: torch.Tensor, target: dict[str, torch.Tensor], scaling: TargetScaling) -> torch.Tensor:
    if task == "anatomy":
        return F.cross_entropy(out, target["class"])
    if task == "hallux_valgus":
        loss = F.cross_entropy(out[:, : len(HALLUX_VALGUS_CLASSES)], target["class"])
        if target["has_angle"].any() and out.shape[1] > len(HALLUX_VALGUS_CLASSES):
            angle = out[target["has_angle"], -1]
            loss = loss + 0.5 * F.smooth_l1_loss(angle, target["angle"][target["has_angle"]] / scaling.angle_scale_deg)
        return loss
    age = (target["age"] - scaling.age_center_months) / scaling.age_scale_months
    mean, log_variance = _head(out, target["male"])
    negative_log_likelihood = 0.5 * (log_variance + (age - mean) ** 2 * torch.exp(-log_variance))
    return (negative_log_likelihood + 0.1 * (age - mean) ** 2).mean()  # the squared term steadies early epochs


@torch.no_grad()
def _predict(network, inputs: torch.Tensor, options: TrainingOptions, preprocessing: Preprocessing) -> torch.Tensor:
    network.eval()
    outputs = []
    for start in range(0, len(inputs), 64):
        x = (inputs[start : start + 64].float() - preprocessing.mean) / preprocessing.std
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=options.bf16):
            outputs.append(network(x).float())
    return torch.cat(outputs)


def _validate(task, network, inputs, target, options, scaling, preprocessing) -> dict[str, float]:
    out = _predict(network, inputs, options, preprocessing)
    metrics = {"val_loss": float(_loss(task, out, target, scaling))}
    if task == "anatomy":
        metrics["val_accuracy"] = float((out.argmax(1) == target["class"]).float().mean())
    elif task == "hallux_valgus":
        predicted = out[:, : len(HALLUX_VALGUS_CLASSES)].argmax(1)
        metrics["val_accuracy"] = float((predicted == target["class"]).float().mean())
        hallux_valgus = target["class"] == HALLUX_VALGUS_CLASSES.index("Hallux Valgus")
        if hallux_valgus.any():
            metrics["val_hallux_valgus_recall"] = float(
                (predicted[hallux_valgus] == target["class"][hallux_valgus]).float().mean()
            )
    else:
        mean, _ = _head(out, target["male"])
        error = (mean * scaling.age_scale_months + scaling.age_center_months - target["age"]).abs()
        for sex, mask in (("male", target["male"]), ("female", ~target["male"])):
            if mask.any():
                metrics[f"val_mae_months_{sex}"] = float(error[mask].mean())
    return metrics


def _calibrate_sigma(network, inputs, targets, validation, options, scaling, preprocessing) -> float:
    """The factor that makes mean +- 1.96 sigma cover 95 % of the validation split."""
    out = _predict(network, inputs, options, preprocessing)
    male = targets["male"][validation]
    mean, log_variance = _head(out, male)
    age = (targets["age"][validation] - scaling.age_center_months) / scaling.age_scale_months
    z = ((age - mean).abs() / torch.exp(0.5 * log_variance)).numpy()
    return float(np.quantile(z, 0.95) / _Z95)
