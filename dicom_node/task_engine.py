"""The node's jobs on PostgreSQL: Procrastinate jobs, deferred in the transaction that makes them due.

A job is deferred on the session's own connection, so it commits or rolls back with the rows that need it (an
image acknowledged has its job; one refused has none): no broker and no relay between the two. Its state and
attempts are Procrastinate's; ``job_outcomes`` keeps what Procrastinate does not: the note of what it did, why
its last attempt failed, and whether its effects were committed (:mod:`dicom_node.migrations.task_engine`).

Queues: an inference job waits in the queue of the models its image is routed to (``infer.<task>``,
``infer.<task>+<task>`` for an image routed to two, or ``infer.none`` when no model reads it), so that
a worker takes only jobs it has the models for; outputs jobs wait in ``outputs``; ``deliver`` holds one job per
destination with objects due (:mod:`dicom_node.delivery`), ``track`` the one job that logs the runs MLflow lacks
(:mod:`dicom_node.tracking`).

Exactly-once effects: a job's handler records its effects and :func:`finish` in one transaction that first
takes the job's lock (:func:`still_claimed`); a job run again after that commit (its worker died before
Procrastinate marked it done) finds it finished and does nothing, and a job that a newer one of the same kind
and instance replaced (the image was received again) records nothing.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Collection, Iterable
from itertools import combinations
from typing import TYPE_CHECKING

from procrastinate import App, SyncPsycopgConnector
from procrastinate.exceptions import AlreadyEnqueued
from sqlalchemy import Integer, cast, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from dicom_node.config import TaskName
from dicom_node.migrations.task_engine import job_outcomes

if TYPE_CHECKING:
    from dicom_node.jobs import ClaimedJob

OUTPUTS_QUEUE = "outputs"
DELIVER_QUEUE = "deliver"
TRACK_QUEUE = "track"
NO_MODEL_QUEUE = "infer.none"
_MAX_ERROR_LENGTH = 2000
_NEWEST_JOB = text(
    "SELECT max(id) FROM procrastinate_jobs WHERE task_name = :kind AND (args->>'instance_pk')::bigint = :instance_pk"
)

# Locks the waiting job till the caller commits (a worker's fetch skips locked rows, so it cannot start before
# the rows it is to handle exist) and brings it forward to :at if it was scheduled later.
_BRING_FORWARD = text(
    "UPDATE procrastinate_jobs SET scheduled_at = CASE "
    "WHEN scheduled_at IS NULL OR CAST(:at AS timestamptz) IS NULL THEN NULL "
    "ELSE LEAST(scheduled_at, CAST(:at AS timestamptz)) END "
    "WHERE queueing_lock = :queueing_lock AND status = 'todo'"
)
# The rescue of a job whose worker died: only while it is still that worker's (another keeper may have been
# quicker, and a live worker may hold it now).
_RESCUE = text(
    "UPDATE procrastinate_jobs SET status = CAST(:status AS procrastinate_job_status), attempts = attempts + 1, "
    "scheduled_at = NULL, worker_id = NULL "
    "WHERE id = :id AND status = 'doing' AND worker_id IS NOT DISTINCT FROM :worker_id"
)
WAITING_BY_QUEUE = text(
    "SELECT j.queue_name, count(*), min(e.at) FROM procrastinate_jobs AS j "
    "LEFT JOIN procrastinate_events AS e ON e.job_id = j.id AND e.type = 'deferred' "
    "WHERE j.status = 'todo' GROUP BY j.queue_name"
)

# Deferring needs no pool of its own: every job is deferred on the connection of the transaction that needs it.
_deferrer = App(connector=SyncPsycopgConnector())


def inference_queue(tasks: Iterable[TaskName]) -> str:
    """The queue of an inference job whose image is routed to ``tasks``: their names sorted, so that every role of a
    site names it alike, whatever the order of its ``inference.tasks`` (revision 0003 sorted the older names)."""
    return "infer." + "+".join(sorted(set(tasks))) if tasks else NO_MODEL_QUEUE


def inference_queues(models: Collection[TaskName]) -> list[str]:
    """The inference queues a worker with ``models`` can take: those of every route they cover."""
    ordered = sorted(models)
    covered = [combination for size in range(1, len(ordered) + 1) for combination in combinations(ordered, size)]
    return [NO_MODEL_QUEUE] + [inference_queue(route) for route in covered]


def models_of_queues(queues: Iterable[str]) -> set[TaskName]:
    """The models a worker needs for the inference queues among ``queues``."""
    needed: set[TaskName] = set()
    for queue in queues:
        if queue.startswith("infer.") and queue != NO_MODEL_QUEUE:
            needed |= set(queue.removeprefix("infer.").split("+"))
    return needed


def all_queues(models: Collection[TaskName]) -> list[str]:
    return [*inference_queues(models), OUTPUTS_QUEUE, DELIVER_QUEUE, TRACK_QUEUE]


def defer(session: Session, kind: str, instance_pk: int, queue: str) -> None:
    """Defer a job of ``kind`` on the instance in ``session``'s transaction; it runs once that commits."""
    _lock(session, kind, instance_pk)
    connection = session.connection().connection.driver_connection
    _deferrer.configure_task(name=kind, queue=queue, connection=connection).defer(instance_pk=instance_pk)


def queue_of(session: Session, job_id: int) -> str | None:
    """The queue a job was deferred in: a job run again goes to the same one (its route decided it)."""
    return session.scalar(text("SELECT queue_name FROM procrastinate_jobs WHERE id = :id"), {"id": job_id})


def defer_unique(
    session: Session,
    task: str,
    queue: str,
    queueing_lock: str,
    lock: str | None = None,
    schedule_at: dt.datetime | None = None,
    **arguments: object,
) -> None:
    """Defer a job of ``task`` in ``session``'s transaction unless one with ``queueing_lock`` waits already: that
    one does the same work, brought forward to ``schedule_at`` (None: now) if it was scheduled later."""
    connection = session.connection().connection.driver_connection
    options: dict = {"queue": queue, "queueing_lock": queueing_lock, "lock": lock, "connection": connection}
    if schedule_at is not None:
        options["schedule_at"] = schedule_at
    for _ in range(2):  # a waiting job that a worker takes in between: defer again
        session.execute(text("SAVEPOINT defer_unique"))  # a refused insert rolls back to it, not the transaction
        try:
            _deferrer.configure_task(name=task, **options).defer(**arguments)
        except AlreadyEnqueued:
            session.execute(text("ROLLBACK TO SAVEPOINT defer_unique"))
            waiting = session.execute(_BRING_FORWARD, {"queueing_lock": queueing_lock, "at": schedule_at}).rowcount
            session.execute(text("RELEASE SAVEPOINT defer_unique"))
            if not waiting:
                continue
        else:
            session.execute(text("RELEASE SAVEPOINT defer_unique"))
        return


def rescue(session: Session, job_id: int, worker_id: int | None, give_up: bool) -> bool:
    """Put back in its queue a job that the dead worker ``worker_id`` held, its attempt counted, or fail it when
    ``give_up``; False when it is no longer that worker's (rescued by another worker meanwhile)."""
    status = "failed" if give_up else "todo"
    return bool(session.execute(_RESCUE, {"id": job_id, "worker_id": worker_id, "status": status}).rowcount)


def still_claimed(session: Session, job: ClaimedJob) -> bool:
    """Whether ``job`` may record its effects in ``session``'s transaction: it is the newest job of its kind and
    instance, and not finished. Holds the job's lock until the transaction ends, so that no newer job can be
    deferred in between."""
    _lock(session, job.kind, job.instance_pk)
    newest = session.execute(_NEWEST_JOB, {"kind": job.kind, "instance_pk": job.instance_pk}).scalar()
    return newest == job.id and not is_finished(session, job)


def is_finished(session: Session, job: ClaimedJob) -> bool:
    """Whether ``job`` committed its effects already (an earlier run of it, cut short after the commit)."""
    return bool(session.scalar(select(job_outcomes.c.finished).where(job_outcomes.c.job_id == job.id)))


def finish(session: Session, job: ClaimedJob, note: str) -> None:
    """Mark ``job`` finished with what it did, in the transaction that records its effects."""
    _record(session, job.id, finished=True, note=note, last_error=None)


def record_note(session: Session, job: ClaimedJob, note: str) -> None:
    _record(session, job.id, note=note)


def record_error(session: Session, job_id: int, error: str) -> None:
    _record(session, job_id, last_error=error[:_MAX_ERROR_LENGTH])


def _record(session: Session, job_id: int, **values: object) -> None:
    statement = insert(job_outcomes).values(job_id=job_id, **values)
    session.execute(statement.on_conflict_do_update(index_elements=[job_outcomes.c.job_id], set_=values))


def _lock(session: Session, kind: str, instance_pk: int) -> None:
    """The transaction's lock on the jobs of ``kind`` of one instance (both keys fit PostgreSQL's int4 pair)."""
    keys = (zlib.crc32(kind.encode()) & 0x7FFFFFFF, instance_pk)
    session.execute(select(func.pg_advisory_xact_lock(*(cast(key, Integer) for key in keys))))
