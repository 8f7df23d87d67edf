"""The seed projects' endpoints over a node with the demo models: uploads of a picture and of a DICOM file run
inference in the request and answer with the seeds' field names; the uploads are stored like received images;
sizes, kinds, corrupt files, bad parameters and the token are refused with a reason."""

from __future__ import annotations

import base64
import copy
import io
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import uid
from sqlalchemy import select

from dicom_node.audit.record import AuditEventKind
from dicom_node.config import InferenceSettings, Settings
from dicom_node.inference_jobs import InferenceModels
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.models import AuditEvent, Instance, Job, JobState, UserRole
from dicom_node.node import Node
from dicom_node.phantoms.generator import render_phantom
from inference.model_card import read_card
from inference.pixels import radiograph_pixels
from tests.accounts import accounts
from tests.seed_responses import BONE_AGE_SEED, HALLUX_VALGUS_SEED
from web import uploads
from web.app import create_app
from web.dependencies import WebContext
from web.predictions import infer_now

PICTURE_PATIENT = "UP/12 34"  # free text: a slash and a space
FOOT_PATIENT = "FOOT-0001"
SEED_FIELDS = {
    "patient_id",
    "prediction_id",
    "mlflow_run_id",
    "male_prediction",
    "female_prediction",
    "timestamp",
    "prediction",
    "confidence",
    "hallux_valgus_detected",
    "probabilities",
    "inference_time",
    "model_info",
}
BONE_AGE_FIELDS = {"age", "uncertainty_sigma", "gradcam_url", "gradcam_path", "timestamp"}


@dataclass(frozen=True)
class Served:
    node: Node
    hand_png: bytes
    foot: bytes  # a DICOM Part 10 file
    foot_ds: pydicom.Dataset


def part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("predict")
    settings = Settings(storage={"root": root / "storage"}, workers={"count": 0})
    node = Node(settings, models=InferenceModels.load(InferenceSettings(runtime="torch")))  # the demo cards
    hand, _ = render_phantom(12, 0, "hand")
    shown = Image.fromarray(np.rint(radiograph_pixels(hand) * 255).astype(np.uint8))
    shown.thumbnail((768, 768))  # a picture of the radiograph, as a user would send it
    foot, _ = render_phantom(12, 1, "foot")
    foot.PatientID = FOOT_PATIENT
    yield Served(node, png_bytes(shown), part10(foot), foot)
    node.engine.dispose()


def client_for(served: Served, node: bool = True, **web: object) -> TestClient:
    settings = served.node.settings
    settings = settings.model_copy(update={"web": type(settings.web).model_validate(settings.web.model_dump() | web)})
    context = WebContext(settings, served.node.sessions, lambda: True, node=served.node if node else None)
    return TestClient(create_app(context))


@pytest.fixture(scope="module")
def client(served: Served) -> TestClient:
    return client_for(served)


@pytest.fixture(scope="module")
def hand_response(client: TestClient, served: Served) -> dict:
    response = client.post(
        "/predict",
        files={"image": ("xray.png", served.hand_png, "image/png")},
        data={"patient_id": PICTURE_PATIENT, "sex": "F", "task": "bone_age"},
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def foot_response(client: TestClient, served: Served) -> dict:
    # the kind is told by the content: a misleading name and content type change nothing
    response = client.post("/predict", files={"image": ("foot.txt", served.foot, "text/plain")})
    assert response.status_code == 200, response.text
    return response.json()


def problem(response, status_code: int) -> str:
    assert response.status_code == status_code, response.text
    detail = response.json()["detail"]
    assert detail, "an error carries a reason"
    return detail if isinstance(detail, str) else str(detail)


# --- POST /predict ------------------------------------------------------------------------------------------


def test_a_picture_of_a_hand_gets_both_bone_age_scales_with_the_seed_fields(
    client: TestClient, hand_response: dict
) -> None:
    body = hand_response
    assert SEED_FIELDS <= set(body)
    assert body["status"] == "success" and body["patient_id"] == PICTURE_PATIENT
    assert body["tasks"] == ["bone_age"]
    assert body["mlflow_run_id"] is None  # logged in the background, MLflow being off here
    for sex, primary in (("male", False), ("female", True)):
        estimate = body[f"{sex}_prediction"]
        assert BONE_AGE_FIELDS <= set(estimate)
        assert 0 < estimate["age"] < 25, "years, as the bone-age seed gave them"
        assert estimate["age"] == pytest.approx(estimate["age_months"] / 12, abs=1e-3)
        assert estimate["uncertainty_sigma"] == pytest.approx(estimate["uncertainty_sigma_months"] / 12, abs=1e-3)
        assert estimate["is_primary"] is primary
        heatmap = client.get(estimate["gradcam_url"])
        assert heatmap.status_code == 200 and heatmap.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(heatmap.content)).mode == "RGBA"
    # the foot model did not run: its fields are null
    assert body["prediction"] is body["confidence"] is body["hallux_valgus_detected"] is body["probabilities"] is None
    assert body["inference_time"] > 0
    assert body["models"]["bone_age"]["name"] == "bone-age-demo" and body["models"]["bone_age"]["demo"]
    assert set(body["models"]) == {"bone_age"}
    assert body["model_info"] is None, "the hallux valgus seed's model_info: its model did not run"


def test_the_picture_is_stored_as_a_secondary_capture_and_shows_in_the_viewer(
    client: TestClient, hand_response: dict, served: Served
) -> None:
    patient = client.get(f"/api/patients/{quote(PICTURE_PATIENT, safe='')}")
    assert patient.status_code == 200, patient.text
    assert patient.json()["sex"] == "F"
    [study] = patient.json()["studies"]
    received = [i for series in study["series"] for i in series["instances"] if not i["node_written"]]
    assert [i["sop_instance_uid"] for i in received] == [hand_response["sop_instance_uid"]]
    assert received[0]["body_part_examined"] == "HAND" and received[0]["job_states"]["inference"] == "done"
    instance = client.get(hand_response["instance_url"]).json()
    assert instance["calling_ae"] == "HTTP-UPLOAD"
    assert instance["sop_class_uid"] == uid.SecondaryCaptureImageStorage
    assert client.get(f"/api/instances/{hand_response['sop_instance_uid']}/image.png").status_code == 200
    with served.node.sessions() as session:
        path = session.scalar(
            select(Instance.path).where(Instance.sop_instance_uid == hand_response["sop_instance_uid"])
        )
    ds = pydicom.dcmread(served.node.store.absolute(path))
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.PatientID) == ("MONOCHROME2", 8, PICTURE_PATIENT)


def test_a_dicom_foot_gets_the_hallux_valgus_fields(foot_response: dict, served: Served) -> None:
    body = foot_response
    assert SEED_FIELDS <= set(body)
    assert body["patient_id"] == FOOT_PATIENT and body["sop_instance_uid"] == served.foot_ds.SOPInstanceUID
    assert body["tasks"] == ["hallux_valgus"]  # BodyPartExamined FOOT routes it
    assert body["prediction"] in body["probabilities"]
    assert set(body["probabilities"]) == {"Normal", "Flatfoot", "Foot Ulcer", "Hallux Valgus"}
    assert body["confidence"] == pytest.approx(body["probabilities"][body["prediction"]])
    assert isinstance(body["hallux_valgus_detected"], bool)
    assert body["inference_time"] > 0
    assert body["models"]["hallux_valgus"]["name"] == "hallux-valgus-demo"
    assert "not for clinical use" in body["models"]["hallux_valgus"]["disclaimer"]
    assert "not for clinical use" in body["model_info"]["name"], "the seed's model_info names the demo too"
    assert body["male_prediction"] is None and body["female_prediction"] is None


def test_predict_base64_answers_as_predict(client: TestClient, served: Served, foot_response: dict) -> None:
    # the same DICOM file again is the same instance, its results already recorded: the same answer
    encoded = base64.b64encode(served.foot).decode()
    again = client.post("/predict_base64", json={"image": encoded})
    assert again.status_code == 200, again.text
    assert again.json() == foot_response
    # fields sent empty, as a browser's form sends them, count as not sent
    empty = {"patient_id": "", "sex": "", "task": ""}
    assert client.post("/predict", files={"image": ("f", served.foot)}, data=empty).json() == foot_response
    # a data URL with line breaks, as a browser's FileReader or a MIME encoder gives it
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert (
        client.post("/predict_base64", json={"image": "data:application/dicom;base64," + wrapped}).json()
        == again.json()
    )


def test_predict_base64_of_a_picture_gives_the_same_predictions(
    client: TestClient, served: Served, hand_response: dict
) -> None:
    request = {"image": base64.b64encode(served.hand_png).decode(), "patient_id": PICTURE_PATIENT, "sex": "F"}
    response = client.post("/predict_base64", json=request | {"task": "bone_age"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction_id"] != hand_response["prediction_id"], "a picture is a new instance each time"
    for sex in ("male", "female"):
        for key in ("age", "uncertainty_sigma"):
            assert body[f"{sex}_prediction"][key] == pytest.approx(hand_response[f"{sex}_prediction"][key], abs=1e-3)


def json_type(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return repr(type(value).__name__)
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", dict: "object", list: "array"}[type(value)]


_ACCEPTED = {"number": {"number", "integer"}}  # a fractional number of the seed's may come out whole


def unlike_the_seed(example: dict, actual: dict, where: str = "") -> list[str]:
    """Each field of the seed's ``example`` that ``actual`` lacks or gives as another JSON type (an integer where
    the seed has one; a number may be an integer where the seed's is fractional)."""
    problems = []
    for key, expected in example.items():
        if key not in actual:
            problems.append(f"{where}{key}: missing")
        elif isinstance(expected, dict) and isinstance(actual[key], dict):
            problems += unlike_the_seed(expected, actual[key], f"{where}{key}.")
        elif json_type(actual[key]) not in _ACCEPTED.get(json_type(expected), {json_type(expected)}):
            problems.append(f"{where}{key}: {json_type(actual[key])}, the seed's is {json_type(expected)}")
    return problems


def test_a_foot_answers_as_the_hallux_valgus_seeds_readme_shows_it(
    client: TestClient, served: Served, foot_response: dict
) -> None:
    encoded = client.post("/predict_base64", json={"image": base64.b64encode(served.foot).decode()}).json()
    for body in (foot_response, encoded):
        assert unlike_the_seed(HALLUX_VALGUS_SEED, body) == []
        probabilities = body["probabilities"]
        assert set(probabilities) == set(HALLUX_VALGUS_SEED["probabilities"]), "the seed's class names"
        assert sum(probabilities.values()) == pytest.approx(100, abs=0.05), "percent, as the seed's"
        assert body["confidence"] == probabilities[body["prediction"]] > 25
        assert body["confidence"] == pytest.approx(100 * body["confidence_fraction"], abs=0.005)
        assert body["probability_fractions"][body["prediction"]] == body["confidence_fraction"]
        assert re.fullmatch(r"\d{1,3}\.\d%", body["model_info"]["accuracy"]), "measured, as percent text"
        assert re.fullmatch(r"\d{1,3}\.\d%", body["model_info"]["hallux_valgus_recall"])


def test_a_hand_answers_as_the_bone_age_seeds_readme_shows_it(
    client: TestClient, served: Served, hand_response: dict
) -> None:
    request = {"image": base64.b64encode(served.hand_png).decode(), "task": "bone_age"}
    encoded = client.post("/predict_base64", json=request).json()
    for body in (hand_response, encoded):
        # the MLflow run is logged after the answer, in the background: its id is null until then (MLflow is off
        # here; tests/test_task_interface.py reads it from /results once logged)
        assert unlike_the_seed(BONE_AGE_SEED, body | {"mlflow_run_id": "logged later"}) == []
        assert body["mlflow_run_id"] is None
        assert body["message"] == "Male & Female Bone Age Results"
        for sex in ("male", "female"):
            estimate = body[f"{sex}_prediction"]
            assert estimate["age"] == pytest.approx(estimate["age_months"] / 12, abs=1e-3), "years, as the seed's"
            assert estimate["uncertainty_sigma"] == pytest.approx(estimate["uncertainty_sigma_months"] / 12, abs=1e-3)
            assert client.get(estimate["gradcam_path"]).status_code == 200


def test_the_comparison_with_the_seed_finds_a_field_in_another_unit_or_type() -> None:
    fractions = HALLUX_VALGUS_SEED | {"confidence": "0.968", "prediction_id": 1.5}
    assert unlike_the_seed(HALLUX_VALGUS_SEED | {"prediction_id": 1}, fractions) == [
        "confidence: string, the seed's is number",
        "prediction_id: number, the seed's is integer",
    ]
    assert unlike_the_seed(BONE_AGE_SEED, BONE_AGE_SEED | {"male_prediction": {"age": 12.5}}) == [
        "male_prediction.uncertainty_sigma: missing",
        "male_prediction.gradcam_path: missing",
        "male_prediction.gradcam_url: missing",
    ]


# --- GET /results/{patient_id} ------------------------------------------------------------------------------


def test_results_lists_the_patients_predictions_newest_first(client: TestClient, hand_response: dict) -> None:
    response = client.get(f"/results/{quote(PICTURE_PATIENT, safe='')}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["patient_id"] == PICTURE_PATIENT and body["upload_timestamp"]
    assert body["total_predictions"] == len(body["predictions"]) >= 1
    timestamps = [prediction["timestamp"] for prediction in body["predictions"]]
    assert timestamps == sorted(timestamps, reverse=True)
    [listed] = [p for p in body["predictions"] if p["prediction_id"] == hand_response["prediction_id"]]
    assert {key: listed[key] for key in hand_response} == hand_response
    assert listed["male_age"] == listed["male_prediction"]["age"]
    assert listed["female_uncertainty"] == listed["female_prediction"]["uncertainty_sigma"]


def test_results_of_an_unknown_patient_is_404(client: TestClient) -> None:
    assert "PatientID" in problem(client.get("/results/NOBODY-42"), 404)


# --- GET /model_info ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_node", [True, False])
def test_model_info_reports_the_cards_metrics(served: Served, with_node: bool) -> None:
    response = client_for(served, node=with_node).get("/model_info")
    assert response.status_code == 200, response.text
    body = response.json()
    inference = served.node.settings.inference
    for task, path in ((task, settings.card) for task, settings in inference.tasks.items()):
        card = read_card(path)
        info = body[task]
        assert (info["task"], info["name"], info["version"], info["input_size"]) == (
            task,
            card.name,
            card.version,
            card.input_size,
        )
        assert info["demo"] is card.demo and info["disclaimer"] == card.disclaimer
        assert info["metrics"] == card.metrics, "the card's measured metrics, nothing added"
        assert info["metrics_note"] is None


# --- errors -------------------------------------------------------------------------------------------------


def test_an_upload_over_the_limit_is_413(served: Served) -> None:
    small = client_for(served, max_upload_mb=1)
    # just over the limit: the body passes the request's allowance, the image does not
    over = np.random.default_rng(0).bytes(2**20 + 10)
    assert "1 MiB" in problem(small.post("/predict", files={"image": ("a.png", over)}), 413)
    # far over: refused from the Content-Length, before the body is read
    assert "1 MiB" in problem(small.post("/predict", files={"image": ("a.png", over * 3)}), 413)
    assert "1 MiB" in problem(small.post("/predict_base64", json={"image": base64.b64encode(over).decode()}), 413)
    # a body without a Content-Length (chunked) is counted as it arrives
    body = b'{"image": "' + base64.b64encode(over * 3)
    chunks = (body[i : i + 2**16] for i in range(0, len(body), 2**16))
    headers = {"Content-Type": "application/json"}
    assert "1 MiB" in problem(small.post("/predict_base64", content=chunks, headers=headers), 413)


def test_default_limit_is_16_mib() -> None:
    assert Settings().web.max_upload_mb == 16


def test_a_decompression_bomb_is_413(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    picture = png_bytes(Image.new("L", (200, 100)))
    monkeypatch.setattr(uploads, "MAX_IMAGE_PIXELS", 10_000)
    assert "decompression-bomb" in problem(client.post("/predict", files={"image": ("a.png", picture)}), 413)
    monkeypatch.setattr(uploads, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # Pillow's own guard: an error beyond twice its limit
    assert "decompression-bomb" in problem(client.post("/predict", files={"image": ("a.png", picture)}), 413)


@pytest.mark.parametrize(
    "content",
    [b"patient,age\nA,12\n", b"%PDF-1.7\n" + b"\x00" * 300, b"GIF89a" + b"\x00" * 64],
    ids=["text", "pdf", "gif"],
)
def test_anything_but_dicom_png_jpeg_tiff_bmp_is_415(client: TestClient, content: bytes) -> None:
    detail = problem(client.post("/predict", files={"image": ("xray.png", content, "image/png")}), 415)
    assert "PNG, JPEG, TIFF or BMP" in detail


def test_a_truncated_dicom_file_is_422_and_not_stored(client: TestClient, served: Served) -> None:
    ds = served.foot_ds.copy()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    data = part10(ds)
    detail = problem(client.post("/predict", files={"image": ("cut.dcm", data[: len(data) * 2 // 3])}), 422)
    assert "truncated" in detail
    with served.node.sessions() as session:
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == ds.SOPInstanceUID)) is None


def test_a_dicom_file_without_samples_per_pixel_is_422_and_not_retried(client: TestClient, served: Served) -> None:
    """Found by tests/test_hostile_input.py: the inference failed and the request answered 503, retried later."""
    ds = copy.deepcopy(served.foot_ds)  # a Dataset's copy() shares its elements: del would reach the original
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    del ds.SamplesPerPixel
    detail = problem(client.post("/predict", files={"image": ("no-spp.dcm", part10(ds))}), 422)
    assert "Samples per Pixel" in detail


def test_a_dicom_file_with_an_unknown_vr_is_422(client: TestClient, served: Served) -> None:
    """Found by tests/test_hostile_input.py: routing read an ImageType of VR 'XX' and the request failed with 500."""
    ds = served.foot_ds.copy()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    data = part10(ds)
    image_type = b"\x08\x00\x08\x00CS"  # (0008,0008) in explicit VR little endian
    assert data.count(image_type) == 1
    detail = problem(
        client.post("/predict", files={"image": ("xx.dcm", data.replace(image_type, b"\x08\x00\x08\x00XX"))}), 422
    )
    assert "cannot be decoded" in detail


def test_a_truncated_picture_is_422(client: TestClient, served: Served) -> None:
    cut = served.hand_png[: len(served.hand_png) // 2]
    assert "cannot be decoded" in problem(client.post("/predict", files={"image": ("a.png", cut)}), 422)


@pytest.mark.parametrize(
    "fields",
    [{"task": "knee"}, {"sex": "X"}, {"patient_id": "A" * 65}, {"patient_id": "A\\B"}],
    ids=["task", "sex", "long-id", "backslash-id"],
)
def test_bad_parameters_are_422(client: TestClient, served: Served, fields: dict) -> None:
    problem(client.post("/predict", files={"image": ("a.png", served.hand_png)}, data=fields), 422)
    request = {"image": base64.b64encode(served.hand_png).decode()} | fields
    problem(client.post("/predict_base64", json=request), 422)


def test_a_dicom_upload_is_stored_as_sent(client: TestClient, served: Served) -> None:
    files = {"image": ("foot.dcm", served.foot)}
    assert "PatientID" in problem(client.post("/predict", files=files, data={"patient_id": "OTHER"}), 422)
    assert "routing sends this image to hallux_valgus" in problem(
        client.post("/predict", files=files, data={"task": "bone_age"}), 422
    )


def test_invalid_base64_is_422(client: TestClient) -> None:
    assert "base64" in problem(client.post("/predict_base64", json={"image": "not base64!"}), 422)


@pytest.mark.parametrize("patient_id", [None, ""])
def test_predict_base64_takes_a_null_or_empty_patient_id_as_not_sent(client: TestClient, patient_id) -> None:
    # the 64-character bound was applied to the None it became: a TypeError in validation, a 500 (schemathesis)
    request = {"image": "not base64!", "patient_id": patient_id}
    assert "base64" in problem(client.post("/predict_base64", json=request), 422), "the request reached the route"


def test_a_body_that_cannot_be_parsed_is_400(client: TestClient) -> None:
    # JSON that is not UTF-8: FastAPI's 400, documented in the spec (schemathesis found it undocumented)
    response = client.post(
        "/predict_base64", content=b'{"image": "\xff\xfe"}', headers={"Content-Type": "application/json"}
    )
    problem(response, 400)
    assert "400" in client.get("/openapi.json").json()["paths"]["/predict_base64"]["post"]["responses"]


def test_results_of_a_patient_id_with_a_nul_character_is_422(client: TestClient) -> None:
    # PostgreSQL takes no NUL in a text parameter: the driver raised, a 500
    assert "NUL" in problem(client.get("/results/AB%0012"), 422)


def test_uploads_need_an_operator_and_results_a_viewer(served: Served, hand_response: dict) -> None:
    client = client_for(served)
    results = f"/results/{quote(PICTURE_PATIENT, safe='')}"
    with accounts(served.node, UserRole.VIEWER, UserRole.OPERATOR) as tokens:
        assert client.post("/predict", files={"image": ("a.png", served.hand_png)}).status_code == 401
        assert client.post("/predict_base64", json={"image": "AAAA"}).status_code == 401
        assert client.get(results).status_code == 401
        assert client.get("/model_info").status_code == 200, "no patient data: open"
        viewer = {"Authorization": tokens[UserRole.VIEWER]}
        assert client.get(results, headers=viewer).status_code == 200
        assert client.post("/predict_base64", json={"image": "AAAA"}, headers=viewer).status_code == 403
        operator = {"Authorization": tokens[UserRole.OPERATOR]}
        response = client.post("/predict", files={"image": ("a.png", served.hand_png)}, headers=operator)
        assert response.status_code == 200, response.text
        with served.node.sessions() as session:
            created = session.scalars(
                select(AuditEvent).where(AuditEvent.kind == AuditEventKind.PATIENT_DATA_CREATED)
            ).all()[-1]
        assert created.user == "operator" and created.patients == [response.json()["patient_id"]]
        assert ["instance", response.json()["sop_instance_uid"]] in created.objects


def test_without_the_node_predict_is_503(served: Served) -> None:
    assert "node" in problem(
        client_for(served, node=False).post("/predict", files={"image": ("a.png", served.hand_png)}), 503
    )


# --- inference in the request -------------------------------------------------------------------------------


def test_a_job_a_worker_claimed_first_runs_once_and_the_request_waits_for_it(served: Served) -> None:
    node = served.node
    ds = served.foot_ds.copy()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    data = part10(ds)
    prepared = uploads.prepare(data, node.settings.inference, 2**30)
    node.ingestor.ingest(prepared.file_meta, [prepared.dataset], calling_ae="TEST")
    [claimed] = node.queue.claim_batch([INFERENCE_JOB], 1)  # a worker was quicker
    handler = node.workers.handlers[INFERENCE_JOB]

    def worker() -> None:
        threading.Event().wait(0.3)
        assert not handler([claimed])
        node.queue.complete(claimed)

    thread = threading.Thread(target=worker)
    thread.start()
    infer_now(node, claimed.instance_pk, timeout=30)
    thread.join()
    with node.sessions() as session:
        job = session.scalar(select(Job).where(Job.id == claimed.id))
        assert (job.state, job.attempts) == (JobState.DONE, 1)
        assert session.scalar(select(Instance).where(Instance.id == claimed.instance_pk)).results


@pytest.mark.parametrize(
    ("kind", "mode"), [("PNG", "RGBA"), ("JPEG", "RGB"), ("TIFF", "I;16"), ("BMP", "P"), ("PNG", "LA")]
)
def test_each_accepted_picture_becomes_8_bit_gray(kind: str, mode: str) -> None:
    ramp = np.tile(np.linspace(0, 1, 64), (48, 1))
    if mode == "I;16":
        image = Image.fromarray((ramp * 4000 + 100).astype(np.uint16))
    else:
        image = Image.fromarray(np.rint(ramp * 255).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    gray, found = uploads.decode_picture(buffer.getvalue())
    assert found == kind and gray.dtype == np.uint8 and gray.shape == (48, 64)
    assert gray[:, -1].mean() > gray[:, 0].mean() + 200, "the luminance, stretched for 16 bits"
    ds = pydicom.dcmread(io.BytesIO(uploads.secondary_capture(gray, "P-1", "M", "hallux_valgus", found)))
    assert (ds.BodyPartExamined, ds.PatientSex, ds.Modality) == ("FOOT", "M", "OT")
    assert np.array_equal(ds.pixel_array, gray)
