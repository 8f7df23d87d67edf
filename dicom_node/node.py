"""The node: storage, index, DICOM listener, workers, delivery sender and MLflow tracker, started and stopped
together."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from dicom_node.config import Settings
from dicom_node.database import open_index, session_factory
from dicom_node.delivery import DeliveryQueue, DeliverySender
from dicom_node.inference_jobs import InferenceJobs, InferenceModels
from dicom_node.ingest import INFERENCE_JOB, Ingestor
from dicom_node.jobs import JobQueue
from dicom_node.metrics import NodeMetrics
from dicom_node.output_jobs import OUTPUTS_JOB, OutputJobs
from dicom_node.scp import DiskGuard, StorageSCP
from dicom_node.storage import InstanceStore
from dicom_node.tracking import InferenceTracker
from dicom_node.workers import JobHandler, WorkerPool

log = logging.getLogger(__name__)


class Node:
    """``models``: run inference jobs with them; ``job_handlers``: other handlers by job kind (tests)."""

    def __init__(
        self,
        settings: Settings,
        job_handlers: Mapping[str, JobHandler] | None = None,
        models: InferenceModels | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.store = InstanceStore(settings.storage.root)
        self.engine = open_index(settings.database)
        self.sessions = session_factory(self.engine)
        self.ingestor = Ingestor(
            self.store,
            self.sessions,
            settings.dicom.duplicate_policy,
            settings.dicom.max_inflated_mb * 2**20,
            settings.dicom.max_image_pixels,
            on_queued=lambda: self.workers.wake(),
        )
        self.metrics = NodeMetrics(self.sessions)
        self.scp = StorageSCP(
            settings.dicom,
            self.ingestor,
            DiskGuard(settings.storage.root, settings.storage.min_free_mb * 2**20),
            lambda status: self.metrics.store_refusals.labels(f"0x{status:04X}").inc(),
        )
        self.queue = JobQueue(self.sessions, settings.workers.max_attempts, settings.workers.retry_backoff)
        delivery = settings.delivery
        self.deliveries = DeliveryQueue(
            self.sessions, delivery.max_attempts, delivery.retry_backoff, delivery.max_backoff
        )
        self.sender = DeliverySender(settings, self.deliveries, self.store)
        handlers = {OUTPUTS_JOB: OutputJobs(settings, self.store, self.sessions, self.sender.wake)}
        if models is not None:
            handlers[INFERENCE_JOB] = InferenceJobs(
                settings.inference,
                models,
                self.store,
                self.sessions,
                self.metrics.inference_seconds,
                settings.dicom.max_image_pixels,
            )
        handlers |= job_handlers or {}
        self.workers = WorkerPool(
            self.queue,
            handlers,
            settings.workers.count,
            settings.workers.poll_interval,
            settings.inference.batch_size,
        )
        self.tracker = InferenceTracker(settings.mlflow, self.sessions, self.store, models)

    def start(self) -> None:
        """Resume where a previous run stopped, then listen and work."""
        swept = self.store.sweep_incoming()
        resumed = self.queue.recover_interrupted() + self.queue.release_waiting()
        resent = self.deliveries.recover_interrupted()
        if swept or resumed or resent:
            log.info(
                "recovered after restart: %d partial writes removed, %d jobs resumed, %d deliveries queued again",
                swept,
                resumed,
                resent,
            )
        self.scp.start()
        self.workers.start()
        self.sender.start()
        self.tracker.start()

    def stop(self) -> None:
        """Stop listening first, so nothing new arrives, then finish the jobs in hand."""
        self.scp.stop()
        self.workers.stop()
        self.sender.stop()
        self.tracker.stop()
        self.engine.dispose()
