"""The ``dicom-node`` command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.database import create_index_engine, session_factory
from dicom_node.delivery import DeliveryQueue
from dicom_node.index_schema import (
    IndexNotReady,
    SchemaChange,
    downgrade_index,
    history,
    index_revision,
    one_line,
    upgrade_index,
)
from dicom_node.inference_jobs import InferenceModels
from dicom_node.node import ROLES, Node, Role
from dicom_node.storage import InstanceStore
from dicom_node.task_engine import models_of_queues
from inference.model_card import ModelLoadError
from inference.predict import DEFAULT_HALLUX_VALGUS_THRESHOLD
from web.app import create_app, create_health_app
from web.dependencies import WebContext

log = logging.getLogger("dicom_node")

EXIT_CONFIG_ERROR = 2
EXIT_START_FAILED = 1
EXIT_FORCED = 130
_WEB_START_TIMEOUT = 30.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the DICOM listener, the workers and the web server")
    serve_parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="YAML configuration file")
    serve_parser.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="what this process runs: all of it (the default; the only role on SQLite), or on PostgreSQL only the "
        "DICOM listener (ingest), the jobs (worker) or the viewer and HTTP API (web)",
    )
    serve_parser.set_defaults(run=_serve_command)

    worker = commands.add_parser("worker", help="run jobs of the named queues (PostgreSQL): a worker process")
    worker.add_argument("--config", type=Path, default=Path("config.yaml"), help="YAML configuration file")
    worker.add_argument(
        "--queues",
        type=_names,
        help="comma-separated: infer.hallux_valgus, infer.bone_age, infer.hallux_valgus+bone_age, infer.none, "
        "outputs, deliver, track (default: all that the models found allow); only their models are loaded",
    )
    worker.add_argument(
        "--concurrency", type=_positive, help="jobs at once (default: workers.count x inference.batch_size)"
    )
    worker.set_defaults(run=_worker_command)

    resend = commands.add_parser("resend", help="queue failed deliveries again (a running node sends them)")
    resend.add_argument("--config", type=Path, default=Path("config.yaml"), help="YAML configuration file")
    resend.add_argument("--destination", help="only the failed deliveries to this destination")
    resend.add_argument("--id", type=_positive, action="append", default=[], help="only this delivery (repeatable)")
    resend.set_defaults(run=_resend_command)

    db = commands.add_parser("db", help="the index's schema: its revision, upgrades, the history of revisions")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    for name, run, help_text in (
        ("upgrade", _db_upgrade_command, "bring the index to a revision (default: the code's head)"),
        ("downgrade", _db_downgrade_command, "take the index back to a revision, for an older version of the node"),
        ("current", _db_current_command, "print the index's revision"),
        ("check", _db_check_command, "exit 1, with one line, when the index is not at the code's head"),
        ("history", _db_history_command, "list the revisions, oldest first"),
    ):
        db_command = db_commands.add_parser(name, help=help_text)
        db_command.add_argument("--config", type=Path, default=Path("config.yaml"), help="YAML configuration file")
        if name in ("upgrade", "downgrade"):
            db_command.add_argument("--revision", default="head", required=name == "downgrade")
        db_command.set_defaults(run=run)

    phantoms = commands.add_parser("phantoms", help="write synthetic hand and foot X-rays with labels.csv")
    phantoms.add_argument("--out", type=Path, required=True, help="directory for the DICOM files and labels.csv")
    phantoms.add_argument("--n", type=_positive, required=True, help="number of images")
    phantoms.add_argument("--seed", type=int, required=True, help="seed; disjoint seeds give disjoint sets")
    phantoms.add_argument("--task", choices=["hand", "foot", "both"], default="both")
    phantoms.add_argument("--compress", choices=["none", "jpeg-ls", "rle"], default="none", help="lossless pixels")
    phantoms.add_argument("--workers", type=_positive, default=1, help="processes drawing images in parallel")
    phantoms.set_defaults(run=_phantoms_command)

    train = commands.add_parser("train", help="train a model (MONAI DenseNet121), tracked in MLflow")
    train.add_argument("task", choices=["hallux-valgus", "bone-age"])
    train.add_argument("--data", type=Path, required=True, help="directory of labelled images")
    train.add_argument("--format", choices=["phantom", "rsna", "folders"], default="phantom")
    train.add_argument("--out", type=Path, default=Path("models"), help="where the weights and card go")
    train.add_argument("--name", help="model name (default: <task>-demo for phantoms, <task> otherwise)")
    train.add_argument("--version", default="1.0.0")
    train.add_argument("--input-size", type=_positive, default=160)
    train.add_argument("--epochs", type=_positive, default=10)
    train.add_argument("--batch-size", type=_positive, default=16)
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
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPUs with AVX512-BF16 or AMX only)")
    train.add_argument("--max-steps", type=_positive, help="stop after this many steps (a smoke test)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=_positive, default=2, help="processes that decode the images")
    train.add_argument("--mlflow-uri", default="sqlite:///storage/mlflow/mlflow.db")
    train.add_argument("--experiment", default="training")
    train.set_defaults(run=_train_command)

    evaluate = commands.add_parser("evaluate", help="measure the models on a labelled phantom set")
    evaluate.add_argument("--data", type=Path, required=True, help="a labelled set, e.g. from dicom-node phantoms")
    evaluate.add_argument("--format", choices=["phantom", "rsna", "folders"], default="phantom")
    evaluate.add_argument("--foot-card", type=Path, default=Path("models/hallux-valgus-demo.yaml"))
    evaluate.add_argument("--hand-card", type=Path, default=Path("models/bone-age-demo.yaml"))
    evaluate.add_argument("--out", type=Path, default=Path("models/EVALUATION.md"), help="the Markdown report")
    evaluate.add_argument(
        "--threshold", type=float, default=DEFAULT_HALLUX_VALGUS_THRESHOLD, help="Hallux Valgus probability that flags"
    )
    evaluate.add_argument("--update-cards", action="store_true", help="write the metrics into the model cards")
    evaluate.add_argument("--mlflow-uri", default="sqlite:///storage/mlflow/mlflow.db")
    evaluate.add_argument("--experiment", default="evaluation")
    evaluate.set_defaults(run=_evaluate_command)

    args = parser.parse_args(argv)
    return args.run(args)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _settings_or_none(config: Path) -> Settings | None:
    """The settings of ``config``; None after printing the one-line reason when they cannot be used."""
    try:
        return load_settings(config)
    except ConfigError as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return None


def _serve_command(args: argparse.Namespace) -> int:
    settings = _settings_or_none(args.config)
    if settings is None:
        return EXIT_CONFIG_ERROR
    configure_logging(settings.logging.level)
    return serve(settings, args.role)


def _worker_command(args: argparse.Namespace) -> int:
    settings = _settings_or_none(args.config)
    if settings is None:
        return EXIT_CONFIG_ERROR
    configure_logging(settings.logging.level)
    return serve(settings, "worker", args.queues, args.concurrency)


def _resend_command(args: argparse.Namespace) -> int:
    def resend(engine: Engine, settings: Settings) -> int:
        if args.destination is not None and args.destination not in {d.name for d in settings.destinations}:
            print(f"dicom-node: no destination is named {args.destination!r}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        state = index_revision(engine)
        if not state.at_head:
            raise IndexNotReady(f"the index is at revision {state}, not the code's {state.head}: start the node first")
        delivery = settings.delivery
        queue = DeliveryQueue(
            session_factory(engine), delivery.max_attempts, delivery.retry_backoff, delivery.max_backoff
        )
        print(f"{queue.resend(args.id, args.destination)} failed deliveries queued again")
        return 0

    return _on_index(args, resend)


def _on_index(args: argparse.Namespace, command: Callable[[Engine, Settings], int]) -> int:
    """Run ``command`` on the configured index as it is; a problem with the index is one line, exit status 1."""
    settings = _settings_or_none(args.config)
    if settings is None:
        return EXIT_CONFIG_ERROR
    configure_logging(settings.logging.level)
    engine: Engine | None = None
    try:
        engine = create_index_engine(settings.database.url, settings.database.busy_timeout)
        return command(engine, settings)
    except IndexNotReady as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return EXIT_START_FAILED
    except (SQLAlchemyError, ImportError, OSError) as error:  # no such database or driver, not a database file
        print(f"dicom-node: cannot use the index: {one_line(error)}", file=sys.stderr)
        return EXIT_START_FAILED
    finally:
        if engine is not None:
            engine.dispose()


def _db_upgrade_command(args: argparse.Namespace) -> int:
    return _on_index(args, lambda engine, _: _report(upgrade_index(engine, args.revision)))


def _db_downgrade_command(args: argparse.Namespace) -> int:
    return _on_index(args, lambda engine, _: _report(downgrade_index(engine, args.revision)))


def _report(change: SchemaChange) -> int:
    if change.changed:
        print(f"index changed from revision {change.before} to {change.after}")
    else:
        print(f"index already at revision {change.after}")
    return 0


def _db_current_command(args: argparse.Namespace) -> int:
    def current(engine: Engine, _: Settings) -> int:
        print(index_revision(engine))
        return 0

    return _on_index(args, current)


def _db_check_command(args: argparse.Namespace) -> int:
    def check(engine: Engine, _: Settings) -> int:
        state = index_revision(engine)
        if state.at_head:
            print(f"index at revision {state}")
            return 0
        todo = f"run 'dicom-node db upgrade --config {args.config}'" if state.known else "run that version of the node"
        print(f"index at revision {state}, not the code's {state.head}: {todo}")
        return EXIT_START_FAILED

    return _on_index(args, check)


def _db_history_command(args: argparse.Namespace) -> int:
    print("\n".join(history()))
    return 0


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
    except DatasetError as error:
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
        foot, hand = Model.load(args.foot_card), Model.load(args.hand_card)
        evaluation = evaluate(args.data, args.format, foot, hand, args.out.parent / "evaluation", args.threshold)
    except (ModelLoadError, DatasetError) as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return EXIT_START_FAILED
    about = {
        "evaluation set": f"{args.data.resolve().name} ({args.format} layout)",
        "foot model": f"{foot.card.name} {foot.card.version}, weights {foot.weights_digest}",
        "hand model": f"{hand.card.name} {hand.card.version}, weights {hand.weights_digest}",
        "hallux valgus threshold": str(args.threshold),
    }
    write_report(args.out, evaluation, about, demo=foot.card.demo or hand.card.demo)
    use_tracking(args.mlflow_uri, args.experiment)
    run_id = log_to_mlflow(evaluation.metrics, args.out, evaluation.plots, about)
    if args.update_cards:
        for model, card_path in ((foot, args.foot_card), (hand, args.hand_card)):
            prefixes = (
                ("bone_age", "hand") if model.card.task == "bone_age" else ("hallux", "flatfoot", "foot", "normal")
            )
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


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom's INFO lines describe every association; keep them for DEBUG.
    logging.getLogger("pynetdicom").setLevel(max(logging.getLevelName(level), logging.WARNING))
    # Alembic's INFO lines describe its context at every run; the node logs each schema change in one line.
    logging.getLogger("alembic").setLevel(max(logging.getLevelName(level), logging.WARNING))
    # highdicom's INFO lines name every module it copies into every object the node writes.
    logging.getLogger("highdicom").setLevel(max(logging.getLevelName(level), logging.WARNING))


def serve(
    settings: Settings, role: Role = "all", queues: list[str] | None = None, concurrency: int | None = None
) -> int:
    """Run ``role`` until SIGTERM or SIGINT, then stop listening, finish jobs in hand and exit 0."""
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():  # a second signal: the operator does not want to wait
            os._exit(EXIT_FORCED)
        stop.set()

    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, on_signal)

    try:
        store = InstanceStore(settings.storage.root)  # usable, before the models cache their graphs under it
    except OSError as error:
        print(f"dicom-node: cannot use storage root {settings.storage.root}: {error.strerror}", file=sys.stderr)
        return EXIT_START_FAILED
    models = None
    if role in ("all", "worker"):
        tasks = list(settings.inference.tasks) if queues is None else models_of_queues(queues)
        try:
            models = InferenceModels.load(settings.inference, store.root / "cache" / "onnx", tasks)
        except ModelLoadError as error:
            print(f"dicom-node: {error}", file=sys.stderr)
            return EXIT_START_FAILED
        for task, reason in models.missing.items():
            log.warning("started without the %s model (inference.on_missing_model: degraded): %s", task, reason)
        log.info("models loaded: %s", "; ".join(model.card.label for model in models.loaded().values()) or "none")
    try:
        node = Node(settings, models=models, role=role, queues=queues, concurrency=concurrency)
    except ConfigError as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except OSError as error:
        print(f"dicom-node: cannot use storage root {settings.storage.root}: {error.strerror}", file=sys.stderr)
        return EXIT_START_FAILED
    except (SQLAlchemyError, ImportError) as error:
        print(f"dicom-node: cannot open the database ({one_line(error)})", file=sys.stderr)
        return EXIT_START_FAILED
    except IndexNotReady as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return EXIT_START_FAILED
    try:
        node.start()
    except OSError as error:
        print(
            f"dicom-node: cannot listen on {settings.dicom.host}:{settings.dicom.port}: {error.strerror}",
            file=sys.stderr,
        )
        node.stop()
        return EXIT_START_FAILED

    context = WebContext(settings, node.sessions, lambda: node.scp.listening, node=node)
    app = create_app(context) if role in ("all", "web") else create_health_app(context)
    # no access log: request paths carry PatientIDs (/api/patients/<id>) and search terms
    config = uvicorn.Config(app, host=settings.web.host, port=settings.web.port, log_level="warning", access_log=False)
    web = uvicorn.Server(config)
    web_thread = threading.Thread(target=web.run, name="web", daemon=True)
    web_thread.start()
    if not _wait_started(web, web_thread):
        print(f"dicom-node: cannot serve HTTP on {settings.web.host}:{settings.web.port}", file=sys.stderr)
        node.stop()
        return EXIT_START_FAILED
    log.info("web on http://%s:%d", settings.web.host, settings.web.port)

    stop.wait()
    log.info("stopping")
    web.should_exit = True
    web_thread.join(_WEB_START_TIMEOUT)
    node.stop()
    log.info("stopped")
    return 0


def _wait_started(web: uvicorn.Server, thread: threading.Thread) -> bool:
    for _ in range(int(_WEB_START_TIMEOUT / 0.05)):
        if web.started:
            return True
        if not thread.is_alive():
            return False
        threading.Event().wait(0.05)
    return False


if __name__ == "__main__":
    sys.exit(main())
