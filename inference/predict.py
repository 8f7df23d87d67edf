"""Predictions and heatmaps of the three models from radiograph pixels.

- Anatomy: probabilities of hand, foot and other, the most probable one and its CAM.
- Foot: probabilities of Normal, Flatfoot, Foot Ulcer and Hallux Valgus, the predicted class, and
  ``hallux_valgus_detected`` when the Hallux Valgus probability reaches a threshold (set low for recall),
  the hallux valgus angle when the model has that output, and the CAM of the predicted class.
  :func:`reported_foot_findings` turns the probabilities into the findings the node reports, by one rule.
- Hand: bone age from the male and from the female head of the bone-age model, each with its sigma (the
  model's predicted log-variance, times the card's calibration factor) and the heatmap of its mean output (of
  the kind the card names: see :func:`inference.cam.class_activation_maps`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from inference.cam import CamNetwork, as_cam_network, autograd_grad_cam, class_activation_maps
from inference.model_card import (
    ANATOMY_CLASSES,
    DEFAULT_HALLUX_VALGUS_THRESHOLD,
    HALLUX_VALGUS_ANGLE,
    HALLUX_VALGUS_CLASSES,
    LOG_VARIANCE_RANGE,
    ModelCard,
    ModelLoadError,
    read_card,
)
from inference.networks import load_network, state_dict_digest
from inference.preprocess import Letterbox, model_input
from inference.runtime import OnnxRunner, Runner, RuntimeName, TorchRunner
from inference.training.augment import augment

AUGMENTATION_SEED = 20261123


@dataclass(frozen=True)
class Heatmap:
    """A CAM over the model's square input, and where the image lies in that square."""

    values: np.ndarray  # h x w, in [0, 1]
    letterbox: Letterbox

    def on_image(self) -> np.ndarray:
        """The heatmap resized onto the original image (rows x columns)."""
        return self.resized(self.letterbox.columns, self.letterbox.rows)

    def resized(self, width: int, height: int) -> np.ndarray:
        """The heatmap over the original image, resized to ``width`` x ``height`` (a scaled copy of the image):
        made at the size it is shown at, never at the full size of a radiograph first."""
        return np.clip(self.letterbox.to_image(_upsample(self.values, self.letterbox.size), (width, height)), 0.0, 1.0)

    def peak(self) -> tuple[float, float]:
        """(x, y) in image pixels of the heatmap's maximum within the image (not the padding)."""
        upsampled = _upsample(self.values, self.letterbox.size)
        x0, y0, width, height = self.letterbox.inner
        inside = upsampled[y0 : y0 + height, x0 : x0 + width]
        y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)
        return self.letterbox.point_to_image(x + x0 + 0.5, y + y0 + 0.5)

    def peak_or_none(self) -> list[float] | None:
        """:meth:`peak` as a list, or None for an empty map, which points nowhere."""
        return list(self.peak()) if self.values.max() > 0 else None


def heatmaps_to_bytes(heatmaps: Mapping[str, Heatmap]) -> bytes:
    """Named heatmaps and their placements as one ``.npz`` file's bytes (a few hundred bytes a map): an instance's
    maps go to disk as one file, which is one write to make durable."""
    arrays = {}
    for name, heatmap in heatmaps.items():
        box = heatmap.letterbox
        arrays[f"{name}.values"] = heatmap.values.astype(np.float16)
        arrays[f"{name}.letterbox"] = np.array([box.rows, box.columns, box.size])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def heatmap_from_bytes(data: bytes, name: str) -> Heatmap:
    """The heatmap ``name`` of a file written by :func:`heatmaps_to_bytes`, or the one map of a file of a single
    heatmap (as nodes wrote before heatmaps were kept by instance); KeyError when it holds none of that name."""
    with np.load(io.BytesIO(data)) as stored:
        prefix = "" if "values" in stored else f"{name}."
        rows, columns, size = (int(value) for value in stored[f"{prefix}letterbox"])
        return Heatmap(stored[f"{prefix}values"].astype(np.float32), Letterbox(rows, columns, size))


@dataclass(frozen=True)
class HalluxValgusResult:
    probabilities: dict[str, float]
    prediction: str
    confidence: float
    hallux_valgus_detected: bool
    hallux_valgus_angle_deg: float | None
    heatmaps: dict[str, Heatmap]  # the CAM of every class, from the same pass

    @property
    def heatmap(self) -> Heatmap:
        """The predicted class's CAM: what the result shows."""
        return self.heatmaps[self.prediction]


@dataclass(frozen=True)
class BoneAgeEstimate:
    sex: Literal["M", "F"]
    age_months: float
    sigma_months: float
    heatmap: Heatmap
    augmentation_spread_months: float | None = None  # SD of the mean over test-time augmentation passes

    @property
    def age_years(self) -> float:
        return self.age_months / 12.0


class ModelInputs(NamedTuple):
    """A batch of model inputs (float32, B x channels x S x S) and where each image lies in its square."""

    batch: np.ndarray
    letterboxes: list[Letterbox]

    @classmethod
    def concatenate(cls, parts: list[ModelInputs]) -> ModelInputs:
        return cls(np.concatenate([part.batch for part in parts]), [box for part in parts for box in part.letterboxes])


Images = list[np.ndarray | Image.Image] | ModelInputs  # [0, 1] images, or the inputs a model made of them


@dataclass
class Model:
    """A loaded model: its card, its network, the digest of its weights, and the runner that computes it."""

    card: ModelCard
    network: torch.nn.Module
    cam_network: CamNetwork | None
    weights_digest: str
    runner: Runner | None  # None: a network that is not GAP + linear, run by autograd Grad-CAM

    @functools.cached_property
    def head_weight(self) -> np.ndarray:
        """The linear layer's weights (outputs x channels), for the CAMs."""
        return self.cam_network.head.weight.detach().numpy().astype(np.float32)

    @classmethod
    def load(
        cls, card_path: Path, runtime: RuntimeName = "torch", cache_dir: Path | None = None, threads: int = 0
    ) -> Model:
        """Load and check a card's network; ``runtime`` onnxruntime exports it once into ``cache_dir``."""
        card = read_card(card_path)
        return cls.of_network(card, load_network(card, card_path), card_path, runtime, cache_dir, threads)

    @classmethod
    def of_network(
        cls,
        card: ModelCard,
        network: torch.nn.Module,
        card_path: Path,
        runtime: RuntimeName = "torch",
        cache_dir: Path | None = None,
        threads: int = 0,
    ) -> Model:
        """The model of a checked card and its loaded network (:func:`inference.networks.load_network`)."""
        # load_network verified a weights file against the card's digest; an MLflow model has only a URI,
        # which may name other weights tomorrow, so its digest is that of the weights loaded now
        digest = card.weights.sha256 or state_dict_digest(network)
        cam_network = as_cam_network(network)
        if cam_network is None and card.heatmap == "weight_magnitude":  # autograd Grad-CAM has no such map
            raise ModelLoadError(
                f"{card_path}: a weight_magnitude heatmap needs a network that ends in global average pooling and "
                "one linear layer"
            )
        runner: Runner | None = None
        if cam_network is not None and runtime == "onnxruntime":
            key = f"{digest}:{card.in_channels}:{card.input_size}:{card.feature_stride}:{torch.__version__}"
            graph = (cache_dir or Path(tempfile.mkdtemp(prefix="dicom-node-onnx-"))) / (
                f"{card.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"
            )
            try:
                runner = OnnxRunner(cam_network, card.in_channels, card.input_size, graph, threads)
            except Exception as error:  # an unwritable cache, a broken export or session: the node cannot serve
                raise ModelLoadError(
                    f"{card_path}: cannot run on onnxruntime: {type(error).__name__}: {error}"
                ) from None
        elif cam_network is not None:
            runner = TorchRunner(cam_network, threads)
        return cls(card, network, cam_network, digest, runner)

    def inputs(
        self, images: list[np.ndarray | Image.Image], shapes: list[tuple[int, int]] | None = None
    ) -> ModelInputs:
        """The inputs of [0, 1] images (float32 arrays or their :func:`inference.preprocess.as_picture`); ``shapes``:
        (rows, columns) of the full-size images, where ``images`` are reduced copies of them."""
        preprocessing = self.card.preprocessing
        prepared = [
            model_input(image, self.card.input_size, preprocessing.mean, preprocessing.std, shape)
            for image, shape in zip(images, shapes or [None] * len(images), strict=True)
        ]
        batch = np.stack([square for square, _ in prepared])[:, None]
        batch = np.ascontiguousarray(np.repeat(batch, self.card.in_channels, axis=1))
        return ModelInputs(batch, [box for _, box in prepared])

    def run(self, batch: np.ndarray, heatmap_outputs: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Outputs (B x K) and heatmaps of ``heatmap_outputs`` (B x len x h x w), of the card's kind, in one forward
        pass when the network ends in GAP + linear, else by autograd Grad-CAM on its last feature layer."""
        if self.runner is not None:
            outputs, feature_map = self.runner(batch)
            magnitude = self.card.heatmap == "weight_magnitude"
            return outputs, class_activation_maps(feature_map, self.head_weight, heatmap_outputs, magnitude)
        if not hasattr(self.network, "class_layers"):
            raise ModelLoadError(f"{self.card.name}: no feature layer to compute Grad-CAM on")
        x = torch.from_numpy(batch)
        with torch.no_grad():
            outputs = self.network(x)
        maps = torch.cat(
            [
                torch.cat(
                    [autograd_grad_cam(self.network, x[i : i + 1], k, "class_layers.relu") for k in heatmap_outputs],
                    1,
                )
                for i in range(len(x))
            ]
        )
        return outputs.float().numpy(), maps.float().numpy()


def predict_hallux_valgus(
    model: Model, images: Images, threshold: float = DEFAULT_HALLUX_VALGUS_THRESHOLD
) -> list[HalluxValgusResult]:
    batch, boxes = _inputs(model, images)
    # The CAMs of all four classes come from the same pass; each image shows its predicted class's.
    outputs, maps = model.run(batch, list(range(len(HALLUX_VALGUS_CLASSES))))
    probabilities = _softmax(outputs[:, : len(HALLUX_VALGUS_CLASSES)])
    predicted = probabilities.argmax(axis=1)
    has_angle = HALLUX_VALGUS_ANGLE in model.card.outputs
    angle_index = model.card.outputs.index(HALLUX_VALGUS_ANGLE) if has_angle else None
    hallux_valgus = HALLUX_VALGUS_CLASSES.index("Hallux Valgus")
    results = []
    for i, box in enumerate(boxes):
        angle = float(outputs[i, angle_index]) * model.card.target_scaling.angle_scale_deg if has_angle else None
        results.append(
            HalluxValgusResult(
                probabilities={name: float(p) for name, p in zip(HALLUX_VALGUS_CLASSES, probabilities[i], strict=True)},
                prediction=HALLUX_VALGUS_CLASSES[predicted[i]],
                confidence=float(probabilities[i, predicted[i]]),
                hallux_valgus_detected=bool(probabilities[i, hallux_valgus] >= threshold),
                hallux_valgus_angle_deg=angle,
                heatmaps={name: Heatmap(maps[i, k], box) for k, name in enumerate(HALLUX_VALGUS_CLASSES)},
            )
        )
    return results


@dataclass(frozen=True)
class AnatomyResult:
    """What body part an image shows: the probability of each class, the most probable one and its CAM."""

    probabilities: dict[str, float]
    prediction: str
    confidence: float
    heatmap: Heatmap


def predict_anatomy(model: Model, images: Images) -> list[AnatomyResult]:
    batch, boxes = _inputs(model, images)
    outputs, maps = model.run(batch, list(range(len(ANATOMY_CLASSES))))
    probabilities = _softmax(outputs[:, : len(ANATOMY_CLASSES)])
    results = []
    for i, box in enumerate(boxes):
        k = int(probabilities[i].argmax())
        results.append(
            AnatomyResult(
                probabilities={name: float(p) for name, p in zip(ANATOMY_CLASSES, probabilities[i], strict=True)},
                prediction=ANATOMY_CLASSES[k],
                confidence=float(probabilities[i, k]),
                heatmap=Heatmap(maps[i, k], box),
            )
        )
    return results


def reported_foot_findings(probabilities: Mapping[str, float], threshold: float) -> frozenset[str]:
    """The foot classes the node reports present, by one rule that cannot contradict itself:

    - Hallux Valgus when its probability reaches ``threshold`` (set low for recall);
    - Flatfoot or Foot Ulcer when it is the most probable class;
    - Normal when neither gives a finding: never beside an abnormal class.

    Raises ValueError when ``probabilities`` does not name exactly the model's four classes.
    """
    if set(probabilities) != set(HALLUX_VALGUS_CLASSES):
        raise ValueError(f"foot probabilities must name {list(HALLUX_VALGUS_CLASSES)}, got {sorted(probabilities)}")
    findings = {"Hallux Valgus"} if probabilities["Hallux Valgus"] >= threshold else set()
    most_probable = max(HALLUX_VALGUS_CLASSES, key=probabilities.__getitem__)
    if most_probable not in ("Normal", "Hallux Valgus"):
        findings.add(most_probable)
    return frozenset(findings or {"Normal"})


def predict_bone_age(model: Model, images: Images, augmentations: int = 0) -> list[dict[str, BoneAgeEstimate]]:
    """For each image, the estimates of both sexes' heads: ``{"M": ..., "F": ...}``.

    With ``augmentations`` > 0 (test-time augmentation), each image also runs that many times varied as in
    training (:func:`inference.training.augment.augment`, the same draws on every call). The age is then the
    mean over all passes and the sigma adds their spread to the model's own (the law of total variance):
    sigma^2 = mean of the passes' sigma^2 + variance of the passes' means. The heatmap is the unvaried image's.
    """
    names = model.card.outputs
    batch, boxes = _inputs(model, images)
    heads = [names.index("male_mean"), names.index("female_mean")]
    passes = np.concatenate([batch, *_augmented_copies(model, batch, augmentations)])
    outputs, maps = model.run(passes, heads)
    outputs = outputs.reshape(augmentations + 1, len(boxes), -1)  # pass x image x output
    scaling = model.card.target_scaling
    results = []
    for i, box in enumerate(boxes):
        estimates = {}
        for j, (sex, prefix) in enumerate((("M", "male"), ("F", "female"))):
            means = outputs[:, i, names.index(f"{prefix}_mean")] * scaling.age_scale_months
            sigmas = (
                np.exp(0.5 * np.clip(outputs[:, i, names.index(f"{prefix}_log_variance")], *LOG_VARIANCE_RANGE))
                * scaling.age_scale_months
                * model.card.sigma_scale
            )
            estimates[sex] = BoneAgeEstimate(
                sex=sex,
                age_months=float(means.mean() + scaling.age_center_months),
                sigma_months=float(np.sqrt(np.mean(sigmas**2) + means.var())),
                heatmap=Heatmap(maps[i, j], box),
                augmentation_spread_months=float(means.std()) if augmentations else None,
            )
        results.append(estimates)
    return results


def _augmented_copies(model: Model, batch: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` varied copies of a normalised batch, drawn from a fixed seed so that a result is reproducible."""
    if not count:
        return []
    mean, std = model.card.preprocessing.mean, model.card.preprocessing.std
    images = torch.from_numpy(batch * std + mean)
    generator = torch.Generator().manual_seed(AUGMENTATION_SEED)
    return [((augment(images, generator)[0] - mean) / std).numpy().astype(np.float32) for _ in range(count)]


def _inputs(model: Model, images: Images) -> ModelInputs:
    return images if isinstance(images, ModelInputs) else model.inputs(images)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _upsample(values: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, pixel centres aligned (PyTorch's ``align_corners=False``); Pillow's single thread does not wake
    torch's thread pool, which cost milliseconds per call beside a running ONNX Runtime."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(values, np.float32)).resize((size, size), Image.BILINEAR))
