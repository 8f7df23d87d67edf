from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.models import Instance, Job
from dicom_node.node import Node
from tests.dicom_peers import free_port

NodeFactory = Callable[..., Node]


def node_settings(storage_root: Path, **dicom: object) -> Settings:
    return Settings(
        dicom={"host": "127.0.0.1", "port": free_port(), **dicom},
        web={"port": free_port()},
        storage={"root": storage_root},
    )


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start a real node (listener and index, no workers) on a free loopback port; ``dicom`` keys override."""
    started: list[Node] = []

    def start(**dicom: object) -> Node:
        node = Node(node_settings(tmp_path / "storage", **dicom))
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


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
