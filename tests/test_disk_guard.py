"""The floor of free space under the storage root (storage.min_free_mb): below it the node refuses associations
(A-ASSOCIATE-RJ rejected-transient, local limit exceeded, PS3.8 Table 9-21) and C-STOREs (0xA700), with real
peers on loopback. The floor is set above the free space of the test's filesystem, then lowered."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE

from dicom_node.config import Settings
from dicom_node.status import StoreStatus
from dicom_node.synthetic import synthetic_dx, write_synthetic_dx
from tests.conftest import NodeFactory, node_settings, started_nodes, stored_instances
from tests.dicom_peers import NODE_AE, associate, dcmtk, rejection

LOCAL_LIMIT_EXCEEDED = ("Rejected Transient", "Service Provider (Presentation)", "Local limit exceeded")


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start a node whose floor is ``min_free_mb``; other keyword arguments are ``dicom`` keys."""

    def settings_for(min_free_mb: int, **dicom: object) -> Settings:
        settings = node_settings(tmp_path / "storage", **dicom)
        settings.storage.min_free_mb = min_free_mb
        return settings

    with started_nodes(settings_for) as start:
        yield start


def beyond_free_space(path: Path) -> int:
    """A floor in MiB that the filesystem of ``path`` cannot meet."""
    return (shutil.disk_usage(path).free >> 20) + 1024


def test_below_the_floor_an_association_is_rejected_transient_local_limit_exceeded(
    start_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(min_free_mb=beyond_free_space(tmp_path))
    with caplog.at_level(logging.WARNING, logger="dicom_node.scp"):
        assert rejection(associate(node.settings.dicom.port)) == LOCAL_LIMIT_EXCEEDED
    assert any("below the floor" in record.getMessage() for record in caplog.records)


def test_below_the_floor_dcmtk_echo_and_store_are_refused_and_nothing_is_stored(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    node = start_node(min_free_mb=beyond_free_space(tmp_path))
    port = node.settings.dicom.port
    [source] = write_synthetic_dx(tmp_path / "in", 1, side=64)

    echo = dcmtk("echoscu", "-aec", NODE_AE, "127.0.0.1", port)
    store = dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", port, source)

    for refused in (echo, store):
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stdout + refused.stderr
    assert stored_instances(node) == []


def test_associations_are_accepted_again_once_space_returns(start_node: NodeFactory, tmp_path: Path) -> None:
    node = start_node(min_free_mb=beyond_free_space(tmp_path))
    port = node.settings.dicom.port
    assert rejection(associate(port)) == LOCAL_LIMIT_EXCEEDED

    node.scp.disk.min_free_bytes = 0
    assert associate(port).is_released


def test_when_free_space_cannot_be_read_associations_are_rejected(start_node: NodeFactory, tmp_path: Path) -> None:
    node = start_node(min_free_mb=0)
    port = node.settings.dicom.port
    node.scp.disk.root = tmp_path / "unmounted"  # the storage root gone: its free space cannot be read
    assert rejection(associate(port)) == LOCAL_LIMIT_EXCEEDED

    node.scp.disk.root = tmp_path
    assert associate(port).is_released


def test_a_store_that_finds_free_space_below_the_floor_gets_out_of_resources(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    node = start_node(min_free_mb=0)
    ds = synthetic_dx("PAT-FULL", side=64)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", node.settings.dicom.port, ae_title=NODE_AE)
    assert association.is_established
    try:
        node.scp.disk.min_free_bytes = beyond_free_space(tmp_path) << 20  # the disk fills mid-association
        response = association.send_c_store(ds)
    finally:
        association.release()

    assert response.Status == StoreStatus.OUT_OF_RESOURCES
    assert "floor" in response.ErrorComment
    assert stored_instances(node) == []
