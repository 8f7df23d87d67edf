"""``/health`` and ``/metrics`` of a serving node: the parts it needs, and its figures for Prometheus."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.config import Settings
from dicom_node.inference_jobs import InferenceModels
from dicom_node.node import Node
from dicom_node.status import StoreStatus
from dicom_node.synthetic import synthetic_dx
from tests.dicom_peers import free_port, send_datasets
from web.app import create_app
from web.dependencies import WebContext

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    settings = Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path_factory.mktemp("node") / "storage"},
        workers={"count": 0},
        inference={"runtime": "torch"},
        mlflow={"enabled": False},
    )
    node = Node(settings, models=InferenceModels.load(settings.inference))
    node.start()
    refused = synthetic_dx("", side=64)  # no PatientID: refused with 0xA900
    [stored, answer] = send_datasets(settings.dicom.port, [synthetic_dx("METRICS", side=128), refused])
    assert (stored.Status, answer.Status) == (StoreStatus.SUCCESS, StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    while node.workers.run_once():  # the inference job, then the outputs job
        pass
    yield node
    node.stop()


def client(node: Node, listening: bool = True) -> TestClient:
    return TestClient(create_app(WebContext(node.settings, node.sessions, lambda: listening, node=node)))


def test_health_names_the_models_and_counts_the_queues(node: Node) -> None:
    response = client(node).get("/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    cards = {
        (model.card.name, model.card.version) for model in (node.models.of("hallux_valgus"), node.models.of("bone_age"))
    }
    assert {(model["name"], model["version"]) for model in health["models"]} == cards
    assert all(model["demo"] for model in health["models"]), "the committed cards are demo models"
    assert health["jobs"] == {"done": 2} and health["deliveries"] == {}, "no destination configured"
    assert health["mlflow"] == {"ok": True, "detail": "tracking switched off (mlflow.enabled)"}


def test_health_is_503_when_a_required_part_is_down(node: Node, tmp_path: Path) -> None:
    assert client(node, listening=False).get("/health").status_code == 503
    without_models = Node(Settings(storage={"root": tmp_path}, mlflow={"enabled": False}))
    response = TestClient(create_app(WebContext(node.settings, node.sessions, lambda: True, node=without_models))).get(
        "/health"
    )
    assert response.status_code == 503 and response.json()["models"] == []


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_what_the_node_did(node: Node) -> None:
    response = client(node).get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    figures = samples(response.text)
    assert figures[("dicom_node_instances_received_total", ())] == 1
    assert figures[("dicom_node_objects_written_total", ())] == 5, "a hand: 2 Secondary Captures, 2 maps, a report"
    assert figures[("dicom_node_jobs", (("kind", "inference"), ("state", "done")))] == 1
    assert figures[("dicom_node_jobs", (("kind", "outputs"), ("state", "done")))] == 1
    assert figures[("dicom_node_inference_seconds_count", (("task", "bone_age"),))] == 1
    assert ("dicom_node_inference_seconds_count", (("task", "hallux_valgus"),)) not in figures, "routed to a hand"
    assert figures[("dicom_node_store_refusals_total", (("status", "0xA900"),))] == 1


def test_metrics_without_a_node_count_the_index(node: Node) -> None:
    text = TestClient(create_app(WebContext(node.settings, node.sessions, lambda: True))).get("/metrics").text
    assert samples(text)[("dicom_node_instances_received_total", ())] == 1
