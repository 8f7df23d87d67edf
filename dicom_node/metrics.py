"""The node's Prometheus metrics (served by ``GET /metrics``).

Two kinds: what the index already records is counted from it at each scrape (instances received, jobs and
deliveries by state, the waiting jobs of each queue and the age of the oldest), so the figures survive
restarts and agree with the API; what happens in the process and leaves no row is counted as it happens
(inference latency per task, refused C-STORE requests).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.jobs import waiting_by_queue
from dicom_node.models import Delivery, Instance, Job

# Seconds from a job's claim to its results recorded, per image: the p95 target is 0.2 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)


class IndexCollector(Collector):
    """Counts read from the index at each scrape."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with self.sessions() as session:
            received = session.scalar(
                select(func.count()).select_from(Instance).where(Instance.source_instance_pk.is_(None))
            )
            written = session.scalar(
                select(func.count()).select_from(Instance).where(Instance.source_instance_pk.is_not(None))
            )
            jobs = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()
            by_destination = (Delivery.destination, Delivery.state)
            deliveries = session.execute(select(*by_destination, func.count()).group_by(*by_destination)).all()
            queues = waiting_by_queue(session)
        yield CounterMetricFamily(
            "dicom_node_instances_received", "Instances received (C-STORE or upload) and kept", value=received
        )
        yield CounterMetricFamily("dicom_node_objects_written", "DICOM objects the node wrote", value=written)
        job_states = GaugeMetricFamily("dicom_node_jobs", "Jobs by kind and state", labels=["kind", "state"])
        for kind, state, count in jobs:
            job_states.add_metric([kind, str(state)], count)
        yield job_states
        delivery_states = GaugeMetricFamily(
            "dicom_node_deliveries", "Deliveries by destination and state", labels=["destination", "state"]
        )
        for destination, state, count in deliveries:
            delivery_states.add_metric([destination, str(state)], count)
        yield delivery_states
        depth = GaugeMetricFamily("dicom_node_queue_waiting", "Jobs waiting in each queue", labels=["queue"])
        oldest = GaugeMetricFamily(
            "dicom_node_queue_oldest_seconds", "Age of the oldest waiting job of each queue", labels=["queue"]
        )
        for queue, waiting in sorted(queues.items()):
            depth.add_metric([queue], waiting.waiting)
            oldest.add_metric([queue], waiting.oldest_seconds)
        yield depth
        yield oldest


class NodeMetrics:
    """One registry per node, so that two nodes in one process (tests) never mix their figures."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(IndexCollector(sessions))
        self.inference_seconds = Histogram(
            "dicom_node_inference_seconds",
            "Per image, from reading the stored file to the results recorded, by task",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.store_refusals = Counter(
            "dicom_node_store_refusals",
            "C-STORE requests refused, by response status (errors of ingest)",
            ["status"],
            registry=self.registry,
        )
