"""The index: what the node received, keyed Patient > Study > Series > Instance (PS3.3 section A.1.2),
and the job queue that carries each received instance to the workers.

A change to these tables comes with an Alembic revision in ``dicom_node/migrations/versions`` (see
``alembic.ini``); ``tests/test_migrations.py`` fails while the models and the migrations disagree."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import JSON, DateTime, Enum, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """A time read from the index, in UTC: SQLite hands times back without their zone, PostgreSQL with it."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), unique=True)
    storage_key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(324))
    sex: Mapped[str | None] = mapped_column(String(16))
    birth_date: Mapped[dt.date | None]

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[dt.date | None]
    accession_number: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(64))

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None]
    rows: Mapped[int | None]
    columns: Mapped[int | None]
    path: Mapped[str] = mapped_column(String(512), doc="Relative to the storage root.")
    size_bytes: Mapped[int]
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    source_instance_pk: Mapped[int | None] = mapped_column(
        ForeignKey("instances.id"), index=True, doc="An object the node wrote: the received instance it reports on."
    )
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)

    series: Mapped[Series] = relationship(back_populates="instances")
    jobs: Mapped[list[Job]] = relationship(back_populates="instance")
    results: Mapped[list[InferenceResult]] = relationship(back_populates="instance", order_by="InferenceResult.id")


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    WAITING = "waiting"  # for what the node lacks until a restart (a missing model); see JobQueue.wait


class Job(Base):
    """One unit of background work on one instance; written in the same transaction as the instance."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claimable", "state", "available_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16, values_callable=lambda states: [s.value for s in states]),
        default=JobState.PENDING,
    )
    attempts: Mapped[int] = mapped_column(default=0)
    generation: Mapped[int] = mapped_column(
        default=0, doc="Raised when the job is queued again (a replaced instance): a run of an older one is stale."
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text, doc="What a finished job did, e.g. why it ran no task.")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    available_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)

    instance: Mapped[Instance] = relationship(back_populates="jobs")


SUMMARY_LENGTH = 160  # of a result's summary in words


class InferenceResult(Base):
    """One output of a task's model for one instance (a task may have several, such as one per head of its
    model). Running an instance's job again replaces its results."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("instance_pk", "task", "output"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    task: Mapped[str] = mapped_column(String(32))  # the task's name (dicom_node.ai_tasks)
    output: Mapped[str] = mapped_column(String(16))  # one of the task's outputs
    is_primary: Mapped[bool] = mapped_column(doc="The result to show first, e.g. the model of the patient's sex.")
    summary: Mapped[str] = mapped_column(String(SUMMARY_LENGTH), doc="The result in words, for lists and logs.")
    values: Mapped[dict] = mapped_column(JSON)
    heatmap_path: Mapped[str] = mapped_column(
        String(512), doc="The instance's heatmaps file (all its results' maps), relative to the storage root."
    )
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    weights_digest: Mapped[str] = mapped_column(String(128))
    demo_model: Mapped[bool]
    timings_ms: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)

    instance: Mapped[Instance] = relationship(back_populates="results")

    @property
    def heatmap_name(self) -> str:
        """The name of this result's map in its instance's heatmaps file (``heatmap_path``)."""
        return heatmap_name(self.task, self.output)


def heatmap_name(task: str, output: str) -> str:
    """The name of a result's map in its instance's heatmaps file."""
    return f"{task}-{output}"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class Delivery(Base):
    """The outbox: one object the node wrote, to one destination. Written in the same transaction as the
    object's index row, so that nothing the node made is forgotten; the sender works through it."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("instance_pk", "destination"),
        Index("ix_deliveries_due", "state", "available_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), doc="The name of a configured destination.")
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16, values_callable=lambda states: [s.value for s in states]),
        default=DeliveryState.PENDING,
    )
    attempts: Mapped[int] = mapped_column(default=0)
    last_status: Mapped[int | None] = mapped_column(doc="The destination's last C-STORE status, if it answered.")
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    available_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)

    instance: Mapped[Instance] = relationship()


class TrackingState(enum.StrEnum):
    PENDING = "pending"
    LOGGED = "logged"


class TrackedRun(Base):
    """The MLflow run of one instance's inference results (:mod:`dicom_node.tracking`), pending until logged.
    New results of the instance (its inference job run again) make it pending again, for a new run."""

    __tablename__ = "tracking"
    __table_args__ = (Index("ix_tracking_due", "state", "available_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), unique=True)
    result_id: Mapped[int] = mapped_column(
        doc="The newest of the results the run logs; replaced results have new ids, so a new run is due."
    )
    state: Mapped[TrackingState] = mapped_column(
        Enum(TrackingState, native_enum=False, length=16, values_callable=lambda states: [s.value for s in states]),
        default=TrackingState.PENDING,
    )
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    experiment_id: Mapped[str | None] = mapped_column(String(64))
    run_id: Mapped[str | None] = mapped_column(String(64))
    available_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    logged_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class UserRole(enum.StrEnum):
    """What a user may do (docs/security.md): each role may do what the ones before it may."""

    VIEWER = "viewer"  # read results and images
    OPERATOR = "operator"  # also upload images, retry deliveries, run a job again
    ADMIN = "admin"  # also read the users and the configuration

    def allows(self, needed: UserRole) -> bool:
        order = list(UserRole)
        return order.index(self) >= order.index(needed)


class User(Base):
    """A local user (:mod:`dicom_node.users`); users of an OpenID Connect provider are not kept here."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[UserRole] = mapped_column(
        Enum(UserRole, native_enum=False, length=16, values_callable=lambda roles: [r.value for r in roles])
    )
    password_hash: Mapped[str] = mapped_column(Text, doc="argon2id, in the PHC string format")
    # sessions signed in before it end: a reset password or a changed role takes effect at once
    credentials_changed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ApiToken(Base):
    """A user's personal API token: only its SHA-256 digest is kept (the token is 256 random bits)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship(back_populates="tokens")

    def works_at(self, moment: dt.datetime) -> bool:
        """Not revoked and not expired at ``moment``."""
        return self.revoked_at is None and as_utc(self.expires_at) > moment


class AuditEvent(Base):
    """One row of the audit trail (:mod:`dicom_node.audit.trail`): append-only (triggers refuse UPDATE and
    DELETE) and chained: ``digest`` is the HMAC-SHA256 of the row's content and the previous row's digest, keyed
    outside the database."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    occurred_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[int]
    user: Mapped[str] = mapped_column(String(128))
    role: Mapped[str | None] = mapped_column(String(16))
    address: Mapped[str | None] = mapped_column(String(64))
    patients: Mapped[list[str]] = mapped_column(JSON)
    objects: Mapped[list[list[str]]] = mapped_column(JSON, doc="[kind, id] pairs")
    detail: Mapped[str] = mapped_column(Text)
    local_ae: Mapped[str | None] = mapped_column(String(16))
    remote_ae: Mapped[str | None] = mapped_column(String(16))
    previous_digest: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))


class AuditForwarding(Base):
    """How far the audit trail has been sent to a syslog collector: the table is the spool."""

    __tablename__ = "audit_forwarding"

    destination: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_sent_id: Mapped[int] = mapped_column(default=0)


__all__ = [
    "ApiToken",
    "AuditEvent",
    "AuditForwarding",
    "Base",
    "Delivery",
    "DeliveryState",
    "InferenceResult",
    "Instance",
    "Job",
    "JobState",
    "Patient",
    "Series",
    "Study",
    "TrackedRun",
    "TrackingState",
    "User",
    "UserRole",
]
