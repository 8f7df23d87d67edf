"""Engine and sessions for the index: SQLite (WAL) by default, PostgreSQL by URL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import DatabaseSettings
from dicom_node.index_schema import prepare_index

SQLITE_RETURNING = (3, 35, 0)  # the first SQLite with UPDATE ... RETURNING (dicom_node.jobs claims with it)


def open_index(database: DatabaseSettings) -> Engine:
    """An engine for the configured index, at the code's schema (:func:`dicom_node.index_schema.prepare_index`).

    Raises:
        IndexNotReady: the index is not at the code's schema and may not, or could not, be brought there.
    """
    engine = create_index_engine(database.url, database.busy_timeout)
    try:
        prepare_index(engine, database.auto_upgrade)
    except BaseException:
        engine.dispose()
        raise
    return engine


def create_index_engine(url: str, busy_timeout: float = DatabaseSettings().busy_timeout) -> Engine:
    """An engine for ``url``, as it is: the schema is :mod:`dicom_node.index_schema`'s business.

    SQLite runs in WAL mode so that readers (the web viewer) never block the SCP's writes, with
    ``synchronous=FULL`` so that a committed index row survives a power cut as the file it points at does.
    A write that finds another connection's lock waits up to ``busy_timeout`` seconds, then raises
    ``OperationalError`` ("database is locked"). Statement parameters are kept out of error messages: they
    hold patient data.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and sqlite3.sqlite_version_info < SQLITE_RETURNING:
        raise ArgumentError(
            f"SQLite {sqlite3.sqlite_version} is older than 3.35, whose UPDATE ... RETURNING the job queue claims with"
        )
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
    else:
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout},
            hide_parameters=True,
        )
        event.listen(engine, "connect", _configure_sqlite)
    return engine


def _configure_sqlite(connection, _record) -> None:
    cursor = connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
