"""The same receiving scenarios with the index on a real PostgreSQL server instead of SQLite.

The test functions are those of test_scp and test_ingest_failures; this module's ``start_node`` fixture
gives each node a fresh PostgreSQL database, so they run unchanged against the other backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.config import Settings
from dicom_node.node import Node
from tests.conftest import NodeFactory, node_settings, started_nodes
from tests.postgres import migrated_database, postgres_bin
from tests.test_ingest_failures import (  # noqa: F401  (collected here against PostgreSQL)
    test_a_study_sent_again_under_another_patient_is_refused,
    test_commit_that_lands_but_reports_an_error_loses_no_image,
    test_values_too_long_for_the_index,
)
from tests.test_scp import (  # noqa: F401  (collected here against PostgreSQL)
    test_concurrent_replaces_of_one_instance_keep_one_row_and_one_job,
    test_eight_concurrent_associations_of_twenty_instances_all_land,
    test_resend_keeps_the_first_copy_and_queues_one_job,
    test_storescu_instance_is_stored_byte_for_byte_and_indexed,
)

pytestmark = pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL is not installed")
_numbers = itertools.count()


@pytest.fixture
def start_node(tmp_path: Path, postgres_server: str) -> Iterator[NodeFactory]:
    def settings_for(**dicom: object) -> Settings:
        settings = node_settings(tmp_path / "storage", **dicom)
        settings.database.url = migrated_database(postgres_server, f"node_{next(_numbers)}")
        return settings

    with started_nodes(settings_for) as start:
        yield start


def test_the_nodes_here_really_use_postgresql(node: Node) -> None:
    assert node.engine.dialect.name == "postgresql"
