"""The task engine on PostgreSQL: the node's jobs become Procrastinate's.

On PostgreSQL, Procrastinate's schema is installed, each row of ``jobs`` becomes a Procrastinate job (waiting
and interrupted jobs wait again, with their attempts, errors and notes), and ``jobs`` becomes a view of them
(:mod:`dicom_node.migrations.task_engine`). SQLite is not changed: its ``jobs`` table stays the queue of the
one-process node.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import procrastinate
from alembic import op
from procrastinate.schema import SchemaManager
from sqlalchemy import text

from dicom_node.migrations import baseline
from dicom_node.migrations.task_engine import (
    JOBS_BY_INSTANCE_INDEX,
    JOBS_VIEW,
    PROCRASTINATE_VERSION,
    engine_metadata,
    job_outcomes,
)

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Where the jobs of the SQLite-era table go: an inference job needs the models its image is routed to, unknown
# here, so it waits for a worker that has both.
_QUEUES = {"inference": "infer.hallux_valgus+bone_age", "outputs": "outputs"}
_STATUS = {"pending": "todo", "waiting": "todo", "running": "todo", "done": "succeeded", "failed": "failed"}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if procrastinate.__version__ != PROCRASTINATE_VERSION:
        raise RuntimeError(
            f"revision 0002 installs Procrastinate {PROCRASTINATE_VERSION}'s schema; {procrastinate.__version__} "
            "is installed"
        )
    # The driver's own connection, in the migration's transaction: the schema's functions hold $$ bodies and
    # colons that SQLAlchemy's text() would take for parameters.
    bind.connection.driver_connection.execute(SchemaManager.get_schema())
    engine_metadata.create_all(bind, tables=[job_outcomes])
    op.execute(JOBS_BY_INSTANCE_INDEX)
    _move_jobs_into_the_engine()
    op.drop_table("jobs")
    op.execute(JOBS_VIEW)


def _move_jobs_into_the_engine() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        text("SELECT id, instance_pk, kind, state, attempts, last_error, note, created_at, available_at FROM jobs")
    ).all()
    for row in rows:
        status = _STATUS[row.state]
        job_id = bind.execute(
            text(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts, scheduled_at) "
                "VALUES (:queue, :kind, jsonb_build_object('instance_pk', CAST(:instance_pk AS bigint)), "
                "CAST(:status AS procrastinate_job_status), :attempts, :scheduled_at) RETURNING id"
            ),
            {
                "queue": _QUEUES[row.kind],
                "kind": row.kind,
                "instance_pk": row.instance_pk,
                "status": status,
                "attempts": row.attempts,  # Procrastinate's count of the attempts that ended
                "scheduled_at": row.available_at if status == "todo" else None,
            },
        ).scalar_one()
        # the event of its deferral keeps its time (Procrastinate writes one for a waiting job only)
        times = {"at": row.created_at, "id": job_id}
        if not bind.execute(text("UPDATE procrastinate_events SET at = :at WHERE job_id = :id"), times).rowcount:
            bind.execute(
                text("INSERT INTO procrastinate_events (job_id, type, at) VALUES (:id, 'deferred', :at)"), times
            )
        if row.note is not None or row.last_error is not None or status == "succeeded":
            bind.execute(
                job_outcomes.insert().values(
                    job_id=job_id, finished=status == "succeeded", note=row.note, last_error=row.last_error
                )
            )


def downgrade() -> None:
    """The newest job of each kind and instance back in a ``jobs`` table (an older version of the node has one);
    Procrastinate's schema and its history of jobs are dropped."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.execute(text("CREATE TEMPORARY TABLE jobs_of_the_engine ON COMMIT DROP AS SELECT * FROM jobs"))
    op.execute("DROP VIEW jobs")
    baseline.metadata.tables["jobs"].create(bind)
    bind.execute(
        text(
            "INSERT INTO jobs (instance_pk, kind, state, attempts, generation, last_error, note, created_at, "
            "available_at, updated_at) "
            "SELECT instance_pk, kind, CASE state WHEN 'running' THEN 'pending' ELSE state END, attempts, 0, "
            "last_error, note, created_at, available_at, updated_at FROM jobs_of_the_engine ORDER BY id"
        )
    )
    op.drop_table("job_outcomes")
    for statement in bind.execute(
        text(
            "SELECT format('DROP FUNCTION %s CASCADE', oid::regprocedure) FROM pg_proc "
            "WHERE proname LIKE 'procrastinate%' AND pronamespace = 'public'::regnamespace"
        )
    ).scalars():
        op.execute(statement)
    for table in (
        "procrastinate_events",
        "procrastinate_periodic_defers",
        "procrastinate_jobs",
        "procrastinate_workers",
    ):
        op.execute(f"DROP TABLE {table} CASCADE")
    for type_name in ("procrastinate_job_to_defer_v1", "procrastinate_job_event_type", "procrastinate_job_status"):
        op.execute(f"DROP TYPE {type_name}")
