"""The node's read API over a node's real state: two phantoms received, inference and outputs run, their
objects queued for a destination; one delivery failed."""

from __future__ import annotations

import io
from collections.abc import Iterator
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import Comprehensive3DSRStorage, ParametricMapStorage, SecondaryCaptureImageStorage

from dicom_node.models import Delivery, DeliveryState, InferenceResult
from tests.node_state import FOOT_PATIENT, HAND_PATIENT, Received, received_node
from web.app import create_app
from web.dependencies import WebContext


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Received]:
    state = received_node(tmp_path_factory.mktemp("api"))
    yield state
    state.node.engine.dispose()


def client_for(received: Received, **web: object) -> TestClient:
    settings = received.node.settings
    settings = settings.model_copy(update={"web": type(settings.web).model_validate(settings.web.model_dump() | web)})
    return TestClient(create_app(WebContext(settings, received.node.sessions, lambda: True)))


@pytest.fixture(scope="module")
def client(received: Received) -> TestClient:
    return client_for(received)


def png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def expected_size(ds: pydicom.Dataset, max_size: int) -> tuple[int, int]:
    scale = min(1.0, max_size / max(ds.Rows, ds.Columns))
    return round(ds.Columns * scale), round(ds.Rows * scale)


# --- patients -----------------------------------------------------------------------------------------------


def test_patients_lists_what_was_received(client: TestClient, received: Received) -> None:
    page = client.get("/api/patients").json()
    assert page["total"] == 2 and (page["offset"], page["limit"]) == (0, 50)
    foot, hand = page["items"]  # the most recently received first
    assert (foot["patient_id"], hand["patient_id"]) == (FOOT_PATIENT, HAND_PATIENT)
    assert hand["name"] == "DOE^JANE" and hand["sex"] == received.hand.PatientSex
    assert hand["birth_date"] == pydicom.valuerep.DA(received.hand.PatientBirthDate).isoformat()
    # the node wrote 2 Secondary Captures and a report into the hand's study: they are not counted as received
    assert (hand["studies"], hand["instances"]) == (1, 1)
    assert (foot["studies"], foot["instances"]) == (1, 1)
    assert hand["last_received_at"].endswith(("Z", "+00:00"))


@pytest.mark.parametrize(
    ("search", "found"),
    [
        ("doe", [HAND_PATIENT]),
        ("ab/12 3", [HAND_PATIENT]),
        ("cd-56", [FOOT_PATIENT]),
        ("^", [FOOT_PATIENT, HAND_PATIENT]),
        ("%", []),
        ("_", []),
    ],
)
def test_patients_search_a_part_of_the_id_or_name_in_any_case(
    client: TestClient, search: str, found: list[str]
) -> None:
    page = client.get("/api/patients", params={"search": search}).json()
    assert [item["patient_id"] for item in page["items"]] == found
    assert page["total"] == len(found)


def test_patients_page(client: TestClient) -> None:
    first = client.get("/api/patients", params={"limit": 1}).json()
    second = client.get("/api/patients", params={"limit": 1, "offset": 1}).json()
    beyond = client.get("/api/patients", params={"offset": 5}).json()
    assert first["total"] == second["total"] == beyond["total"] == 2
    assert [first["items"][0]["patient_id"], second["items"][0]["patient_id"]] == [FOOT_PATIENT, HAND_PATIENT]
    assert beyond["items"] == []
    assert client.get("/api/patients", params={"limit": 0}).status_code == 422
    assert client.get("/api/patients", params={"offset": -1}).status_code == 422


def test_a_patient_whose_id_has_a_slash_and_a_space(client: TestClient, received: Received) -> None:
    response = client.get(f"/api/patients/{quote(HAND_PATIENT, safe='')}")
    assert response.status_code == 200, response.text
    patient = response.json()
    assert patient["patient_id"] == HAND_PATIENT
    [study] = patient["studies"]
    assert study["study_instance_uid"] == received.hand.StudyInstanceUID
    instances = [instance for series in study["series"] for instance in series["instances"]]
    [source] = [instance for instance in instances if not instance["node_written"]]
    assert source["sop_instance_uid"] == received.hand.SOPInstanceUID
    assert (source["rows"], source["columns"]) == (received.hand.Rows, received.hand.Columns)
    assert source["modality"] == "DX" and source["body_part_examined"] == "HAND"
    assert source["job_states"] == {"inference": "done", "outputs": "done"}
    assert source["image_url"] == f"/api/instances/{received.hand.SOPInstanceUID}/image.png"
    written = [instance for instance in instances if instance["node_written"]]
    assert sorted(instance["sop_class_uid"] for instance in written) == sorted(
        [SecondaryCaptureImageStorage] * 2 + [ParametricMapStorage] * 2 + [Comprehensive3DSRStorage]
    )
    assert {instance["source_sop_instance_uid"] for instance in written} == {received.hand.SOPInstanceUID}
    for parametric_map in [instance for instance in written if instance["sop_class_uid"] == ParametricMapStorage]:
        shown = png(client.get(parametric_map["image_url"], params={"max_size": 256}))
        assert shown.size == expected_size(received.hand, 256), "a map is shown on the radiograph's grid"
    # the slash also passes unencoded: the path converter takes the rest of the path
    assert client.get(f"/api/patients/{HAND_PATIENT}").json()["patient_id"] == HAND_PATIENT


@pytest.mark.parametrize("patient_id", ["AB", "AB/12", "nobody", "AB%2F12%2034%2F"])
def test_an_unknown_patient_is_404_with_a_reason(client: TestClient, patient_id: str) -> None:
    response = client.get(f"/api/patients/{patient_id}")
    assert response.status_code == 404
    assert response.json() == {"detail": "no patient with this PatientID"}


# --- studies and instances ----------------------------------------------------------------------------------


def test_a_study_with_its_patient_series_and_instances(client: TestClient, received: Received) -> None:
    study = client.get(f"/api/studies/{received.foot.StudyInstanceUID}").json()
    assert study["patient"]["patient_id"] == FOOT_PATIENT
    assert study["accession_number"] == received.foot.AccessionNumber
    assert len(study["series"]) == 4, "the received series, the Secondary Capture's, the map's and the report's"
    assert client.get("/api/studies/1.2.3").json() == {"detail": "no study 1.2.3"}
    assert client.get("/api/studies/1.2.3").status_code == 404


def test_an_instance_with_jobs_results_written_objects_and_deliveries(client: TestClient, received: Received) -> None:
    instance = client.get(f"/api/instances/{received.hand.SOPInstanceUID}").json()
    assert instance["patient_id"] == HAND_PATIENT
    assert instance["study_instance_uid"] == received.hand.StudyInstanceUID
    assert instance["calling_ae"] == "MODALITY" and not instance["node_written"]
    assert [(job["kind"], job["state"], job["attempts"]) for job in instance["jobs"]] == [
        ("inference", "done", 1),
        ("outputs", "done", 1),
    ]
    assert instance["jobs"][0]["note"].startswith("ran bone_age")
    results = instance["results"]
    assert sorted(result["output"] for result in results) == ["female", "male"]
    primary = [result for result in results if result["is_primary"]]
    assert [result["output"] for result in primary] == ["male" if received.hand.PatientSex == "M" else "female"]
    for result in results:
        assert result["task"] == "bone_age" and result["demo_model"] is True
        assert result["model_name"] and result["model_version"] and result["weights_digest"]
        assert 0 < result["values"]["age_months"] < 240
        assert "bone_age_model" in result["timings_ms"]
        assert result["heatmap_url"] == f"/api/results/{result['id']}/heatmap.png"
    written = instance["written_objects"]
    assert sorted(item["sop_class_uid"] for item in written) == sorted(
        [SecondaryCaptureImageStorage] * 2 + [ParametricMapStorage] * 2 + [Comprehensive3DSRStorage]
    )
    deliveries = [delivery for item in written for delivery in item["deliveries"]]
    assert len(deliveries) == 5 and {delivery["destination"] for delivery in deliveries} == {"pacs"}
    failed = next(delivery for delivery in deliveries if delivery["id"] == received.failed_delivery)
    assert (failed["state"], failed["last_status"], failed["last_error"]) == ("failed", 0xA900, "pacs answered 0xA900")
    assert instance["deliveries"] == []

    report_uid = next(item["sop_instance_uid"] for item in written if item["sop_class_uid"] == Comprehensive3DSRStorage)
    report = client.get(f"/api/instances/{report_uid}").json()
    assert report["node_written"] and report["source_sop_instance_uid"] == received.hand.SOPInstanceUID
    assert report["image_url"] is None
    assert len(report["deliveries"]) == 1 and report["results"] == [] and report["jobs"] == []

    response = client.get("/api/instances/1.2.3")
    assert (response.status_code, response.json()) == (404, {"detail": "no instance 1.2.3"})


def test_image_png_is_the_radiograph_in_gray_scaled_down(client: TestClient, received: Received) -> None:
    uid = received.foot.SOPInstanceUID
    image = png(client.get(f"/api/instances/{uid}/image.png"))
    assert image.mode == "L" and image.size == expected_size(received.foot, 1024)
    pixels = np.asarray(image)
    assert pixels.min() < 30 and pixels.max() > 220, "the VOI window spans the gray scale"
    small = png(client.get(f"/api/instances/{uid}/image.png", params={"max_size": 256}))
    assert small.size == expected_size(received.foot, 256) and max(small.size) == 256
    for max_size in (63, 4097, "big"):
        assert client.get(f"/api/instances/{uid}/image.png", params={"max_size": max_size}).status_code == 422
    assert client.get("/api/instances/1.2.3/image.png").status_code == 404


def test_image_png_of_a_report_is_409_with_a_reason(client: TestClient, received: Received) -> None:
    instance = client.get(f"/api/instances/{received.foot.SOPInstanceUID}").json()
    report = next(item for item in instance["written_objects"] if item["sop_class_uid"] == Comprehensive3DSRStorage)
    response = client.get(f"/api/instances/{report['sop_instance_uid']}/image.png")
    assert response.status_code == 409
    assert "no image" in response.json()["detail"]


# --- results ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_size", [1024, 300])
def test_heatmap_png_lies_over_image_png(client: TestClient, received: Received, max_size: int) -> None:
    instance = client.get(f"/api/instances/{received.foot.SOPInstanceUID}").json()
    [result] = instance["results"]
    assert result["task"] == "hallux_valgus" and result["is_primary"]
    heatmap = png(client.get(result["heatmap_url"], params={"max_size": max_size}))
    image = png(client.get(instance["image_url"], params={"max_size": max_size}))
    assert heatmap.mode == "RGBA" and heatmap.size == image.size
    rgba = np.asarray(heatmap)
    alpha = rgba[..., 3]
    scale = image.size[0] / received.foot.Columns
    x, y = (round(value * scale) for value in result["values"]["heatmap_peak_xy"])
    near = alpha[max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3]
    assert near.min() > 200, "opaque at the peak"
    assert rgba[y, x, 0] > rgba[y, x, 2], "jet: red at the peak, not blue"
    rows, columns = np.indices(alpha.shape)
    far = np.hypot(rows - y, columns - x) > 0.75 * max(alpha.shape)
    assert far.any() and (alpha[far] == 0).mean() > 0.5, "transparent far from the peak"


def test_an_unknown_result_is_404(client: TestClient) -> None:
    response = client.get("/api/results/999999/heatmap.png")
    assert (response.status_code, response.json()) == (404, {"detail": "no result 999999"})
    assert client.get("/api/results/abc/heatmap.png").status_code == 422


def test_a_damaged_heatmaps_file_is_404_not_a_server_error(client: TestClient, received: Received) -> None:
    [result] = client.get(f"/api/instances/{received.foot.SOPInstanceUID}").json()["results"]
    with received.node.sessions() as session:
        path = received.node.store.absolute(session.get_one(InferenceResult, result["id"]).heatmap_path)
    kept = path.read_bytes()
    try:
        path.write_bytes(kept[: len(kept) // 2])
        response = client.get(result["heatmap_url"])
        assert (response.status_code, response.json()) == (
            404,
            {"detail": f"the heatmap of result {result['id']} is unreadable"},
        )
    finally:
        path.write_bytes(kept)


# Found by schemathesis (tests/test_openapi_fuzz.py): numbers the database cannot take overflowed in its driver (a
# 500): SQLite's INTEGER beyond 64 bits, PostgreSQL's 32-bit ids and 64-bit OFFSET. They are refused by the
# parameters' declared bounds.
@pytest.mark.parametrize(
    ("method", "url", "bound"),
    [
        ("GET", "/api/results/10745480258298517504/heatmap.png", "less than or equal to 2147483647"),
        ("GET", "/api/results/2147483648/heatmap.png", "less than or equal to 2147483647"),
        ("GET", "/api/results/-99999999999999999999/heatmap.png", "greater than or equal to 1"),
        ("POST", "/api/deliveries/10745480258298517504/retry", "less than or equal to 2147483647"),
        ("GET", "/api/patients?offset=383149339397759441966202880", "less than or equal to 9223372036854775807"),
        ("GET", "/api/jobs?offset=9223372036854775808", "less than or equal to 9223372036854775807"),
        ("GET", "/api/deliveries?offset=9223372036854775808", "less than or equal to 9223372036854775807"),
        ("GET", "/patients?offset=9223372036854775808", "less than or equal to 9223372036854775807"),
    ],
)
def test_numbers_beyond_the_database_are_422(client: TestClient, method: str, url: str, bound: str) -> None:
    response = client.request(method, url)
    assert response.status_code == 422, response.text
    assert bound in response.json()["detail"][0]["msg"]


def test_the_largest_accepted_numbers_answer(client: TestClient) -> None:
    assert client.get("/api/results/2147483647/heatmap.png").status_code == 404
    assert client.post("/api/deliveries/2147483647/retry").status_code == 404
    page = client.get("/api/patients", params={"offset": 2**63 - 1}).json()
    assert (page["items"], page["total"], page["offset"]) == ([], 2, 2**63 - 1)


# Found by schemathesis on PostgreSQL: a NUL character in a text parameter makes the driver raise (a 500).
@pytest.mark.parametrize(
    "url",
    [
        "/api/patients?search=DOE%00",
        "/api/patients/AB%00",
        "/api/studies/1.2%00",
        "/api/instances/1.2%00",
        "/api/instances/1.2%00/image.png",
        "/api/jobs?kind=inference%00",
        "/api/deliveries?destination=pacs%00",
        "/patients?search=%00",
        "/patients/AB%00",
        "/instances/1.2%00",
    ],
)
def test_a_nul_character_is_422(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 422, response.text
    assert "NUL (0x00) characters are not allowed" in response.json()["detail"][0]["msg"]


# --- jobs and deliveries ------------------------------------------------------------------------------------


def test_jobs_newest_first_by_state_and_kind(client: TestClient, received: Received) -> None:
    page = client.get("/api/jobs").json()
    assert page["total"] == 4
    ids = [job["id"] for job in page["items"]]
    assert ids == sorted(ids, reverse=True)
    assert [job["kind"] for job in page["items"]] == ["outputs", "outputs", "inference", "inference"]
    assert page["items"][-1]["sop_instance_uid"] == received.hand.SOPInstanceUID
    assert client.get("/api/jobs", params={"kind": "inference"}).json()["total"] == 2
    assert client.get("/api/jobs", params={"state": "done"}).json()["total"] == 4
    assert client.get("/api/jobs", params={"state": "failed"}).json() == {
        "items": [],
        "total": 0,
        "offset": 0,
        "limit": 50,
    }
    paged = client.get("/api/jobs", params={"offset": 1, "limit": 2}).json()
    assert [job["id"] for job in paged["items"]] == ids[1:3]
    assert client.get("/api/jobs", params={"state": "asleep"}).status_code == 422


def test_deliveries_newest_first_by_state_and_destination(client: TestClient, received: Received) -> None:
    page = client.get("/api/deliveries").json()
    assert page["total"] == 8, "5 objects of the hand, 3 of the foot, to pacs"
    ids = [delivery["id"] for delivery in page["items"]]
    assert ids == sorted(ids, reverse=True)
    assert {item["sop_class_uid"] for item in page["items"]} == {
        SecondaryCaptureImageStorage,
        ParametricMapStorage,
        Comprehensive3DSRStorage,
    }
    failed = client.get("/api/deliveries", params={"state": "failed"}).json()
    assert [item["id"] for item in failed["items"]] == [received.failed_delivery]
    assert client.get("/api/deliveries", params={"destination": "pacs", "limit": 2}).json()["total"] == 8
    assert client.get("/api/deliveries", params={"destination": "ris"}).json()["total"] == 0


def test_retry_a_delivery(client: TestClient, received: Received) -> None:
    response = client.post("/api/deliveries/999999/retry")
    assert (response.status_code, response.json()) == (404, {"detail": "no delivery 999999"})
    response = client.post(f"/api/deliveries/{received.pending_delivery}/retry")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"delivery {received.pending_delivery} is pending: only a failed delivery can be retried"
    )
    response = client.post(f"/api/deliveries/{received.failed_delivery}/retry")
    assert response.status_code == 200, response.text
    delivery = response.json()
    assert (delivery["id"], delivery["state"], delivery["attempts"]) == (received.failed_delivery, "pending", 0)
    assert client.post(f"/api/deliveries/{received.failed_delivery}/retry").status_code == 409, "not twice"
    with received.node.sessions() as session:
        assert session.get_one(Delivery, received.failed_delivery).state == DeliveryState.PENDING


# --- security -----------------------------------------------------------------------------------------------


def test_cors_only_when_origins_are_configured(client: TestClient, received: Received) -> None:
    origin = {"Origin": "https://viewer.example.org"}
    assert "access-control-allow-origin" not in client.get("/api/jobs", headers=origin).headers
    allowed = client_for(received, cors_origins=["https://viewer.example.org"])
    response = allowed.get("/api/jobs", headers=origin)
    assert response.headers["access-control-allow-origin"] == "https://viewer.example.org"
    preflight = allowed.options(
        "/api/patients",
        headers={**origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "Authorization"},
    )
    assert preflight.status_code == 200
    other = allowed.get("/api/jobs", headers={"Origin": "https://elsewhere.example.org"})
    assert "access-control-allow-origin" not in other.headers


def test_patient_identifiers_stay_out_of_the_logs(received: Received, caplog: pytest.LogCaptureFixture) -> None:
    client = client_for(received)
    with caplog.at_level("DEBUG"):
        client.get(f"/api/patients/{quote(HAND_PATIENT, safe='')}")
        client.get("/api/patients", params={"search": "DOE"})
        client.get("/api/patients/NOT-A-PATIENT")
        client.post(f"/api/deliveries/{received.pending_delivery}/retry")
    node_side = "\n".join(record.getMessage() for record in caplog.records if record.name != "httpx")  # the client's
    for identifier in (HAND_PATIENT, quote(HAND_PATIENT), "DOE", "NOT-A-PATIENT"):
        assert identifier not in node_side
