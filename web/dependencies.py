"""FastAPI dependencies: the node's recorded state, handed to routers through ``app.state``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings


@dataclass(frozen=True)
class WebContext:
    settings: Settings
    sessions: sessionmaker[Session]
    listener_up: Callable[[], bool]


def get_context(request: Request) -> WebContext:
    return request.app.state.context


ContextDep = Annotated[WebContext, Depends(get_context)]
