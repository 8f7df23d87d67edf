"""Running the node: the models, the DICOM listener, the workers and the web server, until a signal stops them."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import ConfigError, Settings
from dicom_node.exit_codes import EXIT_CONFIG_ERROR, EXIT_FORCED, EXIT_START_FAILED
from dicom_node.index_schema import IndexNotReady, one_line
from dicom_node.inference_jobs import InferenceModels
from dicom_node.node import Node
from dicom_node.roles import Role
from dicom_node.storage import InstanceStore
from dicom_node.task_engine import models_of_queues
from dicom_node.users import Users
from inference.model_card import ModelLoadError
from web.app import check_sign_in, create_app, create_health_app
from web.dependencies import WebContext

log = logging.getLogger("dicom_node")

_WEB_START_TIMEOUT = 30.0


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
    if role in ("all", "web"):
        try:
            check_sign_in(settings, Users(node.sessions, node.trail))
        except ConfigError as error:
            print(f"dicom-node: {error}", file=sys.stderr)
            node.engine.dispose()
            return EXIT_CONFIG_ERROR
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
