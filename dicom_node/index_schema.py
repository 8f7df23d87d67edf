"""The index's schema version: where an index stands against the code's migrations (Alembic, in
``dicom_node/migrations``), and bringing it to a revision without losing it.

A change runs in one transaction that holds the database's write lock, so that a failed migration is rolled
back whole and nothing else writes while the schema changes:

- PostgreSQL: transactional DDL, under an advisory lock that serialises processes which change one index at
  once (the second finds the work done);
- SQLite: ``BEGIN IMMEDIATE`` on the migration's connection (SQLite's DDL is transactional; the driver only
  needs to be told where the transaction begins). A copy of the database is taken first, inside the lock, and
  kept beside it with its name logged: the way back to the older version of the node by hand.

An index from before migrations (the node's tables, no ``alembic_version``) is completed and stamped at the
baseline first (:mod:`dicom_node.legacy_index`).
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Callable, Iterator
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
    """What :func:`upgrade_index` or :func:`downgrade_index` did; ``before`` is read under the lock."""

    before: IndexRevision
    after: IndexRevision
    copy: Path | None  # SQLite: the copy taken before the change

    @property
    def changed(self) -> bool:
        return self.before.current != self.after.current


def head_revision(migrations: Path = MIGRATIONS) -> str:
    return ScriptDirectory(str(migrations)).get_current_head()


def index_revision(engine: Engine, migrations: Path = MIGRATIONS) -> IndexRevision:
    """Where the index of ``engine`` stands against ``migrations``."""
    with engine.connect() as connection:
        return _revision(connection, ScriptDirectory(str(migrations)))


def history(migrations: Path = MIGRATIONS) -> list[str]:
    """The revisions, oldest first, one line each: id, the head marked, and the first line of its message."""
    script = ScriptDirectory(str(migrations))
    head = script.get_current_head()
    return [
        f"{revision.revision}{' (head)' if revision.revision == head else ''}: {_first_line(revision.doc)}"
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
    _refuse_unknown(state)
    if not (auto_upgrade if auto_upgrade is not None else engine.dialect.name == "sqlite"):
        raise IndexNotReady(
            f"the index is at revision {state}, behind the code's {state.head}: run 'dicom-node db upgrade' with "
            "this configuration, or set database.auto_upgrade: true"
        )
    change = upgrade_index(engine)
    if change.changed:
        log.info("index upgraded from revision %s to %s", change.before, change.after)
    else:
        log.info("index at revision %s: another process upgraded it meanwhile", change.after)


def upgrade_index(engine: Engine, revision: str = "head", migrations: Path = MIGRATIONS) -> SchemaChange:
    """Bring the index to ``revision`` (or leave it, when it is there already).

    Raises:
        IndexNotReady: the index is not one the migrations can upgrade, or a migration failed; either way the
            index is as it was.
    """
    return _change(engine, migrations, revision, command.upgrade)


def downgrade_index(engine: Engine, revision: str, migrations: Path = MIGRATIONS) -> SchemaChange:
    """Take the index back to ``revision``, for a return to an older version of the node."""
    return _change(engine, migrations, revision, command.downgrade)


def _first_line(text: object) -> str:
    """The first line of a text that may have several (SQLAlchemy's error messages) or none."""
    return (str(text).splitlines() or [""])[0]


def one_line(error: BaseException) -> str:
    """An error as one line: its type, and the first line of its message if it has one."""
    message = _first_line(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _change(engine: Engine, migrations: Path, revision: str, step: Callable[[Config, str], None]) -> SchemaChange:
    script = ScriptDirectory(str(migrations))
    try:
        target = script.get_revision(revision)
    except CommandError:
        listed = "'dicom-node db history' lists them"
        raise IndexNotReady(f"no revision {revision!r} among the migrations ({listed})") from None
    target_id = target.revision if target is not None else None
    with engine.connect() as connection, _foreign_keys_off(connection):
        try:
            with connection.begin():
                _lock(connection)
                before = _revision(connection, script)
                if before.current == target_id:
                    return SchemaChange(before, before, None)
                _refuse_unknown(before)
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
        except IndexNotReady:
            raise
        except LegacyIndexMismatch as error:
            raise IndexNotReady(f"{error}; nothing was changed") from None
        except Exception as error:
            raise IndexNotReady(
                f"the change of the index to revision {revision} failed and was rolled back: {one_line(error)}"
            ) from error
    return SchemaChange(before, after, copy)


def _refuse_unknown(state: IndexRevision) -> None:
    if not state.known:
        raise IndexNotReady(f"the index is at revision {state}; run that version of the node")


def _revision(connection: Connection, script: ScriptDirectory) -> IndexRevision:
    heads = MigrationContext.configure(connection).get_current_heads()
    current = heads[0] if heads else None
    legacy = current is None and bool(set(inspect(connection).get_table_names()) & set(baseline.metadata.tables))
    known = current is None or current in {revision.revision for revision in script.walk_revisions()}
    return IndexRevision(current, script.get_current_head(), legacy, known)


def _lock(connection: Connection) -> None:
    """Take the write lock for the whole change; it is released at commit or rollback."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # waits up to the engine's busy timeout for other writers
    elif connection.dialect.name == "postgresql":
        taken = connection.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({UPGRADE_LOCK})").scalar()
        if not taken:
            log.info("waiting for another process's change of the index's schema")
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({UPGRADE_LOCK})")


@contextmanager
def _foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite: batch migrations copy and rename tables, which foreign key enforcement gets in the way of
    (SQLite's own procedure for schema changes turns it off); :func:`_check_foreign_keys` checks the rows
    afterwards. Enforcement is back on before the pool hands the connection out again."""
    if connection.dialect.name != "sqlite":
        yield
        return
    driver = connection.connection.driver_connection
    driver.execute("PRAGMA foreign_keys=OFF")  # both outside the change's transaction: within one, a no-op
    try:
        yield
    finally:
        if driver.in_transaction:  # a COMMIT that failed (busy) leaves SQLite's transaction open
            driver.rollback()
        driver.execute("PRAGMA foreign_keys=ON")


def _check_foreign_keys(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").first()
        if broken is not None:
            raise RuntimeError(f"a row of table {broken[0]} refers to a row of {broken[2]} that is not there")


def _safety_copy(connection: Connection, before: IndexRevision) -> Path | None:
    """SQLite with tables in a file: a copy of the database beside it, by the backup API (so that what the
    write-ahead log holds is in it too) through a connection of its own: the change's connection holds the
    write lock, which a backup cannot read through, and a reader beside it sees the committed state."""
    database = connection.engine.url.database
    if connection.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    if before.current is None and not before.legacy:
        return None  # empty: nothing to keep
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    copy = Path(f"{database}.before-{before.current or 'migrations'}-{stamp}")
    source, target = sqlite3.connect(database), sqlite3.connect(copy)
    try:
        source.backup(target)
    except BaseException:
        target.close()
        copy.unlink(missing_ok=True)  # a partial copy would be mistaken for a usable one
        raise
    finally:
        source.close()
    target.close()
    log.info("copied the index to %s before changing its schema; remove it once the node runs well", copy)
    return copy
