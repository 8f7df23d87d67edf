"""``dicom-node evaluate``: the node's inference path on a labelled set, measured.

Each DICOM file goes through what the node runs on a received X-ray (decode, Modality and VOI LUT,
MONOCHROME1 inversion, letterbox, model, CAM), and the results are compared with the labels:

- anatomy check: accuracy, recall / precision / F1 per class (hand, foot, other), the confusion matrix;
- foot model: accuracy, recall / precision / F1 per class, the confusion matrix;
- bone-age model: mean absolute error in months per sex (each image read by its own sex's head), and the
  coverage of the 95 % interval mean +- 1.96 sigma, with a calibration curve over other interval levels;
- heatmaps: pointing accuracy, the share of images whose heatmap maximum lies inside the finding's box
  (pointing game of Zhang et al., ECCV 2016, without tolerance), for the foot findings and, separately, the
  wrist region of hands (carpal ossification centres, distal radial and ulnar growth plates); and the share of
  hands whose heatmap is empty.
The report is Markdown with PNG plots; the figures are logged to MLflow with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import matplotlib
import mlflow
import numpy as np

from inference.model_card import ANATOMY_CLASSES, HALLUX_VALGUS_CLASSES
from inference.pixels import DEFAULT_PICTURE_SIZE
from inference.predict import (
    Heatmap,
    Model,
    ModelInputs,
    predict_anatomy,
    predict_bone_age,
    predict_hallux_valgus,
)
from inference.training.datasets import DatasetError, Example, Format, image_shape, load_image, read_examples

matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402  (after choosing the non-interactive backend)

BATCH = 16
COVERAGE_LEVELS = (0.5, 0.68, 0.8, 0.9, 0.95, 0.99)
Z95 = NormalDist().inv_cdf(0.975)


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Evaluation) -> Evaluation:
        return Evaluation({**self.metrics, **other.metrics}, self.plots + other.plots, {**self.counts, **other.counts})


def classification_metrics(
    truth: np.ndarray,
    predicted: np.ndarray,
    classes: tuple[str, ...] = HALLUX_VALGUS_CLASSES,
    accuracy_key: str = "hallux_valgus_accuracy",
    prefix: str = "",
) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy, and recall, precision and F1 of each class (``<prefix><class>_recall`` ...); the confusion matrix
    (rows: truth)."""
    n = len(classes)
    confusion = np.zeros((n, n), int)
    np.add.at(confusion, (truth, predicted), 1)
    metrics = {accuracy_key: float((truth == predicted).mean())}
    for index, name in enumerate(classes):
        key = prefix + name.lower().replace(" ", "_")
        true_positives = confusion[index, index]
        recall = true_positives / max(confusion[index].sum(), 1)
        precision = true_positives / max(confusion[:, index].sum(), 1)
        metrics[f"{key}_recall"] = float(recall)
        metrics[f"{key}_precision"] = float(precision)
        metrics[f"{key}_f1"] = float(2 * precision * recall / max(precision + recall, 1e-12))
    return metrics, confusion


def interval_coverage(z: np.ndarray, z_limit: float = Z95) -> float:
    """Share of errors within ``z_limit`` sigmas (|error| / sigma = z)."""
    return float((z <= z_limit).mean()) if len(z) else float("nan")


def pointing_accuracy(hits: list[bool]) -> float:
    return float(np.mean(hits)) if hits else float("nan")


def _batches(model: Model, examples: list[Example]) -> Iterator[tuple[list[Example], ModelInputs]]:
    """The examples in batches with their model inputs, made as the node makes them: DICOM images reduced to
    the node's default picture size first, the letterboxes placing the full-size image."""
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        images = [load_image(example.path, DEFAULT_PICTURE_SIZE) for example in chunk]
        yield chunk, model.inputs(images, [image_shape(example.path) for example in chunk])


def _inside(heatmap: Heatmap, box: tuple[int, int, int, int]) -> bool:
    x, y = heatmap.peak()
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def evaluate_hallux_valgus(model: Model, examples: list[Example], plots: Path, threshold: float) -> Evaluation:
    truth, predicted, detected, hits = [], [], [], []
    for chunk, inputs in _batches(model, examples):
        for example, result in zip(chunk, predict_hallux_valgus(model, inputs, threshold), strict=True):
            truth.append(example.foot_class)
            predicted.append(HALLUX_VALGUS_CLASSES.index(result.prediction))
            detected.append(result.hallux_valgus_detected)
            if example.finding_box is not None:  # the pointing game asks the true class's map
                hits.append(_inside(result.heatmaps[HALLUX_VALGUS_CLASSES[example.foot_class]], example.finding_box))
    truth, predicted, detected = np.array(truth), np.array(predicted), np.array(detected)
    metrics, confusion = classification_metrics(truth, predicted)
    is_hallux_valgus = truth == HALLUX_VALGUS_CLASSES.index("Hallux Valgus")
    if is_hallux_valgus.any():
        metrics["hallux_valgus_detected_recall"] = float(detected[is_hallux_valgus].mean())
    if detected.any():
        metrics["hallux_valgus_detected_precision"] = float(is_hallux_valgus[detected].mean())
    metrics["foot_pointing_accuracy"] = pointing_accuracy(hits)
    counts = {"foot_images": len(truth), "foot_findings_with_box": len(hits)}
    return Evaluation(metrics, [_confusion_plot(confusion, plots / "confusion_matrix.png")], counts)


def evaluate_anatomy(model: Model, examples: list[Example]) -> tuple[Evaluation, np.ndarray]:
    truth, predicted = [], []
    for chunk, inputs in _batches(model, examples):
        for example, result in zip(chunk, predict_anatomy(model, inputs), strict=True):
            truth.append(ANATOMY_CLASSES.index(example.anatomy))
            predicted.append(ANATOMY_CLASSES.index(result.prediction))
    metrics, confusion = classification_metrics(
        np.array(truth), np.array(predicted), ANATOMY_CLASSES, "anatomy_accuracy", "anatomy_"
    )
    counts = {
        f"anatomy_images_{name}": int(count) for name, count in zip(ANATOMY_CLASSES, confusion.sum(1), strict=True)
    }
    return Evaluation(metrics, [], counts), confusion


def evaluate_bone_age(model: Model, examples: list[Example], plots: Path) -> Evaluation:
    sexes, truth, means, sigmas, hits, empty = [], [], [], [], [], []
    for chunk, inputs in _batches(model, examples):
        for example, estimates in zip(chunk, predict_bone_age(model, inputs), strict=True):
            own = estimates[example.sex]
            sexes.append(example.sex)
            truth.append(example.bone_age_months)
            means.append(own.age_months)
            sigmas.append(own.sigma_months)
            empty.append(own.heatmap.peak_or_none() is None)
            if example.finding_box is not None:  # an empty map points nowhere
                hits.append(not empty[-1] and _inside(own.heatmap, example.finding_box))
    sexes, truth, means, sigmas = map(np.array, (sexes, truth, means, sigmas))
    z = np.abs(means - truth) / sigmas
    evaluation = Evaluation(counts={"hand_images": len(truth)})
    for sex, word in (("M", "male"), ("F", "female")):
        mask = sexes == sex
        evaluation.counts[f"hand_images_{word}"] = int(mask.sum())
        if mask.any():
            evaluation.metrics[f"bone_age_mae_months_{word}"] = float(np.abs(means - truth)[mask].mean())
            evaluation.metrics[f"bone_age_coverage95_{word}"] = interval_coverage(z[mask])
    evaluation.metrics["bone_age_coverage95"] = interval_coverage(z)
    evaluation.metrics["bone_age_mean_sigma_months"] = float(sigmas.mean())
    evaluation.metrics["hand_wrist_pointing_accuracy"] = pointing_accuracy(hits)
    evaluation.metrics["hand_heatmap_empty_share"] = float(np.mean(empty))
    evaluation.plots.append(_bone_age_plot(sexes, truth, means, plots / "bone_age_predicted_vs_true.png"))
    evaluation.plots.append(_calibration_plot(z, plots / "sigma_calibration.png"))
    return evaluation


def evaluate(
    data: Path,
    layout: Format,
    foot_model: Model | None,
    hand_model: Model | None,
    plots: Path,
    threshold: float,
    anatomy_model: Model | None = None,
) -> Evaluation:
    """Evaluate the given models on whichever of their tasks ``data`` holds labels for."""
    plots.mkdir(parents=True, exist_ok=True)
    evaluation, tasks = Evaluation(), 0
    if anatomy_model is not None and layout == "phantom":
        anatomy, confusion = evaluate_anatomy(anatomy_model, read_examples(data, layout, "anatomy"))
        anatomy.plots.append(
            _confusion_plot(confusion, plots / "anatomy_confusion_matrix.png", ANATOMY_CLASSES, "Anatomy check")
        )
        evaluation, tasks = evaluation.merge(anatomy), 1
    for task, model in (("hallux_valgus", foot_model), ("bone_age", hand_model)):
        if model is None:
            continue
        try:
            examples = read_examples(data, layout, task)
        except DatasetError:
            continue  # the set holds no labels for this task
        if task == "hallux_valgus":
            evaluation = evaluation.merge(evaluate_hallux_valgus(model, examples, plots, threshold))
        else:
            evaluation = evaluation.merge(evaluate_bone_age(model, examples, plots))
        tasks += 1
    if not tasks:
        raise DatasetError(f"{data}: no labelled examples for the given models in the {layout} layout")
    return evaluation


def log_to_mlflow(metrics: dict[str, float], report: Path, plots: list[Path], params: dict[str, str]) -> str:
    with mlflow.start_run(run_name="evaluate") as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(report))
        for plot in plots:
            mlflow.log_artifact(str(plot), artifact_path="plots")
        return run.info.run_id


def _confusion_plot(
    confusion: np.ndarray, path: Path, classes: tuple[str, ...] = HALLUX_VALGUS_CLASSES, title: str = "Foot model"
) -> Path:
    figure, axes = pyplot.subplots(figsize=(5.5, 4.5))
    axes.imshow(confusion, cmap="Blues")
    labels = list(classes)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    for (row, column), count in np.ndenumerate(confusion):
        axes.text(column, row, str(count), ha="center", va="center", color="black")
    return _finish(figure, axes, path, title, "predicted", "true", legend=False)


def _bone_age_plot(sexes: np.ndarray, truth: np.ndarray, means: np.ndarray, path: Path) -> Path:
    figure, axes = pyplot.subplots(figsize=(5, 5))
    for sex, colour in (("M", "tab:blue"), ("F", "tab:red")):
        mask = sexes == sex
        axes.scatter(
            truth[mask] / 12, means[mask] / 12, s=8, alpha=0.6, color=colour, label={"M": "male", "F": "female"}[sex]
        )
    limit = max(truth.max(), means.max()) / 12 + 1
    axes.plot([0, limit], [0, limit], color="gray", linewidth=1)
    return _finish(figure, axes, path, "Bone age", "true bone age (years)", "predicted bone age (years)")


def _calibration_plot(z: np.ndarray, path: Path) -> Path:
    nominal = np.array(COVERAGE_LEVELS)
    observed = [(z <= NormalDist().inv_cdf(0.5 + level / 2)).mean() for level in nominal]
    figure, axes = pyplot.subplots(figsize=(5, 5))
    axes.plot(nominal, observed, marker="o", label="observed")
    axes.plot([0.4, 1], [0.4, 1], color="gray", linewidth=1, label="ideal")
    return _finish(
        figure, axes, path, "Bone-age sigma calibration", "nominal coverage of mean +- k sigma", "observed coverage"
    )


def _finish(figure, axes, path: Path, title: str, xlabel: str, ylabel: str, legend: bool = True) -> Path:
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if legend:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


# (metric, comparison, target) from the acceptance of the demo weights
TARGETS = (
    ("hallux_valgus_recall", ">=", 0.99),
    ("hallux_valgus_accuracy", ">=", 0.97),
    ("bone_age_mae_months_male", "<=", 6.0),
    ("bone_age_mae_months_female", "<=", 6.0),
    ("bone_age_coverage95", "between", (0.90, 0.98)),
    ("foot_pointing_accuracy", ">=", 0.90),
    ("anatomy_accuracy", ">=", 0.99),
    ("hand_wrist_pointing_accuracy", ">=", 0.90),
    ("hand_heatmap_empty_share", "<=", 0.0),
)


def meets(value: float, comparison: str, target) -> bool:
    if comparison == ">=":
        return value >= target
    if comparison == "<=":
        return value <= target
    return target[0] <= value <= target[1]


def write_report(path: Path, evaluation: Evaluation, about: dict[str, str], demo: bool) -> None:
    metrics, counts, plots = evaluation.metrics, evaluation.counts, evaluation.plots
    lines = ["# Evaluation of the models", ""]
    if demo:
        lines += [
            "> **Demo models trained on synthetic phantoms; not for clinical use.** These figures describe",
            "> performance on synthetic images drawn by `dicom-node phantoms`, not on radiographs of patients.",
            "",
        ]
    lines += [
        "Written by `dicom-node evaluate`; every figure below was measured by that command.",
        "",
        *(f"- {key}: {value}" for key, value in about.items()),
        *(f"- {key.replace('_', ' ')}: {value}" for key, value in counts.items()),
        "",
        "## Targets",
        "",
        "| metric | target | measured | |",
        "|---|---|---|---|",
    ]
    for key, comparison, target in TARGETS:
        if key not in metrics:
            continue
        shown = f"{target[0]}-{target[1]}" if comparison == "between" else f"{comparison} {target}"
        value = metrics[key]
        lines.append(f"| {key} | {shown} | {value:.4g} | {'PASS' if meets(value, comparison, target) else 'MISS'} |")
    lines += ["", "## All metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" for key, value in sorted(metrics.items())]
    lines += ["", "## Plots", ""]
    lines += [f"![{plot.stem}]({plot.parent.name}/{plot.name})" for plot in plots]
    path.write_text("\n".join(lines) + "\n")
