"""The FastAPI application."""

from __future__ import annotations

import ipaddress
import logging

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from web.dependencies import WebContext, require_token
from web.routers import deliveries, health, instances, jobs, metrics, patients, predict, results, studies, viewer
from web.uploads import UploadLimit

log = logging.getLogger(__name__)

API_PREFIX = "/api"


def create_app(context: WebContext) -> FastAPI:
    """The app over ``context``. Everything under ``/api`` asks for ``web.api_token`` when one is set (it shows
    patient data, or job errors that may name stored files); ``/health``, ``/metrics`` and the docs stay open."""
    app = FastAPI(title="DICOM AI node", summary="Viewer and HTTP API of the DICOM AI node.")
    app.state.context = context
    app.include_router(health.router)
    app.include_router(metrics.router)  # counts only, no patient data: open like /health, for scrapers
    for module in (patients, studies, instances, results, jobs, deliveries):
        app.include_router(module.router, prefix=API_PREFIX, dependencies=[Depends(require_token)])
    # the seed projects' endpoints, at the root as the seeds had them; uploads and results ask for the token
    app.include_router(predict.router)
    app.add_middleware(UploadLimit, limits=predict.upload_limits(context.settings.web.max_upload_mb))
    # the viewer's pages (they ask for the token themselves) and their CSS and script
    app.include_router(viewer.router)
    app.mount("/static", StaticFiles(directory=viewer.STATIC_DIRECTORY), name="static")
    web = context.settings.web
    if web.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=web.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization"],
        )
    if web.api_token is None and not _is_loopback(web.host):
        log.warning(
            "the HTTP API listens on %s without web.api_token: anyone who reaches it reads patient data", web.host
        )
    return app


def create_health_app(context: WebContext) -> FastAPI:
    """The HTTP side of a process that serves no viewer (an ingest node, a worker): ``/health`` and ``/metrics``."""
    app = FastAPI(title="DICOM AI node", summary="Health and metrics of one process of the DICOM AI node.")
    app.state.context = context
    app.include_router(health.router)
    app.include_router(metrics.router)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False
