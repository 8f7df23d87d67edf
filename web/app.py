"""The FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI

from web.dependencies import WebContext
from web.routers import health


def create_app(context: WebContext) -> FastAPI:
    app = FastAPI(title="DICOM AI node", summary="Viewer and HTTP API of the DICOM AI node.")
    app.state.context = context
    app.include_router(health.router)
    return app
