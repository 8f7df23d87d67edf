"""The index's schema version: where an index stands against the code's migrations (Alembic, in
``dicom_node/migrations``), and bringing it to a revision without losing it.

- PostgreSQL: a change runs in one transaction (PostgreSQL's DDL is transactional) under an advisory lock, so
  that processes which upgrade one index at once are serialised and a failed migration leaves it as it was.
- SQLite: the driver commits DDL as it goes, so a copy of the database is taken before a change and restored
  if the change fails. The copy is kept, and its name logged.
- An index from before migrations (the node's tables, no ``alembic_version``) is completed and stamped at the
  baseline first (:mod:`dicom_node.legacy_index`).
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect

from dicom_node.legacy_index import LegacyIndexMismatch, complete, plan_completion
from dicom_node.migrations import baseline

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
UPGRADE_LOCK = 0x64636D6E  # the key of the PostgreSQL advisory lock that serialises schema changes ("dcmn")


class IndexNotReady(Exception):
    """The index is not at the code's schema and cannot be brought there now; the message is one line."""


@dataclass(frozen=True)
class IndexRevision:
    """Where an index stands: its revision (None: no version table) and the code's head."""

    current: str | None
    head: str
    legacy: bool  # the node's tables without a version table: made before migrations
    known: bool  # the revision is one of the code's (None counts as known)

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    def __str__(self) -> str:
        if self.current is None:
            return "none (an index from before migrations)" if self.legacy else "none (empty)"
        if not self.known:
            return f"{self.current} (unknown to this version of the node: a newer one upgraded the index)"
        return f"{self.current} (head)" if self.at_head else self.current


@dataclass(frozen=True)
class SchemaChange:
    before: IndexRevision
    after: IndexRevision
    copy: Path | None  # SQLite: the copy taken before the change


def index_revision(engine: Engine, migrations: Path = MIGRATIONS) -> IndexRevision:
    with engine.connect() as connection:
        return _revision(connection, ScriptDirectory(str(migrations)))


def history(migrations: Path = MIGRATIONS) -> list[str]:
    """The revisions, oldest first, one line each: id, the head marked, and the first line of its message."""
    script = ScriptDirectory(str(migrations))
    head = script.get_current_head()
    return [
        f"{revision.revision}{' (head)' if revision.revision == head else ''}: {revision.doc}"
        for revision in reversed(list(script.walk_revisions()))
    ]


def prepare_index(engine: Engine, auto_upgrade: bool | None) -> None:
    """At start: let the node run on an index at the code's head, upgrading it first where that is allowed.

    ``auto_upgrade`` None: upgrade an SQLite index (one process owns it), refuse a PostgreSQL one that is
    behind (several processes may share it: an operator upgrades it once, or sets ``auto_upgrade``).

    Raises:
        IndexNotReady: the index is behind and may not be upgraded here, is ahead of the code, or the upgrade
            failed (the index is then as it was).
    """
    state = index_revision(engine)
    if state.at_head:
        log.info("index at revision %s", state)
        return
    if not state.known:
        raise IndexNotReady(f"the index is at revision {state}; start that version of the node")
    if not (auto_upgrade if auto_upgrade is not None else engine.dialect.name == "sqlite"):
        raise IndexNotReady(
            f"the index is at revision {state}, behind the code's {state.head}: run 'dicom-node db upgrade' with "
            "this configuration, or set database.auto_upgrade: true"
        )
    change = upgrade_index(engine)
    if change.before == change.after:
        log.info("index at revision %s: another process upgraded it meanwhile", change.after)
    else:
        log.info("index upgraded from revision %s to %s", change.before, change.after)


def upgrade_index(engine: Engine, revision: str = "head", migrations: Path = MIGRATIONS) -> SchemaChange:
    """Bring the index to ``revision`` (or leave it, when it is there already).

    Raises:
        IndexNotReady: the index is not one the migrations can upgrade (nothing was changed), or a migration
            failed (the index is as it was).
    """
    return _change(engine, migrations, revision, command.upgrade)


def downgrade_index(engine: Engine, revision: str, migrations: Path = MIGRATIONS) -> SchemaChange:
    """Take the index back to ``revision``, for a return to an older version of the node."""
    return _change(engine, migrations, revision, command.downgrade)


def _change(engine: Engine, migrations: Path, revision: str, step) -> SchemaChange:
    script = ScriptDirectory(str(migrations))
    try:
        target = script.get_revision(revision)
    except CommandError:
        raise IndexNotReady(
            f"no revision {revision!r} among the migrations ('dicom-node db history' lists them)"
        ) from None
    target_id = target.revision if target is not None else None
    copy: Path | None = None
    with engine.connect() as connection, _foreign_keys_off(connection):
        try:
            with connection.begin():
                _serialise(connection)
                before = _revision(connection, script)
                if before.current == target_id:
                    return SchemaChange(before, before, None)
                completion = plan_completion(connection) if before.legacy else None
                copy = _safety_copy(connection, before)
                config = Config()
                config.set_main_option("script_location", str(migrations))
                config.attributes["connection"] = connection
                if completion is not None:
                    complete(connection, completion)
                    command.stamp(config, BASELINE)
                step(config, target_id or "base")
                _check_foreign_keys(connection)
                after = _revision(connection, script)
        except LegacyIndexMismatch as error:
            raise IndexNotReady(f"{error}; nothing was changed") from None
        except Exception as error:
            if copy is not None:
                _restore(connection, copy)
            where = f", restored from {copy}" if copy is not None else ""
            raise IndexNotReady(
                f"the change of the index to revision {revision} failed and was undone{where}: "
                f"{type(error).__name__}: {str(error).splitlines()[0]}"
            ) from error
    return SchemaChange(before, after, copy)


def _revision(connection: Connection, script: ScriptDirectory) -> IndexRevision:
    heads = MigrationContext.configure(connection).get_current_heads()
    current = heads[0] if heads else None
    legacy = current is None and bool(set(inspect(connection).get_table_names()) & set(baseline.metadata.tables))
    known = current is None or current in {revision.revision for revision in script.walk_revisions()}
    return IndexRevision(current, script.get_current_head(), legacy, known)


def _serialise(connection: Connection) -> None:
    """PostgreSQL: wait for any other process's schema change; the lock is released at commit or rollback."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK})")


@contextmanager
def _foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite: batch migrations copy and rename tables, which foreign key enforcement would get in the way of
    (SQLite's own procedure for schema changes); :func:`_check_foreign_keys` checks the rows afterwards."""
    if connection.dialect.name != "sqlite":
        yield
        return
    driver = connection.connection.driver_connection
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        driver.execute("PRAGMA foreign_keys=ON")


def _check_foreign_keys(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").first()
        if broken is not None:
            raise IndexNotReady(f"a row of table {broken[0]} refers to a row of {broken[2]} that is not there")


def _safety_copy(connection: Connection, before: IndexRevision) -> Path | None:
    """SQLite with tables in a file: a consistent copy of the database beside it (the backup API, so that
    what the write-ahead log holds is in it too)."""
    database = connection.engine.url.database
    if connection.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    if before.current is None and not before.legacy:
        return None  # empty: nothing to keep
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    copy = Path(f"{database}.before-{before.current or 'migrations'}-{stamp}")
    with sqlite3.connect(copy) as target:
        connection.connection.driver_connection.backup(target)
    target.close()
    log.info("copied the index to %s before changing its schema; remove it once the node runs well", copy)
    return copy


def _restore(connection: Connection, copy: Path) -> None:
    source = sqlite3.connect(copy)
    try:
        source.backup(connection.connection.driver_connection)
    finally:
        source.close()
    log.error("the schema change failed: the index was restored from %s", copy)
