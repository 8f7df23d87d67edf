"""The ``dicom-node`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.access_commands import add_access_commands
from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.database import create_index_engine, session_factory
from dicom_node.delivery import DeliveryQueue
from dicom_node.demo_models import add_demo_model_commands, positive
from dicom_node.exit_codes import EXIT_CONFIG_ERROR, EXIT_START_FAILED
from dicom_node.index_schema import (
    IndexNotReady,
    SchemaChange,
    downgrade_index,
    history,
    index_revision,
    one_line,
    upgrade_index,
)
from dicom_node.roles import ROLES, Role


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
        help="comma-separated: infer.<task>, infer.<task>+<task> (names sorted), infer.none, outputs, deliver, "
        "track (default: all that the models found allow); only their models are loaded",
    )
    worker.add_argument(
        "--concurrency", type=positive, help="jobs at once (default: workers.count x inference.batch_size)"
    )
    worker.set_defaults(run=_worker_command)

    resend = commands.add_parser("resend", help="queue failed deliveries again (a running node sends them)")
    resend.add_argument("--config", type=Path, default=Path("config.yaml"), help="YAML configuration file")
    resend.add_argument("--destination", help="only the failed deliveries to this destination")
    resend.add_argument("--id", type=positive, action="append", default=[], help="only this delivery (repeatable)")
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

    add_access_commands(commands)
    add_demo_model_commands(commands)

    args = parser.parse_args(argv)
    return args.run(args)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one")
    return names


def _settings_or_none(config: Path) -> Settings | None:
    """The settings of ``config``; None after printing the one-line reason when they cannot be used."""
    try:
        return load_settings(config)
    except ConfigError as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return None


def _serve_command(args: argparse.Namespace) -> int:
    return _run_node(args, args.role)


def _worker_command(args: argparse.Namespace) -> int:
    return _run_node(args, "worker", args.queues, args.concurrency)


def _run_node(
    args: argparse.Namespace, role: Role, queues: list[str] | None = None, concurrency: int | None = None
) -> int:
    settings = _settings_or_none(args.config)
    if settings is None:
        return EXIT_CONFIG_ERROR
    configure_logging(settings.logging.level)
    from dicom_node.serving import serve  # the whole node, torch included: only the commands that run it wait for it

    return serve(settings, role, queues, concurrency)


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


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom's INFO lines describe every association; keep them for DEBUG.
    logging.getLogger("pynetdicom").setLevel(max(logging.getLevelName(level), logging.WARNING))
    # Alembic's INFO lines describe its context at every run; the node logs each schema change in one line.
    logging.getLogger("alembic").setLevel(max(logging.getLevelName(level), logging.WARNING))
    # highdicom's INFO lines name every module it copies into every object the node writes.
    logging.getLogger("highdicom").setLevel(max(logging.getLevelName(level), logging.WARNING))


if __name__ == "__main__":
    sys.exit(main())
