"""The node's jobs: what handlers call to queue a job and to record what it did, on either backend.

On SQLite (the one-process node) a job is a row of ``jobs`` that :class:`JobQueue` hands to the worker threads
of :mod:`dicom_node.workers`. Claiming is a conditional UPDATE (``state = pending`` in the WHERE clause) that
returns the rows it took, so two workers never run the same job. On PostgreSQL a job is a Procrastinate job
(:mod:`dicom_node.task_engine`), run by :mod:`dicom_node.task_worker` in any number of processes; ``jobs`` is a
view of them there. The handlers (:mod:`dicom_node.inference_jobs`, :mod:`dicom_node.output_jobs`) are the same
on both: they call :func:`enqueue`, :func:`still_claimed`, :func:`finish` and :func:`record_note`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import task_engine
from dicom_node.models import Instance, Job, JobState, as_utc

OUTPUTS_JOB = "outputs"  # the kind of the job that writes an instance's DICOM outputs (dicom_node.output_jobs)
_MAX_ERROR_LENGTH = 2000


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    instance_pk: int
    attempt: int
    generation: int = 0


class PermanentJobError(Exception):
    """A job failed in a way no retry can change (an image no decoder can read): it is marked failed at once."""


class JobMustWait(Exception):
    """A job cannot run before the node is restarted with what it lacks (a missing model file): it waits, its
    attempt not counted, with the message as its note."""


class JobQueue:
    def __init__(self, sessions: sessionmaker[Session], max_attempts: int, retry_backoff: float) -> None:
        self.sessions = sessions
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff

    def claim(self, kinds: Collection[str]) -> ClaimedJob | None:
        """Take the oldest pending job of one of ``kinds`` that is due, or return None."""
        claimed = self.claim_batch(kinds, 1)
        return claimed[0] if claimed else None

    def claim_batch(self, kinds: Collection[str], limit: int) -> list[ClaimedJob]:
        """Take up to ``limit`` due pending jobs of the kind of the oldest one among ``kinds``, oldest first."""
        if not kinds:
            return []
        with self.sessions.begin() as session:
            while True:
                due = (Job.state == JobState.PENDING, Job.available_at <= _now())
                oldest = session.scalar(select(Job.kind).where(*due, Job.kind.in_(kinds)).order_by(Job.id).limit(1))
                if oldest is None:
                    return []
                candidates = select(Job.id).where(*due, Job.kind == oldest).order_by(Job.id).limit(limit)
                taken = session.execute(  # those still pending: another worker may have taken some since the select
                    update(Job)
                    .where(Job.id.in_(session.scalars(candidates).all()), Job.state == JobState.PENDING)
                    .values(state=JobState.RUNNING, attempts=Job.attempts + 1, updated_at=_now())
                    .returning(Job.id, Job.kind, Job.instance_pk, Job.attempts, Job.generation)
                    .execution_options(synchronize_session=False)
                ).all()
                if taken:
                    return sorted((ClaimedJob(*row) for row in taken), key=lambda job: job.id)

    def claim_job(self, job_id: int) -> ClaimedJob | None:
        """Take the job ``job_id`` if it is pending (due or not); None when it is not (a worker took it, or it
        finished)."""
        with self.sessions.begin() as session:
            taken = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.PENDING)
                .values(state=JobState.RUNNING, attempts=Job.attempts + 1, updated_at=_now())
                .returning(Job.id, Job.kind, Job.instance_pk, Job.attempts, Job.generation)
                .execution_options(synchronize_session=False)
            ).first()
        return ClaimedJob(*taken) if taken is not None else None

    def complete(self, job: ClaimedJob) -> bool:
        """Mark a claimed job done (its handler may have done so with its effects, by :func:`finish`); False
        when it was queued again meanwhile (it stays pending). A job its handler finished is only looked at: a
        write would cost a commit, a disk flush, per job."""
        with self.sessions.begin() as session:
            finished = session.scalar(select(Job.id).where(*_claim(job), Job.state == JobState.DONE))
            if finished is not None:
                return True
            return bool(
                session.execute(
                    update(Job)
                    .where(*_still_claimed(job))
                    .values(state=JobState.DONE, last_error=None)
                    .execution_options(synchronize_session=False)
                ).rowcount
            )

    def fail(self, job: ClaimedJob, error: str, permanent: bool = False) -> JobState:
        """Record a failed attempt: retry later with exponential backoff, or mark failed after the last one
        (at once when ``permanent``). A job queued again meanwhile is left as it is."""
        with self.sessions.begin() as session:
            row = session.scalar(select(Job).where(*_still_claimed(job)))
            if row is None:
                return session.get_one(Job, job.id).state
            row.last_error = error[:_MAX_ERROR_LENGTH]
            if permanent or row.attempts >= self.max_attempts:
                row.state = JobState.FAILED
            else:
                row.state = JobState.PENDING
                delay = self.retry_backoff * 2 ** (row.attempts - 1)
                row.available_at = _now() + dt.timedelta(seconds=delay)
            return row.state

    def wait(self, job: ClaimedJob, reason: str) -> None:
        """Put a claimed job aside until the next start (:meth:`release_waiting`), its attempt not counted."""
        with self.sessions.begin() as session:
            session.execute(
                update(Job)
                .where(*_still_claimed(job))
                .values(state=JobState.WAITING, attempts=Job.attempts - 1, note=reason, last_error=None)
                .execution_options(synchronize_session=False)
            )

    def release_waiting(self) -> int:
        """At start-up: waiting jobs are due again; those that still cannot run wait again."""
        with self.sessions.begin() as session:
            return session.execute(
                update(Job).where(Job.state == JobState.WAITING).values(state=JobState.PENDING, available_at=_now())
            ).rowcount

    def recover_interrupted(self) -> int:
        """At start-up: jobs left running by a stopped process go back to pending, their attempt counted;
        one that has used all its attempts (it may be what stopped the process) is marked failed."""
        with self.sessions.begin() as session:
            session.execute(
                update(Job)
                .where(Job.state == JobState.RUNNING, Job.attempts >= self.max_attempts)
                .values(state=JobState.FAILED, last_error="interrupted on every attempt")
            )
            return session.execute(
                update(Job).where(Job.state == JobState.RUNNING).values(state=JobState.PENDING)
            ).rowcount


class JobNotFinished(Exception):
    """A job that is pending or running cannot be run again; the message says its state."""


def run_again(sessions: sessionmaker[Session], job_id: int) -> tuple[int, str] | None:
    """Queue a failed or finished job again with fresh attempts, in the queue it was in; its instance and kind,
    or None where there is no such job. Raises :class:`JobNotFinished` for a job that is pending or running."""
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        if job.state in (JobState.PENDING, JobState.RUNNING):
            raise JobNotFinished(f"job {job_id} is {job.state}: only a failed or finished job can be run again")
        queue = task_engine.queue_of(session, job_id) if on_postgresql(session) else ""
        enqueue(session, job.instance, job.kind, queue)
        return job.instance_pk, job.kind


def enqueue(session: Session, instance: Instance, kind: str, queue: str) -> None:
    """A job of ``kind`` for the instance, in ``session``'s transaction. On SQLite one per instance: a new one, or
    the existing one queued again (the instance was replaced, or its results are new). On PostgreSQL a new job in
    ``queue`` (see :mod:`dicom_node.task_engine`), which makes an older one of the instance stale."""
    if on_postgresql(session):
        session.flush()  # the instance's id
        task_engine.defer(session, kind, instance.id, queue)
        return
    job = None
    if instance.id is not None:
        job = session.scalar(select(Job).where(Job.instance_pk == instance.id, Job.kind == kind))
    if job is None:
        session.add(Job(instance=instance, kind=kind))
        return
    job.state, job.attempts, job.last_error, job.note = JobState.PENDING, 0, None, None
    job.generation += 1  # a run still busy with the old state must not mark this one done
    job.available_at = _now()


def still_claimed(session: Session, job: ClaimedJob) -> bool:
    """Whether ``job`` is still the claim of the running job (not queued again since), for a handler that
    records results in its own transaction; the claim then holds until that transaction ends.

    On SQLite the check is a no-op UPDATE, not a SELECT ... FOR UPDATE: where pysqlite begins a transaction only
    at its first write, it takes the database's write lock, so that no enqueue can slip in between the check and
    :func:`finish`. On PostgreSQL see :func:`dicom_node.task_engine.still_claimed`."""
    if on_postgresql(session):
        return task_engine.still_claimed(session, job)
    claimed = session.execute(
        update(Job)
        .where(*_still_claimed(job))
        .values(generation=Job.generation)
        .execution_options(synchronize_session=False)
    )
    return claimed.rowcount == 1


def finish(session: Session, job: ClaimedJob, note: str) -> None:
    """Mark a still claimed ``job`` done, with what it did, in the handler's transaction that records its
    effects: they commit together, so a process killed after the commit does not run the job again (and a run
    again would give its outputs new identities)."""
    if on_postgresql(session):
        task_engine.finish(session, job, note)
        return
    session.execute(
        update(Job)
        .where(*_still_claimed(job))
        .values(state=JobState.DONE, last_error=None, note=note)
        .execution_options(synchronize_session=False)
    )


def record_note(session: Session, job: ClaimedJob, note: str) -> None:
    """Say what a job that finishes without effects did (e.g. why it ran no task)."""
    if on_postgresql(session):
        task_engine.record_note(session, job, note)
        return
    session.execute(update(Job).where(*_claim(job)).values(note=note).execution_options(synchronize_session=False))


def on_postgresql(session: Session) -> bool:
    """Whether the index is on PostgreSQL, where jobs are the task engine's."""
    return session.get_bind().dialect.name == "postgresql"


def _claim(job: ClaimedJob) -> tuple:
    return Job.id == job.id, Job.generation == job.generation


def _still_claimed(job: ClaimedJob) -> tuple:
    return *_claim(job), Job.state == JobState.RUNNING


@dataclass(frozen=True)
class QueueDepth:
    waiting: int  # jobs due or scheduled, not yet taken
    oldest_seconds: float  # since the oldest of them was queued


def waiting_by_queue(session: Session) -> dict[str, QueueDepth]:
    """The jobs waiting in each queue: on PostgreSQL the engine's queues; on SQLite each kind of job is a queue."""
    if on_postgresql(session):
        rows = session.execute(task_engine.WAITING_BY_QUEUE).all()
    else:
        rows = session.execute(
            select(Job.kind, func.count(), func.min(Job.created_at))
            .where(Job.state.in_((JobState.PENDING, JobState.WAITING)))
            .group_by(Job.kind)
        ).all()
    now = _now()
    return {
        queue: QueueDepth(count, max((now - as_utc(oldest)).total_seconds(), 0.0) if oldest is not None else 0.0)
        for queue, count, oldest in rows
    }


def count_by_state(session: Session) -> dict[JobState, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {JobState(state): count for state, count in rows}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
