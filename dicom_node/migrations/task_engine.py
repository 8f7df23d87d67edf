"""The schema of the task engine on PostgreSQL, frozen as revision 0002 installs it.

On PostgreSQL the node's jobs are Procrastinate's (``procrastinate_jobs``, the one record of a job's state and
attempts). Beside them the node keeps ``job_outcomes``: what a job did (its note) and why its last attempt
failed, which Procrastinate does not record, and whether its effects were committed (a job run again after a
worker died between that commit and Procrastinate's own does nothing). ``jobs`` becomes a view over both with
the columns of the SQLite table, so that the API, the viewer and ``/health`` read jobs the same way on both
backends: a view cannot disagree with what it shows.

SQLite keeps its ``jobs`` table: there the node is one process and runs the same task functions itself.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, ForeignKey, MetaData, Table, Text

PROCRASTINATE_VERSION = "3.10.0"  # the schema revision 0002 installs; a newer one comes with a revision of ours
NODE_TASKS = ("inference", "outputs")  # the task names the jobs view shows, as the kinds of the SQLite table

# Procrastinate's table is made by its own SQL; this declares the key job_outcomes refers to.
engine_metadata = MetaData()
Table("procrastinate_jobs", engine_metadata, Column("id", BigInteger, primary_key=True))
job_outcomes = Table(
    "job_outcomes",
    engine_metadata,
    Column("job_id", BigInteger, ForeignKey("procrastinate_jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("finished", Boolean, nullable=False, default=False, doc="its effects were committed"),
    Column("note", Text, doc="what it did, e.g. why it ran no task"),
    Column("last_error", Text, doc="why its last attempt failed"),
)

INSTANCE_OF_JOB = "((args->>'instance_pk')::bigint)"
JOBS_BY_INSTANCE_INDEX = (
    f"CREATE INDEX ix_procrastinate_jobs_instance ON procrastinate_jobs (task_name, {INSTANCE_OF_JOB}, id)"
)

# The newest job of each kind and instance, as the SQLite table has one row of each (a job queued again
# replaces the row there; here it is a new job, and the older one is history).
JOBS_VIEW = f"""
CREATE VIEW jobs AS
SELECT DISTINCT ON (j.task_name, {INSTANCE_OF_JOB})
    j.id AS id,
    {INSTANCE_OF_JOB} AS instance_pk,
    j.task_name::varchar(32) AS kind,
    (CASE
        WHEN o.finished THEN 'done'  -- its effects are committed; Procrastinate hears of it a moment later
        WHEN j.status = 'todo' THEN 'pending'
        WHEN j.status = 'doing' THEN 'running'
        WHEN j.status = 'succeeded' THEN 'done'
        ELSE 'failed'
    END)::varchar(16) AS state,
    -- Procrastinate counts the attempts that ended; the node the attempts begun
    j.attempts + (CASE WHEN j.status = 'doing' THEN 1 ELSE 0 END) AS attempts,
    0 AS generation,
    o.last_error AS last_error,
    o.note AS note,
    e.created_at AS created_at,
    COALESCE(j.scheduled_at, e.created_at) AS available_at,
    e.updated_at AS updated_at
FROM procrastinate_jobs AS j
LEFT JOIN job_outcomes AS o ON o.job_id = j.id
LEFT JOIN LATERAL (
    SELECT min(at) AS created_at, max(at) AS updated_at FROM procrastinate_events WHERE job_id = j.id
) AS e ON true
WHERE j.task_name IN {NODE_TASKS!r}
ORDER BY j.task_name, {INSTANCE_OF_JOB}, j.id DESC
"""


def comparison_options(dialect: str) -> dict:
    """Options of Alembic's comparison of the models with a database (autogenerate, and the tests): the task
    engine's tables are not the models', and on PostgreSQL the model of ``jobs`` is a view."""

    def include_name(name: str | None, type_: str, _parent: object) -> bool:
        return not (type_ == "table" and name is not None and _is_the_engines(name))

    def include_object(item: object, name: str | None, type_: str, _reflected: bool, _compare_to: object) -> bool:
        return not (dialect == "postgresql" and type_ == "table" and name == "jobs")

    return {"include_name": include_name, "include_object": include_object}


def _is_the_engines(table: str) -> bool:
    return table.startswith("procrastinate_") or table == "job_outcomes"
