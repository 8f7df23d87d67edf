"""The index's schema at the baseline revision (``0001``): the tables as the node created them before it had
migrations (``dicom_node/models.py`` at commit 6d626fc).

A frozen copy, not :mod:`dicom_node.models`: the models move on with every revision, while the baseline
revision and the adoption of indexes made before migrations (:mod:`dicom_node.legacy_index`) must keep
meaning this one schema. Enumerations are the plain ``VARCHAR(16)`` the models' non-native enums create.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String(64), nullable=False, unique=True),
    Column("storage_key", String(64), nullable=False, unique=True),
    Column("name", String(324)),
    Column("sex", String(16)),
    Column("birth_date", Date),
)

Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_instance_uid", String(64), nullable=False, unique=True),
    Column("patient_pk", Integer, ForeignKey("patients.id"), nullable=False, index=True),
    Column("study_date", Date),
    Column("accession_number", String(16)),
    Column("description", String(64)),
)

Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_instance_uid", String(64), nullable=False, unique=True),
    Column("study_pk", Integer, ForeignKey("studies.id"), nullable=False, index=True),
    Column("modality", String(16)),
    Column("body_part_examined", String(64)),
    Column("description", String(64)),
)

Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", String(64), nullable=False, unique=True),
    Column("series_pk", Integer, ForeignKey("series.id"), nullable=False, index=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("instance_number", Integer),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("path", String(512), nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("calling_ae", String(16)),
    Column("source_instance_pk", Integer, ForeignKey("instances.id"), index=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("instance_pk", Integer, ForeignKey("instances.id"), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("last_error", Text),
    Column("note", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("available_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_jobs_claimable", "state", "available_at"),
)

Table(
    "results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("instance_pk", Integer, ForeignKey("instances.id"), nullable=False, index=True),
    Column("task", String(32), nullable=False),
    Column("output", String(16), nullable=False),
    Column("is_primary", Boolean, nullable=False),
    Column("summary", String(160), nullable=False),
    Column("values", JSON, nullable=False),
    Column("heatmap_path", String(512), nullable=False),
    Column("model_name", String(64), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("weights_digest", String(128), nullable=False),
    Column("demo_model", Boolean, nullable=False),
    Column("timings_ms", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("instance_pk", "task", "output"),
)

Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("instance_pk", Integer, ForeignKey("instances.id"), nullable=False, index=True),
    Column("destination", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("available_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("instance_pk", "destination"),
    Index("ix_deliveries_due", "state", "available_at"),
)

Table(
    "tracking",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("instance_pk", Integer, ForeignKey("instances.id"), nullable=False, unique=True),
    Column("result_id", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("experiment_id", String(64)),
    Column("run_id", String(64)),
    Column("available_at", DateTime(timezone=True), nullable=False),
    Column("logged_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_tracking_due", "state", "available_at"),
)
