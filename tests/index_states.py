"""Indexes as the node left them over its history, for the migration tests: the schema of an older version
built from its DDL (``tests/legacy_indexes``), filled with rows of every kind, and snapshots of a schema and
of every row to compare before and after a change."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import psycopg
from sqlalchemy import Engine, MetaData, inspect, select
from sqlalchemy.engine import make_url

from tests.postgres import psycopg_url

LEGACY_INDEXES = Path(__file__).with_name("legacy_indexes")
# Schemas the node made before migrations: the first one; one before jobs.generation and the deliveries
# table; the baseline's (the last commit before migrations).
LEGACY_COMMITS = ("98a718c", "d2d7987", "6d626fc")

PATIENT_ID = "AB/12 34"
SOURCE_UID = "1.2.826.0.1.3680043.10.1234.1.1"
_AT = dt.datetime(2026, 1, 5, 9, 30)

# Rows of every table of the baseline; a table or column that an older schema lacks is left out there.
ROWS: dict[str, list[dict]] = {
    "patients": [
        {"id": 1, "patient_id": PATIENT_ID, "storage_key": "k" * 32, "name": "DOE^JANE", "sex": "F"}
        | {"birth_date": dt.date(2014, 3, 1)}
    ],
    "studies": [
        {"id": 1, "study_instance_uid": "1.2.826.0.1.3680043.10.1234.1", "patient_pk": 1}
        | {"study_date": dt.date(2026, 1, 5), "accession_number": "ACC1", "description": "HAND PA"}
    ],
    "series": [
        {"id": 1, "series_instance_uid": "1.2.826.0.1.3680043.10.1234.1.0", "study_pk": 1, "modality": "DX"}
        | {"body_part_examined": "HAND", "description": "PA"},
        {"id": 2, "series_instance_uid": "1.2.826.0.1.3680043.10.1234.1.9", "study_pk": 1, "modality": "SR"}
        | {"body_part_examined": None, "description": "AI results"},
    ],
    "instances": [
        {"id": 1, "sop_instance_uid": SOURCE_UID, "series_pk": 1, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1"}
        | {"transfer_syntax_uid": "1.2.840.10008.1.2.1", "instance_number": 1, "rows": 2048, "columns": 1680}
        | {"path": "patients/k/1.dcm", "size_bytes": 6881280, "calling_ae": "MODALITY", "received_at": _AT},
        {"id": 2, "sop_instance_uid": "1.2.826.0.1.3680043.10.1234.9.1", "series_pk": 2}
        | {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34", "transfer_syntax_uid": "1.2.840.10008.1.2.1"}
        | {"instance_number": 1, "rows": None, "columns": None, "path": "patients/k/2.dcm", "size_bytes": 4096}
        | {"calling_ae": None, "source_instance_pk": 1, "received_at": _AT},
    ],
    "jobs": [
        {"id": 1, "instance_pk": 1, "kind": "inference", "state": "done", "attempts": 1, "generation": 0}
        | {"last_error": None, "note": None, "created_at": _AT, "available_at": _AT, "updated_at": _AT},
        {"id": 2, "instance_pk": 1, "kind": "outputs", "state": "failed", "attempts": 3, "generation": 0}
        | {"last_error": "disk full", "note": None, "created_at": _AT, "available_at": _AT, "updated_at": _AT},
    ],
    "results": [
        {"id": 1, "instance_pk": 1, "task": "bone_age", "output": "female", "is_primary": True}
        | {"summary": "bone age 11.2 years", "values": {"age_months": 134.4, "sigma_months": 9.1, "sex": "F"}}
        | {"heatmap_path": "patients/k/1.heatmaps.npz", "model_name": "bone-age-demo", "model_version": "1.0.0"}
        | {"weights_digest": "sha256:" + "0" * 64, "demo_model": True, "timings_ms": {"model": 41.5}}
        | {"created_at": _AT}
    ],
    "deliveries": [
        {"id": 1, "instance_pk": 2, "destination": "pacs", "state": "failed", "attempts": 3, "last_status": 0xA700}
        | {"last_error": "out of resources", "created_at": _AT, "available_at": _AT, "sent_at": None}
        | {"updated_at": _AT}
    ],
    "tracking": [
        {"id": 1, "instance_pk": 1, "result_id": 1, "state": "logged", "attempts": 1, "last_error": None}
        | {"experiment_id": "1", "run_id": "a" * 32, "available_at": _AT, "logged_at": _AT, "updated_at": _AT}
    ],
}


def run_script(url: str, sql: str) -> None:
    """Run a script of several statements, as a DBA would with psql or sqlite3."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        with sqlite3.connect(parsed.database) as connection:
            connection.executescript(sql)
        connection.close()
    else:
        with psycopg.connect(psycopg_url(url)) as connection:
            connection.execute(sql)


def build_legacy_index(url: str, commit: str) -> None:
    """The empty index at ``url`` made as the node at ``commit`` made it."""
    dialect = make_url(url).get_backend_name()
    run_script(url, (LEGACY_INDEXES / f"{commit}.{dialect}.sql").read_text())


def fill(engine: Engine) -> None:
    """Insert :data:`ROWS`, each as far as the index's tables and columns go."""
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.begin() as connection:
        for name, rows in ROWS.items():
            if name in metadata.tables:
                table = metadata.tables[name]
                connection.execute(table.insert(), [{k: v for k, v in row.items() if k in table.c} for row in rows])


def all_rows(engine: Engine) -> dict[str, list[dict]]:
    """Every row of every table and view (but Alembic's), by table, in key order (a view's: its ``id``; on
    PostgreSQL ``jobs`` is a view of the task engine's jobs)."""
    metadata = MetaData()
    metadata.reflect(engine, views=True)
    with engine.connect() as connection:
        return {
            name: [
                dict(row._mapping)
                for row in connection.execute(select(table).order_by(*(table.primary_key or [table.c.id])))
            ]
            for name, table in sorted(metadata.tables.items())
            if name != "alembic_version"
        }


def schema(engine: Engine) -> dict[str, dict]:
    """What a schema is made of, table by table, in a form two schemas can be compared in."""
    inspector = inspect(engine)
    return {
        name: {
            "columns": sorted(  # by name: a column added later stands last on PostgreSQL
                (column["name"], str(column["type"]), column["nullable"], column.get("default"))
                for column in inspector.get_columns(name)
            ),
            "primary key": inspector.get_pk_constraint(name)["constrained_columns"],
            "foreign keys": sorted(
                (tuple(key["constrained_columns"]), key["referred_table"], tuple(key["referred_columns"]))
                for key in inspector.get_foreign_keys(name)
            ),
            "indexes": sorted(
                (index["name"], tuple(index["column_names"]), bool(index["unique"]))
                for index in inspector.get_indexes(name)
            ),
            "unique": sorted(tuple(unique["column_names"]) for unique in inspector.get_unique_constraints(name)),
        }
        for name in sorted(inspector.get_table_names())
    }
