from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.models import Instance, Job
from dicom_node.node import Node
from tests.dicom_peers import free_port
from tests.orthanc import Orthanc, orthanc, orthanc_binary
from tests.postgres import postgres_bin, temporary_postgres
from tests.serve_process import onnx_graphs  # noqa: F401  (a fixture for the served-node tests)

if TYPE_CHECKING:
    from dicom_node.inference_jobs import InferenceModels

NodeFactory = Callable[..., Node]

# The modules that take longest, longest first (the sums of `pytest --durations=0` on the 2-core development
# machine, 2026-12-06: 156 s down to 30 s). Under `-n 2 --dist loadfile --no-loadscope-reorder` each module goes
# whole to one worker in this order, so the long ones start first and the short ones even out the end; xdist's
# own order (most tests first) left the long ones for the end, one worker running them while the other waited.
LONGEST_MODULES = (
    "test_crash_safety.py",
    "test_serve.py",
    "test_cluster.py",
    "test_faults.py",
    "test_report.py",
    "test_migrations.py",
    "test_load.py",
    "test_task_interface.py",
    "test_results_to_pacs.py",
    "test_tracking.py",
    "test_runtime.py",
    "test_training.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: number for number, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def node_settings(storage_root: Path, **dicom: object) -> Settings:
    return Settings(
        dicom={"host": "127.0.0.1", "port": free_port(), **dicom},
        web={"port": free_port()},
        storage={"root": storage_root},
    )


@contextmanager
def running_node(settings: Settings, models: InferenceModels | None = None) -> Iterator[Node]:
    """A node of ``settings`` (and ``models``, else those its settings name), started, and stopped at the end."""
    node = Node(settings, models=models)
    node.start()
    try:
        yield node
    finally:
        node.stop()


@contextmanager
def started_nodes(settings_for: Callable[..., Settings]) -> Iterator[NodeFactory]:
    """A factory of started nodes built from ``settings_for(**dicom)``; all are stopped at the end."""
    started: list[Node] = []

    def start(**dicom: object) -> Node:
        node = Node(settings_for(**dicom))
        node.start()
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the session's tests, each of which makes its own database on it."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed")
    with temporary_postgres() as url:
        yield url


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc on free loopback ports: the PACS the node sends its results to."""
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed")
    with orthanc(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start a real node (listener and index, no workers) on a free loopback port; ``dicom`` keys override."""
    with started_nodes(lambda **dicom: node_settings(tmp_path / "storage", **dicom)) as start:
        yield start


@pytest.fixture
def node(start_node: NodeFactory) -> Node:
    return start_node()


def stored_instances(node: Node) -> list[Instance]:
    with node.sessions() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def stored_jobs(node: Node) -> list[Job]:
    with node.sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def files_under_patients(node: Node) -> list[Path]:
    return sorted(path for path in (node.store.root / "patients").rglob("*") if path.is_file())
