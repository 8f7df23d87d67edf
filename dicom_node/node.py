"""The node: storage, index, DICOM listener, job workers, delivery sender and MLflow tracker, started and stopped
together, or the part of them that one role runs.

Roles (``dicom-node serve --role``): ``all`` runs everything in one process, the default and the only role on
SQLite, where worker threads, the delivery sender and the MLflow tracker poll the index. On PostgreSQL the parts
scale out as separate processes on one index and one shared storage root, and all work is the task engine's
(:mod:`dicom_node.task_engine`): ``ingest`` receives (the DICOM listener), ``worker`` runs the jobs of its queues
(:mod:`dicom_node.task_worker`), ``web`` serves the viewer and the HTTP API.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from sqlalchemy.engine import make_url

from dicom_node.audit.associations import ReceivedAssociations
from dicom_node.audit.forwarding import AuditForwarder
from dicom_node.audit.trail import AuditTrail
from dicom_node.background import Foreground
from dicom_node.config import ConfigError, Settings
from dicom_node.database import open_index, session_factory
from dicom_node.delivery import DELIVER_TASK, DeliveryQueue, DeliverySender
from dicom_node.inference_jobs import InferenceJobs, InferenceModels
from dicom_node.ingest import INFERENCE_JOB, Ingestor
from dicom_node.jobs import OUTPUTS_JOB, JobQueue
from dicom_node.metrics import NodeMetrics
from dicom_node.output_jobs import OutputJobs
from dicom_node.roles import Role
from dicom_node.scp import DiskGuard, StorageSCP
from dicom_node.storage import InstanceStore
from dicom_node.task_engine import (
    DELIVER_QUEUE,
    OUTPUTS_QUEUE,
    TRACK_QUEUE,
    all_queues,
    inference_queue,
    models_of_queues,
)
from dicom_node.task_worker import EngineTask, TaskWorker, WorkerOptions
from dicom_node.tracking import TRACK_TASK, InferenceTracker
from dicom_node.workers import JobHandler, WorkerPool

log = logging.getLogger(__name__)


class Node:
    """``models``: run inference jobs with them; ``job_handlers``: other handlers by job kind (tests).

    ``role`` and, for a worker, ``queues`` (default: those of its models, outputs, deliver and track) and
    ``concurrency`` (jobs at once; default ``workers.count`` x ``inference.batch_size``) pick what runs here."""

    def __init__(
        self,
        settings: Settings,
        job_handlers: Mapping[str, JobHandler] | None = None,
        models: InferenceModels | None = None,
        role: Role = "all",
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.role = role
        self.distributed = make_url(settings.database.url).get_backend_name() == "postgresql"
        if role != "all" and not self.distributed:
            raise ConfigError(f"role {role!r} needs the index on PostgreSQL (database.url); SQLite runs role 'all'")
        self.store = InstanceStore(settings.storage.root)
        self.engine = open_index(settings.database)
        self.sessions = session_factory(self.engine)
        self.ingestor = Ingestor(
            self.store,
            self.sessions,
            settings.dicom.duplicate_policy,
            settings.dicom.max_inflated_mb * 2**20,
            settings.dicom.max_image_pixels,
            on_queued=self.wake_workers,
            routing=settings.inference,
        )
        self.metrics = NodeMetrics(self.sessions)
        self.foreground = Foreground()
        self.trail = AuditTrail(settings.database, settings.storage.root)
        self.scp = StorageSCP(
            settings.dicom,
            self.ingestor,
            DiskGuard(settings.storage.root, settings.storage.min_free_mb * 2**20),
            lambda status: self.metrics.store_refusals.labels(f"0x{status:04X}").inc(),
            ReceivedAssociations(self.trail, settings.dicom.ae_title),
        )
        self.queue = JobQueue(self.sessions, settings.workers.max_attempts, settings.workers.retry_backoff)
        delivery = settings.delivery
        self.deliveries = DeliveryQueue(
            self.sessions, delivery.max_attempts, delivery.retry_backoff, delivery.max_backoff
        )
        self.sender = DeliverySender(settings, self.deliveries, self.store, self.trail)
        self.handlers: dict[str, JobHandler] = {
            OUTPUTS_JOB: OutputJobs(settings, self.store, self.sessions, self.sender.wake)
        }
        if models is not None:
            self.handlers[INFERENCE_JOB] = InferenceJobs(
                settings.inference,
                models,
                self.store,
                self.sessions,
                self.metrics.inference_seconds,
                settings.dicom.max_image_pixels,
                settings.outputs.max_image_size,
                settings.outputs.secondary_captures,
            )
        self.handlers |= job_handlers or {}
        self.queues = list(queues) if queues is not None else self._default_queues()
        self.tracker = InferenceTracker(
            settings.mlflow,
            self.sessions,
            self.store,
            models,
            self.foreground,
            [destination.name for destination in settings.destinations],
        )
        self.workers: WorkerPool | TaskWorker | None = self._workers(concurrency)
        syslog = settings.audit.syslog
        # the process that serves the web forwards the trail: one process, so each event is sent once
        self.audit_forwarder = (
            AuditForwarder(self.sessions, syslog, settings.audit.source_id or settings.dicom.ae_title)
            if syslog is not None and role in ("all", "web")
            else None
        )

    @property
    def receives(self) -> bool:
        return self.role in ("all", "ingest")

    @property
    def works(self) -> bool:
        return self.role in ("all", "worker")

    def start(self) -> None:
        """Resume where a previous run stopped, then listen and work."""
        swept = self.store.sweep_incoming()
        resumed = resent = 0
        if not self.distributed:  # on PostgreSQL the engine's workers put back what a worker that died held
            resumed = self.queue.recover_interrupted() + self.queue.release_waiting()
            resent = self.deliveries.recover_interrupted()
        if swept or resumed or resent:
            log.info(
                "recovered after restart: %d partial writes removed, %d jobs resumed, %d deliveries queued again",
                swept,
                resumed,
                resent,
            )
        if self.receives:
            self.scp.start()
        if self.workers is not None:
            self.workers.start()
        if self.works and not self.distributed:
            self.sender.start()
            self.tracker.start()
        if self.audit_forwarder is not None:
            self.audit_forwarder.start()

    def stop(self) -> None:
        """Stop listening first, so nothing new arrives, then finish the jobs in hand."""
        self.scp.stop()
        if self.workers is not None:
            self.workers.stop()
        self.sender.stop()
        self.tracker.stop()
        if self.audit_forwarder is not None:
            self.audit_forwarder.stop()
        self.trail.close()
        self.engine.dispose()

    def _default_queues(self) -> list[str]:
        served = self.models.loaded() if self.models is not None else {}
        if INFERENCE_JOB in self.handlers:
            return all_queues(list(served))
        return [OUTPUTS_QUEUE, DELIVER_QUEUE, TRACK_QUEUE]

    def _workers(self, concurrency: int | None) -> WorkerPool | TaskWorker | None:
        settings = self.settings
        if not self.works:
            return None
        if not self.distributed:
            return WorkerPool(
                self.queue,
                self.handlers,
                settings.workers.count,
                settings.workers.poll_interval,
                settings.inference.batch_size,
                self.foreground,
            )
        tasks = list(settings.inference.tasks)
        unknown = sorted(set(self.queues) - set(all_queues(tasks)))
        if unknown:
            raise ConfigError(f"no such queue: {', '.join(unknown)} (the queues: {', '.join(all_queues(tasks))})")
        lacking = models_of_queues(self.queues) - set(self.models.loaded() if self.models is not None else ())
        if lacking:
            raise ConfigError(f"queues {', '.join(self.queues)} need the models of {', '.join(sorted(lacking))}")
        options = WorkerOptions(
            queues=self.queues,
            concurrency=concurrency or settings.workers.count * settings.inference.batch_size,
            batch_size=settings.inference.batch_size,
            max_attempts=settings.workers.max_attempts,
            retry_backoff=settings.workers.retry_backoff,
            poll_interval=settings.workers.poll_interval,
            heartbeat_interval=settings.workers.heartbeat_interval,
            stalled_after=settings.workers.stalled_after,
            stalled_check=settings.workers.heartbeat_interval,
            every_model_queue=inference_queue(tasks),
        )
        engine_tasks = [
            EngineTask(DELIVER_TASK, DELIVER_QUEUE, self.sender.send_to, self.sender.schedule_waiting),
            EngineTask(TRACK_TASK, TRACK_QUEUE, self.tracker.track, self.tracker.schedule_waiting),
        ]
        return TaskWorker(settings.database.url, self.sessions, self.handlers, options, engine_tasks)

    def wake_workers(self) -> None:
        """Look for due jobs now (the one-process node; PostgreSQL notifies its workers itself)."""
        if isinstance(self.workers, WorkerPool):
            self.workers.wake()
