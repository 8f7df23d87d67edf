"""FastAPI dependencies: the node's recorded state, handed to routers through ``app.state``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Path, Query, Request
from pydantic import AfterValidator
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit.trail import AuditTrail
from dicom_node.config import Settings
from dicom_node.storage import InstanceStore
from dicom_node.users import Users
from web.oidc import OidcClient

if TYPE_CHECKING:
    from dicom_node.node import Node


@dataclass(frozen=True)
class WebContext:
    settings: Settings
    sessions: sessionmaker[Session]
    listener_up: Callable[[], bool]
    # the running node: its ingestor, queue and models serve POST /predict; None = the API only reads
    node: Node | None = None

    @functools.cached_property
    def store(self) -> InstanceStore:
        """The stored files, under the same root as the node's."""
        return InstanceStore(self.settings.storage.root)

    @functools.cached_property
    def trail(self) -> AuditTrail:
        if self.node is not None:
            return self.node.trail
        return AuditTrail(self.settings.database, self.settings.storage.root)

    @functools.cached_property
    def users(self) -> Users:
        return Users(self.sessions, self.trail)

    @functools.cached_property
    def oidc(self) -> OidcClient | None:
        """The provider's client, where ``web.oidc`` names one."""
        return OidcClient(self.settings.web.oidc) if self.settings.web.oidc is not None else None


def get_context(request: Request) -> WebContext:
    return request.app.state.context


ContextDep = Annotated[WebContext, Depends(get_context)]


def get_settings(context: ContextDep) -> Settings:
    return context.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(context: ContextDep) -> Iterator[Session]:
    """A session for one request; it reads, and a route that writes commits itself."""
    with context.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_store(context: ContextDep) -> InstanceStore:
    return context.store


StoreDep = Annotated[InstanceStore, Depends(get_store)]

# Numbers beyond what the database takes are refused with 422 by their declared bounds, rather than overflowing in
# the driver (a 500): an OFFSET is a 64-bit integer (SQLite, PostgreSQL's bigint), and the tables' ids are
# INTEGER columns, 32-bit in PostgreSQL.
MAX_OFFSET = 2**63 - 1
MAX_ROW_ID = 2**31 - 1

Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")]
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="The row's id (a positive 32-bit integer).")]


def _without_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL (0x00) characters are not allowed: no value in the index holds one")
    return value


# Text looked up in the index (an id, a search): PostgreSQL cannot take a NUL character in a text parameter (the
# driver raises, a 500), so a value with one is refused with 422.
IndexText = Annotated[str, AfterValidator(_without_nul)]
Limit = Annotated[int, Query(ge=1, le=500, description="Items on the page at most.")]
