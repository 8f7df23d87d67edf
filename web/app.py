"""The FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from dicom_node.config import ConfigError, Settings
from dicom_node.secret_file import kept_secret
from dicom_node.users import Users
from web.auth import AUTH_RESPONSES, OPERATOR, VIEWER, SignInLimiter, anyone_can_sign_in, is_loopback_host
from web.dependencies import WebContext
from web.routers import (
    admin,
    deliveries,
    health,
    instances,
    jobs,
    metrics,
    patients,
    predict,
    results,
    sign_in,
    studies,
    viewer,
)
from web.session_cookie import SessionCookie
from web.uploads import UploadLimit

API_PREFIX = "/api"
SESSION_KEY_FILE = "session.key"  # under the storage root: the key that signs the viewer's session cookies


def create_app(context: WebContext) -> FastAPI:
    """The app over ``context``. Each route declares the role it needs (:mod:`web.auth`): the viewer role reads
    patients, studies, instances, images, heatmaps and results; the operator role also uploads, reads the queues
    retries deliveries and runs jobs again; the admin role also reads the users, the configuration and the audit trail.
    ``/health``, ``/metrics``, ``/model_info`` and the docs hold no patient data and stay open."""
    app = FastAPI(title="DICOM AI node", summary="Viewer and HTTP API of the DICOM AI node.")
    app.state.context = context
    app.state.sign_in_limiter = SignInLimiter(context.settings.web.sign_in_attempts)
    app.include_router(health.router)
    app.include_router(metrics.router)  # counts only, no patient data: open like /health, for scrapers
    for module in (patients, studies, instances, results):
        app.include_router(module.router, prefix=API_PREFIX, dependencies=VIEWER, responses=AUTH_RESPONSES)
    for module in (jobs, deliveries):
        app.include_router(module.router, prefix=API_PREFIX, dependencies=OPERATOR, responses=AUTH_RESPONSES)
    app.include_router(admin.router, prefix=API_PREFIX, responses=AUTH_RESPONSES)
    # the seed projects' endpoints, at the root as the seeds had them; each declares its role
    app.include_router(predict.router)
    app.add_middleware(UploadLimit, limits=predict.upload_limits(context.settings.web.max_upload_mb))
    # the viewer's pages (a browser without a session is sent to /login) and their CSS and script
    app.include_router(sign_in.router)
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
    session_key = kept_secret(context.settings.storage.root / SESSION_KEY_FILE).hex()
    app.add_middleware(SessionCookie, secret_key=session_key, max_age=int(web.session_hours * 3600))
    return app


def check_sign_in(settings: Settings, users: Users) -> None:
    """Refuse to serve patient data beyond loopback to anyone: with no user and no provider, nobody signs in.

    Raises:
        ConfigError: ``web.host`` is not loopback, no provider is configured and the index has no user.
    """
    if not is_loopback_host(settings.web.host) and not anyone_can_sign_in(settings, users):
        raise ConfigError(
            f"web.host {settings.web.host} is not loopback and nobody can sign in: create the first user with "
            "`dicom-node users add NAME --role admin`, or configure web.oidc"
        )


def create_health_app(context: WebContext) -> FastAPI:
    """The HTTP side of a process that serves no viewer (an ingest node, a worker): ``/health`` and ``/metrics``."""
    app = FastAPI(title="DICOM AI node", summary="Health and metrics of one process of the DICOM AI node.")
    app.state.context = context
    app.include_router(health.router)
    app.include_router(metrics.router)
    return app
