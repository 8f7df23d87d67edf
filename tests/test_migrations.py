"""The index under Alembic migrations, on SQLite and on a real PostgreSQL: indexes made before migrations are
upgraded with every row, the models and the migrations agree, a failed migration changes nothing, and the
start-up policy (SQLite upgrades itself, PostgreSQL waits for an operator or takes turns under a lock)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from dicom_node.cli import main
from dicom_node.config import DatabaseSettings, Settings
from dicom_node.database import create_index_engine, open_index, session_factory
from dicom_node.index_schema import (
    BASELINE,
    MIGRATIONS,
    UPGRADE_LOCK,
    IndexNotReady,
    downgrade_index,
    head_revision,
    index_revision,
    upgrade_index,
)
from dicom_node.migrations.task_engine import comparison_options
from dicom_node.models import Base
from tests.index_states import (
    LEGACY_COMMITS,
    PATIENT_ID,
    ROWS,
    SOURCE_UID,
    all_rows,
    build_legacy_index,
    fill,
    run_script,
    schema,
)
from tests.postgres import create_database, psycopg_url
from tests.serve_process import ServeProcess, with_onnx_graphs
from web.app import create_app
from web.dependencies import WebContext

_numbers = itertools.count()
# PostgreSQL's waiting lock requests on the upgrade lock (a key below 2**32 stands in pg_locks as objid)
WAITING_FOR_THE_LOCK = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid::bigint = %s"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database, on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite3'}"
    return create_database(request.getfixturevalue("postgres_server"), f"migrations_{next(_numbers)}")


@contextmanager
def engine_of(index_url: str) -> Iterator[Engine]:
    engine = create_index_engine(index_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def engine(index_url: str) -> Iterator[Engine]:
    with engine_of(index_url) as engine:
        yield engine


def assert_foreign_keys_enforced(engine: Engine) -> None:
    """On the connection the migration used, the only one in the pool, as the node gets it next."""
    assert engine.pool.checkedin() == 1
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1, "enforced again afterwards"


def differences_from_the_models(engine: Engine) -> list:
    with engine.connect() as connection:
        options = {"compare_type": True, "compare_server_default": True} | comparison_options(engine.dialect.name)
        context = MigrationContext.configure(connection, opts=options)
        return compare_metadata(context, Base.metadata)


def migrations_with(tmp_path: Path, revision: str, body: str) -> Path:
    """A copy of the node's migrations with one more revision after the head, whose functions are ``body``."""
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    head = head_revision()
    (copy / "versions" / f"{revision}_test.py").write_text(
        f'"""A revision of the tests."""\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        f"revision = {revision!r}\ndown_revision = {head!r}\nbranch_labels = None\ndepends_on = None\n\n{body}"
    )
    return copy


# --- the models and the migrations ---------------------------------------------------------------------------


def test_the_migrations_at_head_build_what_the_models_describe(engine: Engine) -> None:
    """A change to dicom_node/models.py without its revision fails here."""
    upgrade_index(engine)
    assert differences_from_the_models(engine) == []
    assert index_revision(engine).at_head
    if engine.dialect.name == "sqlite":
        assert_foreign_keys_enforced(engine)


def test_upgrade_downgrade_to_the_baseline_and_upgrade_again_gives_the_same_schema(
    engine: Engine, tmp_path: Path
) -> None:
    """Every revision after the baseline, and one of the tests' that uses batch mode, there and back."""
    migrations = migrations_with(
        tmp_path,
        "9000",
        "def upgrade():\n"
        "    op.create_table('annotations', sa.Column('id', sa.Integer, primary_key=True),\n"
        "                    sa.Column('instance_pk', sa.Integer, sa.ForeignKey('instances.id'), nullable=False))\n"
        "    with op.batch_alter_table('deliveries') as batch:\n"
        "        batch.add_column(sa.Column('priority', sa.Integer, nullable=True))\n\n"
        "def downgrade():\n"
        "    with op.batch_alter_table('deliveries') as batch:\n"
        "        batch.drop_column('priority')\n"
        "    op.drop_table('annotations')\n",
    )
    upgrade_index(engine, BASELINE, migrations)
    at_baseline = schema(engine)
    upgrade_index(engine, "head", migrations)
    at_head = schema(engine)
    assert "annotations" in at_head and "priority" in str(at_head["deliveries"]["columns"])

    change = downgrade_index(engine, BASELINE, migrations)
    assert (change.before.current, change.after.current) == ("9000", BASELINE)
    assert schema(engine) == at_baseline
    upgrade_index(engine, "head", migrations)
    assert schema(engine) == at_head


def test_the_baseline_is_not_downgraded_below(engine: Engine) -> None:
    upgrade_index(engine)
    fill(engine)
    with pytest.raises(IndexNotReady, match="going below it would drop every table"):
        downgrade_index(engine, "base")
    assert index_revision(engine).at_head and all_rows(engine)["patients"]


# --- indexes from before migrations --------------------------------------------------------------------------


@pytest.mark.parametrize("commit", LEGACY_COMMITS)
def test_an_index_from_before_migrations_upgrades_keeping_every_row(
    index_url: str, engine: Engine, commit: str, tmp_path: Path
) -> None:
    build_legacy_index(index_url, commit)
    fill(engine)
    before = all_rows(engine)
    assert index_revision(engine).legacy

    upgraded = open_index(DatabaseSettings(url=index_url, auto_upgrade=True))
    try:
        assert index_revision(upgraded).at_head
        assert differences_from_the_models(upgraded) == []
        after = all_rows(upgraded)
        for table, rows in before.items():
            assert [{key: row[key] for key in rows[0]} for row in after[table]] == rows, table
        if "generation" not in before["jobs"][0]:
            assert [job["generation"] for job in after["jobs"]] == [0] * len(ROWS["jobs"]), "filled where added"

        settings = Settings(storage={"root": tmp_path / "storage"}, database={"url": index_url})
        client = TestClient(create_app(WebContext(settings, session_factory(upgraded), lambda: True)))
        patients = client.get("/api/patients").json()
        assert [patient["patient_id"] for patient in patients["items"]] == [PATIENT_ID]
        tree = client.get(f"/api/patients/{quote(PATIENT_ID, safe='')}").json()
        instances = [i for study in tree["studies"] for series in study["series"] for i in series["instances"]]
        assert {instance["sop_instance_uid"] for instance in instances} == {
            row["sop_instance_uid"] for row in ROWS["instances"]
        }
        instance = client.get(f"/api/instances/{SOURCE_UID}").json()
        assert [job["kind"] for job in instance["jobs"]] == [job["kind"] for job in ROWS["jobs"]]
        assert [result["values"] for result in instance["results"]] == [
            row["values"] for row in before.get("results", [])
        ]
        assert client.get("/api/jobs").json()["total"] == len(ROWS["jobs"])
        assert client.get("/api/deliveries").json()["total"] == len(before.get("deliveries", []))
    finally:
        upgraded.dispose()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("ALTER TABLE jobs ADD COLUMN priority INTEGER", "column jobs.priority is not one of the node's"),
        ("CREATE TABLE notes (id INTEGER PRIMARY KEY)", "table notes is not one of the node's"),
        (
            "ALTER TABLE instances DROP CONSTRAINT instances_source_instance_pk_fkey",
            "foreign key on table instances (source_instance_pk) is missing",
        ),
    ],
)
def test_an_index_that_differs_otherwise_is_refused_and_left_as_it_was(
    index_url: str, engine: Engine, change: str, named: str, tmp_path: Path
) -> None:
    if "DROP CONSTRAINT" in change and engine.dialect.name == "sqlite":
        pytest.skip("SQLite drops no constraint")
    build_legacy_index(index_url, "6d626fc" if "source_instance_pk" in change else "d2d7987")
    run_script(index_url, change)
    fill(engine)
    before = (schema(engine), all_rows(engine))

    with pytest.raises(IndexNotReady) as refusal:
        upgrade_index(engine)
    message = str(refusal.value)
    assert named in message and "nothing was changed" in message and "\n" not in message
    assert (schema(engine), all_rows(engine)) == before
    assert index_revision(engine).current is None
    if engine.dialect.name == "sqlite":
        assert not list(tmp_path.glob("index.sqlite3.before-*")), "no copy for a change that was never made"


# --- failures ------------------------------------------------------------------------------------------------

FAILING_REVISION = (
    "def upgrade():\n"
    "    op.create_table('annotations', sa.Column('id', sa.Integer, primary_key=True))\n"
    "    with op.batch_alter_table('deliveries') as batch:\n"
    "        batch.add_column(sa.Column('priority', sa.Integer, nullable=True))\n"
    "    op.execute(\"UPDATE deliveries SET priority = 1, state = 'pending'\")\n"
    "    op.execute('DELETE FROM tracking')\n"
    "    raise RuntimeError('a bug in revision 9001')\n\n"
    "def downgrade():\n    pass\n"
)


@pytest.mark.parametrize("start", ["empty", "at the baseline, with rows"])
def test_a_migration_that_fails_midway_leaves_the_index_as_it_was(
    engine: Engine, start: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    if start != "empty":
        upgrade_index(engine)
        fill(engine)
    before = (schema(engine), all_rows(engine), index_revision(engine))

    with pytest.raises(IndexNotReady) as failure:
        upgrade_index(engine, "head", migrations_with(tmp_path, "9001", FAILING_REVISION))
    assert str(failure.value) == (
        "the change of the index to revision head failed and was rolled back: RuntimeError: a bug in revision 9001"
    )
    assert (schema(engine), all_rows(engine), index_revision(engine)) == before
    if engine.dialect.name == "sqlite":
        assert_foreign_keys_enforced(engine)
        copies = list(tmp_path.glob("index.sqlite3.before-*"))
        assert len(copies) == (start != "empty") and all(f"copied the index to {c}" in caplog.text for c in copies)
        for copy in copies:  # the state before, with what the write-ahead log held
            with engine_of(f"sqlite:///{copy}") as copied:
                assert (schema(copied), all_rows(copied), index_revision(copied)) == before


def test_a_migration_that_leaves_rows_pointing_nowhere_is_rolled_back(engine: Engine, tmp_path: Path) -> None:
    """SQLite migrates with foreign key enforcement off (its procedure for schema changes); the rows are
    checked before the commit."""
    upgrade_index(engine)
    fill(engine)
    before = (schema(engine), all_rows(engine))
    orphans = "def upgrade():\n    op.execute('DELETE FROM patients')\n\ndef downgrade():\n    pass\n"
    with pytest.raises(IndexNotReady, match="failed and was rolled back"):
        upgrade_index(engine, "head", migrations_with(tmp_path, "9003", orphans))
    assert (schema(engine), all_rows(engine)) == before


def test_while_the_schema_of_an_sqlite_index_changes_no_other_connection_writes(tmp_path: Path) -> None:
    """So that no write made meanwhile can be lost when the change is rolled back."""
    database = tmp_path / "index.sqlite3"
    engine = create_index_engine(f"sqlite:///{database}")
    upgrade_index(engine)
    fill(engine)
    before = all_rows(engine)
    writes_meanwhile = (
        "def upgrade():\n"
        "    import sqlite3\n"
        f"    other = sqlite3.connect({str(database)!r}, timeout=0)\n"
        "    try:\n"
        "        other.execute(\"UPDATE patients SET name = 'WRITTEN^MEANWHILE'\")\n"
        "        other.commit()\n"
        "    except sqlite3.OperationalError as error:\n"
        "        raise RuntimeError(f'another writer was held off: {error}')\n"
        "    finally:\n"
        "        other.close()\n"
        "    raise RuntimeError('another connection wrote during the change')\n\n"
        "def downgrade():\n    pass\n"
    )
    try:
        with pytest.raises(IndexNotReady, match="another writer was held off: database is locked"):
            upgrade_index(engine, "head", migrations_with(tmp_path, "9002", writes_meanwhile))
        assert all_rows(engine) == before
    finally:
        engine.dispose()


def test_an_index_ahead_of_the_code_is_refused_at_start_and_by_upgrade(index_url: str, engine: Engine) -> None:
    upgrade_index(engine)
    fill(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    before = (schema(engine), all_rows(engine))
    ahead = "the index is at revision ffff (unknown to this version of the node: a newer one upgraded the index)"
    with pytest.raises(IndexNotReady) as refusal:
        open_index(DatabaseSettings(url=index_url, auto_upgrade=True))
    assert str(refusal.value) == f"{ahead}; run that version of the node"
    with pytest.raises(IndexNotReady) as refusal:
        upgrade_index(engine)
    assert str(refusal.value) == f"{ahead}; run that version of the node"
    assert (schema(engine), all_rows(engine)) == before


# --- at start, and the operator's commands -------------------------------------------------------------------


def test_sqlite_upgrades_itself_at_start_and_postgresql_waits_for_the_operator(
    index_url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    if engine.dialect.name == "postgresql":
        with pytest.raises(IndexNotReady) as refusal:
            open_index(DatabaseSettings(url=index_url))
        assert str(refusal.value) == (
            f"the index is at revision none (empty), behind the code's {head_revision()}: "
            "run 'dicom-node db upgrade' with this configuration, or set database.auto_upgrade: true"
        )
        assert schema(engine) == {}
        upgrade_index(engine)  # what the operator's command does
    caplog.clear()
    started = open_index(DatabaseSettings(url=index_url))
    try:
        assert index_revision(started).at_head
    finally:
        started.dispose()
    head = head_revision()
    if engine.dialect.name == "sqlite":
        assert f"index upgraded from revision none (empty) to {head} (head)" in caplog.text
    else:
        assert f"index at revision {head} (head)" in caplog.text


def test_the_db_commands(index_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"storage:\n  root: {tmp_path / 'storage'}\ndatabase:\n  url: '{index_url}'\n")
    head = head_revision()

    def db(*args: str) -> tuple[int, str, str]:
        code = main(["db", *args, "--config", str(config)])
        captured = capsys.readouterr()
        return code, captured.out.strip(), captured.err.strip()

    assert db("current") == (0, "none (empty)", "")
    upgrade = f"dicom-node db upgrade --config {config}"
    assert db("check") == (1, f"index at revision none (empty), not the code's {head}: run '{upgrade}'", "")
    unknown = "dicom-node: no revision 'nowhere' among the migrations ('dicom-node db history' lists them)"
    assert db("upgrade", "--revision", "nowhere") == (1, "", unknown)
    assert db("upgrade") == (0, f"index changed from revision none (empty) to {head} (head)", "")
    assert db("check") == (0, f"index at revision {head} (head)", "")
    assert db("upgrade") == (0, f"index already at revision {head} (head)", "")
    assert db("current") == (0, f"{head} (head)", "")
    with engine_of(index_url) as engine, engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    ahead = "ffff (unknown to this version of the node: a newer one upgraded the index)"
    assert db("check") == (1, f"index at revision {ahead}, not the code's {head}: run that version of the node", "")
    assert db("upgrade") == (1, "", f"dicom-node: the index is at revision {ahead}; run that version of the node")
    history = db("history")[1].splitlines()
    assert history[0].startswith(BASELINE) and "Baseline: the index as the node created it" in history[0]
    assert history[-1].startswith(f"{head} (head): ")

    if make_url(index_url).get_backend_name() == "sqlite":
        not_a_database = tmp_path / "not-a-database"
        not_a_database.write_text("patients: many\n" * 100)
        config.write_text(f"storage:\n  root: {tmp_path / 'storage'}\ndatabase:\n  url: 'sqlite:///{not_a_database}'\n")
        unusable = "dicom-node: cannot use the index: DatabaseError: (sqlite3.DatabaseError) file is not a database"
        assert db("current") == (1, "", unusable)


# --- served, as an administrator starts the node -------------------------------------------------------------


def test_serve_on_an_index_from_before_migrations_upgrades_it_and_shows_its_patients(
    tmp_path: Path, onnx_graphs: Path
) -> None:
    """`make run` after a `git pull` over a node that ran before migrations: no step added."""
    storage = with_onnx_graphs(tmp_path / "storage", onnx_graphs)
    index_url = f"sqlite:///{storage / 'index.sqlite3'}"
    build_legacy_index(index_url, "6d626fc")
    legacy = create_index_engine(index_url)
    fill(legacy)
    legacy.dispose()

    node = ServeProcess(storage)
    try:
        node.wait_until_ready()
        with urllib.request.urlopen(f"http://127.0.0.1:{node.web_port}/api/patients", timeout=5) as response:
            assert [patient["patient_id"] for patient in json.load(response)["items"]] == [PATIENT_ID]
        code, output = node.stop()
    finally:
        node.ensure_stopped()
    assert code == 0, output
    head = head_revision()
    assert f"index upgraded from revision none (an index from before migrations) to {head} (head)" in output
    (copy,) = storage.glob("index.sqlite3.before-migrations-*")
    assert f"copied the index to {copy}" in output


def test_serve_on_a_postgresql_index_behind_the_code_stops_with_one_line(
    postgres_server: str, tmp_path: Path, onnx_graphs: Path
) -> None:
    index_url = create_database(postgres_server, f"migrations_{next(_numbers)}")
    node = ServeProcess(
        with_onnx_graphs(tmp_path / "storage", onnx_graphs), environment={"DICOM_NODE_DATABASE__URL": index_url}
    )
    try:
        code, output = node.wait_for_exit()
    finally:
        node.ensure_stopped()
    assert code == 1
    assert output.strip().splitlines()[-1] == (
        f"dicom-node: the index is at revision none (empty), behind the code's {head_revision()}: "
        "run 'dicom-node db upgrade' with this configuration, or set database.auto_upgrade: true"
    )


def test_two_nodes_that_start_at_once_on_one_postgresql_index_both_come_up_and_upgrade_it_once(
    postgres_server: str, tmp_path: Path, onnx_graphs: Path
) -> None:
    index_url = create_database(postgres_server, f"migrations_{next(_numbers)}")
    environment = {"DICOM_NODE_DATABASE__URL": index_url, "DICOM_NODE_DATABASE__AUTO_UPGRADE": "true"}
    nodes: list[ServeProcess] = []
    with psycopg.connect(psycopg_url(index_url), autocommit=True) as holder:
        # The test holds the upgrade lock while both start, so that both reach it before either upgrades.
        holder.execute("SELECT pg_advisory_lock(%s)", [UPGRADE_LOCK])
        try:
            for number in range(2):
                storage = with_onnx_graphs(tmp_path / f"storage-{number}", onnx_graphs)
                nodes.append(ServeProcess(storage, environment=environment))
            deadline = time.monotonic() + 120
            while holder.execute(WAITING_FOR_THE_LOCK, [UPGRADE_LOCK]).fetchone()[0] < 2:
                assert time.monotonic() < deadline, "the nodes never waited for the upgrade lock"
                assert all(node.process.poll() is None for node in nodes), [node.output() for node in nodes]
                time.sleep(0.2)
            holder.execute("SELECT pg_advisory_unlock(%s)", [UPGRADE_LOCK])
            for node in nodes:
                node.wait_until_ready()
            outputs = [node.stop()[1] for node in nodes]
        finally:
            for node in nodes:
                node.ensure_stopped()
    head = head_revision()
    upgraded = [f"index upgraded from revision none (empty) to {head} (head)" in output for output in outputs]
    waited = [f"index at revision {head} (head): another process upgraded it meanwhile" in output for output in outputs]
    assert sorted(upgraded) == [False, True] and waited == [not did for did in upgraded], outputs
