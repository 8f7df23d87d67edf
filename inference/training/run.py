"""One training run from a data directory: examples, cached inputs, MLflow set-up, training."""

from __future__ import annotations

from pathlib import Path

import mlflow
from sqlalchemy.engine import make_url

from inference.training.datasets import Example, Format, TaskName, prepare_inputs, pydicom_images, read_examples
from inference.training.trainer import TrainedModel, TrainingOptions, train_model


def use_tracking(uri: str, experiment: str) -> None:
    """Point MLflow at ``uri``; a new experiment keeps its artifacts beside a local SQLite store."""
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            database = Path(make_url(uri).database)
            database.parent.mkdir(parents=True, exist_ok=True)
            artifacts = (database.parent / "artifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)


def run_training(
    task: TaskName,
    data: Path,
    layout: Format,
    out: Path,
    name: str,
    version: str,
    options: TrainingOptions,
    tracking_uri: str,
    experiment: str,
    workers: int = 2,
) -> TrainedModel:
    examples = read_examples(data, layout, task)
    description = f"{len(examples)} {task} examples, {layout} layout, {data.resolve().name}"
    if layout == "phantom":
        description += " (synthetic phantoms from dicom-node phantoms)"
    if task == "anatomy":  # images of other modalities and body parts than the phantoms', as "other"
        extra = [Example(path, anatomy="other") for path in pydicom_images()]
        examples += extra
        description += f", and {len(extra)} images of pydicom's test files as other"
    inputs = prepare_inputs(examples, options.input_size, cache_dir=data / ".cache", workers=workers)
    use_tracking(tracking_uri, experiment)
    return train_model(task, examples, inputs, options, out, name, version, description, demo=layout == "phantom")
