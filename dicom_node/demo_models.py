"""The commands that make and measure the node's demo models: ``dicom-node phantoms`` (synthetic hand and foot
X-rays with their labels), ``train`` and ``evaluate``. They are tooling for the two demo models, not part of the
node's running: the node knows its tasks only through :mod:`dicom_node.ai_tasks`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dicom_node.exit_codes import EXIT_CONFIG_ERROR, EXIT_START_FAILED
from inference.model_card import DEFAULT_HALLUX_VALGUS_THRESHOLD, ModelLoadError


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_demo_model_commands(commands: argparse._SubParsersAction) -> None:
    phantoms = commands.add_parser("phantoms", help="write synthetic hand and foot X-rays with labels.csv")
    phantoms.add_argument("--out", type=Path, required=True, help="directory for the DICOM files and labels.csv")
    phantoms.add_argument("--n", type=positive, required=True, help="number of images")
    phantoms.add_argument("--seed", type=int, required=True, help="seed; disjoint seeds give disjoint sets")
    phantoms.add_argument(
        "--task",
        choices=["hand", "foot", "other", "both", "all"],
        default="both",
        help="both: hands and feet in turn; all: hands, feet and other body parts in turn",
    )
    phantoms.add_argument("--compress", choices=["none", "jpeg-ls", "rle"], default="none", help="lossless pixels")
    phantoms.add_argument("--workers", type=positive, default=1, help="processes drawing images in parallel")
    phantoms.set_defaults(run=_phantoms_command)

    train = commands.add_parser("train", help="train a model (MONAI DenseNet121), tracked in MLflow")
    train.add_argument("task", choices=["hallux-valgus", "bone-age", "anatomy"])
    train.add_argument("--data", type=Path, required=True, help="directory of labelled images")
    train.add_argument("--format", choices=["phantom", "rsna", "folders"], default="phantom")
    train.add_argument("--out", type=Path, default=Path("models"), help="where the weights and card go")
    train.add_argument("--name", help="model name (default: <task>-demo for phantoms, <task> otherwise)")
    train.add_argument("--version", default="1.0.0")
    train.add_argument("--input-size", type=positive, default=160)
    train.add_argument("--epochs", type=positive, default=10)
    train.add_argument("--batch-size", type=positive, default=16)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument(
        "--feature-stride", type=int, choices=[16, 32], default=32, help="input pixels per heatmap cell (16: finer)"
    )
    train.add_argument(
        "--localisation-weight",
        type=float,
        default=0.0,
        help="weight of the term that asks the true class's heatmap to lie in the labelled finding box",
    )
    train.add_argument("--initial-card", type=Path, help="start from this card's weights (fine-tuning)")
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPUs with AVX512-BF16 or AMX only)")
    train.add_argument("--max-steps", type=positive, help="stop after this many steps (a smoke test)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=positive, default=2, help="processes that decode the images")
    train.add_argument("--mlflow-uri", default="sqlite:///storage/mlflow/mlflow.db")
    train.add_argument("--experiment", default="training")
    train.set_defaults(run=_train_command)

    evaluate = commands.add_parser("evaluate", help="measure the models on a labelled phantom set")
    evaluate.add_argument("--data", type=Path, required=True, help="a labelled set, e.g. from dicom-node phantoms")
    evaluate.add_argument("--format", choices=["phantom", "rsna", "folders"], default="phantom")
    evaluate.add_argument("--foot-card", type=Path, default=Path("models/hallux-valgus-demo.yaml"))
    evaluate.add_argument("--hand-card", type=Path, default=Path("models/bone-age-demo.yaml"))
    evaluate.add_argument("--anatomy-card", type=Path, default=Path("models/anatomy-demo.yaml"))
    evaluate.add_argument("--out", type=Path, default=Path("models/EVALUATION.md"), help="the Markdown report")
    evaluate.add_argument(
        "--threshold", type=float, default=DEFAULT_HALLUX_VALGUS_THRESHOLD, help="Hallux Valgus probability that flags"
    )
    evaluate.add_argument("--update-cards", action="store_true", help="write the metrics into the model cards")
    evaluate.add_argument("--mlflow-uri", default="sqlite:///storage/mlflow/mlflow.db")
    evaluate.add_argument("--experiment", default="evaluation")
    evaluate.set_defaults(run=_evaluate_command)


def _train_command(args: argparse.Namespace) -> int:
    from inference.training.datasets import DatasetError
    from inference.training.run import run_training
    from inference.training.trainer import TrainingOptions

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    task = args.task.replace("-", "_")
    name = args.name or (f"{args.task}-demo" if args.format == "phantom" else args.task)
    options = TrainingOptions(
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        max_steps=args.max_steps,
        feature_stride=args.feature_stride,
        localisation_weight=args.localisation_weight,
        initial_card=args.initial_card,
        bf16=args.bf16,
    )
    try:
        trained = run_training(
            task,
            args.data,
            args.format,
            args.out,
            name,
            args.version,
            options,
            args.mlflow_uri,
            args.experiment,
            args.workers,
        )
    except (DatasetError, ModelLoadError) as error:  # the data, or the card to start from
        print(f"dicom-node: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"wrote {trained.card_path} (MLflow run {trained.run_id}): {trained.validation}")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    from inference.predict import Model
    from inference.training.datasets import DatasetError
    from inference.training.evaluate import evaluate, log_to_mlflow, write_report
    from inference.training.run import use_tracking
    from inference.training.trainer import write_card

    try:
        foot, hand, anatomy = Model.load(args.foot_card), Model.load(args.hand_card), Model.load(args.anatomy_card)
        evaluation = evaluate(
            args.data, args.format, foot, hand, args.out.parent / "evaluation", args.threshold, anatomy
        )
    except (ModelLoadError, DatasetError) as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return EXIT_START_FAILED
    about = {
        "evaluation set": f"{args.data.resolve().name} ({args.format} layout)",
        "anatomy model": f"{anatomy.card.name} {anatomy.card.version}, weights {anatomy.weights_digest}",
        "foot model": f"{foot.card.name} {foot.card.version}, weights {foot.weights_digest}",
        "hand model": f"{hand.card.name} {hand.card.version}, weights {hand.weights_digest}",
        "hallux valgus threshold": str(args.threshold),
    }
    write_report(args.out, evaluation, about, demo=foot.card.demo or hand.card.demo or anatomy.card.demo)
    use_tracking(args.mlflow_uri, args.experiment)
    run_id = log_to_mlflow(evaluation.metrics, args.out, evaluation.plots, about)
    if args.update_cards:
        metric_prefixes = {
            "anatomy": ("anatomy",),
            "bone_age": ("bone_age", "hand"),
            "hallux_valgus": ("hallux", "flatfoot", "foot", "normal"),
        }
        for model, card_path in ((anatomy, args.anatomy_card), (foot, args.foot_card), (hand, args.hand_card)):
            prefixes = metric_prefixes[model.card.task]
            measured = {f"evaluation_{k}": round(v, 4) for k, v in evaluation.metrics.items() if k.startswith(prefixes)}
            metrics = {**model.card.metrics, **measured, "evaluation_report": args.out.name, "evaluation_run": run_id}
            write_card(model.card.model_copy(update={"metrics": metrics}), card_path)
    print(f"wrote {args.out} (MLflow run {run_id})")
    for key, value in sorted(evaluation.metrics.items()):
        print(f"  {key}: {value:.4f}")
    return 0


def _phantoms_command(args: argparse.Namespace) -> int:
    from dicom_node.phantoms import generate_phantoms

    labels = generate_phantoms(args.out, args.n, args.seed, args.task, args.compress, args.workers)
    print(f"wrote {len(labels)} phantoms and labels.csv to {args.out} (synthetic images, not patients)")
    return 0
