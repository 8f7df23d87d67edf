"""The ``dicom-node`` command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import ConfigError, Settings, load_settings
from dicom_node.node import Node
from web.app import create_app
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
    serve_parser.set_defaults(run=_serve_command)

    phantoms = commands.add_parser("phantoms", help="write synthetic hand and foot X-rays with labels.csv")
    phantoms.add_argument("--out", type=Path, required=True, help="directory for the DICOM files and labels.csv")
    phantoms.add_argument("--n", type=_positive, required=True, help="number of images")
    phantoms.add_argument("--seed", type=int, required=True, help="seed; disjoint seeds give disjoint sets")
    phantoms.add_argument("--task", choices=["hand", "foot", "both"], default="both")
    phantoms.add_argument("--compress", choices=["none", "jpeg-ls", "rle"], default="none", help="lossless pixels")
    phantoms.set_defaults(run=_phantoms_command)

    args = parser.parse_args(argv)
    return args.run(args)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _serve_command(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"dicom-node: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    configure_logging(settings.logging.level)
    return serve(settings)


def _phantoms_command(args: argparse.Namespace) -> int:
    from dicom_node.phantoms import generate_phantoms

    labels = generate_phantoms(args.out, args.n, args.seed, args.task, args.compress)
    print(f"wrote {len(labels)} phantoms and labels.csv to {args.out} (synthetic images, not patients)")
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pynetdicom's INFO lines describe every association; keep them for DEBUG.
    logging.getLogger("pynetdicom").setLevel(max(logging.getLevelName(level), logging.WARNING))


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then stop listening, finish jobs in hand and exit 0."""
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():  # a second signal: the operator does not want to wait
            os._exit(EXIT_FORCED)
        stop.set()

    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, on_signal)

    try:
        node = Node(settings)
    except OSError as error:
        print(f"dicom-node: cannot use storage root {settings.storage.root}: {error.strerror}", file=sys.stderr)
        return EXIT_START_FAILED
    except (SQLAlchemyError, ImportError) as error:
        print(f"dicom-node: cannot open the database ({type(error).__name__}: {error})", file=sys.stderr)
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

    app = create_app(WebContext(settings, node.sessions, lambda: node.scp.listening))
    web = uvicorn.Server(uvicorn.Config(app, host=settings.web.host, port=settings.web.port, log_level="warning"))
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
