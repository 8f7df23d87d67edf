"""The results viewer over a node's real state (two phantoms received, inference and outputs run, their objects
queued for a destination, one delivery failed): server-rendered pages that show what the JSON API returns, readable
without JavaScript; and a browser (Debian's headless Chromium, driven by Playwright) that logs in, finds a
patient, opens an image and checks the heatmap overlay and the values against the API.

The browser test saves screenshots under its ``tmp_path`` and, when ``TEST_ARTIFACTS`` names a directory, copies
them to ``$TEST_ARTIFACTS/viewer/``; the paths are recorded as the test's ``screenshot`` properties (JUnit XML).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import Comprehensive3DSRStorage

from dicom_node.models import UserRole
from inference.model_card import DEMO_DISCLAIMER
from tests.accounts import PASSWORD, accounts
from tests.dicom_peers import free_port
from tests.node_state import FOOT_PATIENT, HAND_PATIENT, Received, received_node
from tests.servers import serving
from web.app import create_app
from web.dependencies import WebContext
from web.routers import viewer

BANNER = "AI RESULTS - NOT FOR DIAGNOSTIC USE"
DEMO_LABEL = f"Demo model: {DEMO_DISCLAIMER}"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Received]:
    state = received_node(tmp_path_factory.mktemp("viewer"))
    yield state
    state.node.engine.dispose()


def app_for(received: Received, **web: object):
    settings = received.node.settings
    settings = settings.model_copy(update={"web": type(settings.web).model_validate(settings.web.model_dump() | web)})
    return create_app(WebContext(settings, received.node.sessions, lambda: True))


@pytest.fixture(scope="module")
def client(received: Received) -> TestClient:
    return TestClient(app_for(received))


# --- reading the pages --------------------------------------------------------------------------------------


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    text: str = ""


class _TestIds(HTMLParser):
    """The elements with a ``data-testid``, with their attributes and text; and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: dict[str, list[Element]] = {}
        self.images: list[Element] = []
        self.links: list[str] = []
        self._open: list[tuple[str, Element | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs))
        if tag == "img":
            self.images.append(element)
        if tag == "a" and element.attrs.get("href"):
            self.links.append(element.attrs["href"])
        testid = element.attrs.get("data-testid")
        if testid:
            self.elements.setdefault(testid, []).append(element)
        if tag not in ("img", "input", "meta", "link", "br"):
            self._open.append((tag, element if testid else None))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for _, element in self._open:
            if element is not None:
                element.text += data


class Page:
    def __init__(self, html: str) -> None:
        parser = _TestIds()
        parser.feed(html)
        self.html = html
        self.elements = parser.elements
        self.images = parser.images
        self.links = parser.links
        self.text = " ".join(" ".join(parser.text).split())

    def one(self, testid: str) -> Element:
        [element] = self.elements[testid]
        return element

    def all(self, testid: str) -> list[Element]:
        return self.elements.get(testid, [])

    def value(self, testid: str) -> float:
        return float(self.one(testid).attrs["data-value"])

    def shown(self, testid: str) -> str:
        return " ".join(self.one(testid).text.split())


def page(client: TestClient, url: str, status: int = 200) -> Page:
    response = client.get(url)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    shown = Page(response.text)
    assert shown.one("banner").text == BANNER, "the banner is on every page"
    return shown


def api_instance(client: TestClient, uid: str) -> dict:
    response = client.get(f"/api/instances/{uid}")
    assert response.status_code == 200, response.text
    return response.json()


def segment(text: str) -> str:
    return quote(text, safe="")


# --- pages --------------------------------------------------------------------------------------------------


def test_the_root_goes_to_the_patient_list(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code in (302, 303, 307) and response.headers["location"] == "/patients"


def test_the_patient_list_with_counts(client: TestClient, received: Received) -> None:
    shown = page(client, "/patients")
    links = shown.all("patient-link")
    assert [link.text for link in links] == [FOOT_PATIENT, HAND_PATIENT], "the most recently received first"
    assert links[1].attrs["href"] == f"/patients/{segment(HAND_PATIENT)}"
    assert "DOE JANE" in shown.text and "ROE RICHARD" in shown.text
    api = client.get("/api/patients").json()
    assert shown.shown("patient-count").startswith(f"{api['total']} patients")
    for column, key in [("sex", "sex"), ("birth-date", "birth_date"), ("studies", "studies"), ("images", "instances")]:
        assert [cell.text for cell in shown.all(f"patient-{column}")] == [str(item[key]) for item in api["items"]]
    for cell, item in zip(shown.all("patient-last-received"), api["items"], strict=True):
        assert cell.text.startswith(item["last_received_at"][:19].replace("T", " ")) and cell.text.endswith("UTC")


@pytest.mark.parametrize(("search", "found"), [("doe", [HAND_PATIENT]), ("cd-56", [FOOT_PATIENT]), ("nobody", [])])
def test_the_patient_list_searches_as_the_api_does(client: TestClient, search: str, found: list[str]) -> None:
    shown = page(client, f"/patients?search={search}")
    assert [link.text for link in shown.all("patient-link")] == found
    api = client.get("/api/patients", params={"search": search}).json()
    assert [item["patient_id"] for item in api["items"]] == found
    assert f'value="{search}"' in shown.html, "the search stays in the form"
    if not found:
        assert "No patients match this search." in shown.text


def test_the_patient_list_pages(client: TestClient) -> None:
    first = page(client, "/patients?limit=1")
    assert [link.text for link in first.all("patient-link")] == [FOOT_PATIENT]
    assert "/patients?offset=1&amp;limit=1" in first.html and 'rel="prev"' not in first.html
    second = page(client, "/patients?limit=1&offset=1")
    assert [link.text for link in second.all("patient-link")] == [HAND_PATIENT]
    assert 'rel="prev"' in second.html and 'rel="next"' not in second.html


def test_the_search_is_escaped(client: TestClient) -> None:
    response = client.get("/patients", params={"search": '<script>alert("x")</script>'})
    assert response.status_code == 200
    assert "<script>alert" not in response.text and "&lt;script&gt;" in response.text


def test_the_patient_page_lists_studies_series_and_images(client: TestClient, received: Received) -> None:
    shown = page(client, f"/patients/{segment(HAND_PATIENT)}")
    assert shown.one("patient-id").text == HAND_PATIENT
    assert len(shown.all("study")) == 1
    uid = received.hand.SOPInstanceUID
    links = [link.attrs["href"] for link in shown.all("instance-link")]
    assert f"/instances/{uid}" in links
    assert len(links) == 6, "the received image, 2 Secondary Captures, 2 Parametric Maps and the report"
    thumbnails = [image.attrs["src"] for image in shown.images]
    assert f"/api/instances/{uid}/image.png?max_size=256" in thumbnails
    assert "inference: done" in shown.text and "written by the node" in shown.text
    primary = next(result for result in api_instance(client, uid)["results"] if result["is_primary"])
    assert primary["summary"] in shown.text and "demo model" in shown.text
    # the slash also passes unencoded
    assert page(client, f"/patients/{HAND_PATIENT}").one("patient-id").text == HAND_PATIENT


def test_the_image_page_shows_the_apis_bone_ages(client: TestClient, received: Received) -> None:
    uid = received.hand.SOPInstanceUID
    api = api_instance(client, uid)
    shown = page(client, f"/instances/{uid}")
    assert shown.one("xray").attrs["src"] == f"{api['image_url']}?max_size=1024"
    results = api["results"]
    assert {result["output"] for result in results} == {"male", "female"}
    primary = next(result for result in results if result["is_primary"])
    heatmap = shown.one("heatmap")
    assert heatmap.attrs["src"] == f"{primary['heatmap_url']}?max_size=1024", "the primary result's overlay"
    assert "hidden" not in heatmap.attrs
    for result in results:
        output, values = result["output"], result["values"]
        assert shown.value(f"bone-age-{output}-months") == values["age_months"]
        assert shown.shown(f"bone-age-{output}-months") == f"{values['age_months']:.1f}"
        assert shown.value(f"bone-age-{output}-sigma") == values["sigma_months"]
        assert shown.shown(f"bone-age-{output}-sigma") == f"{values['sigma_months']:.1f}"
        assert shown.value(f"bone-age-{output}-years") == values["age_years"]
        assert bool(shown.all(f"bone-age-{output}-primary")) == result["is_primary"]
        radio = shown.one(f"overlay-{result['id']}")
        assert radio.attrs["data-src"] == f"{result['heatmap_url']}?max_size=1024"
        assert ("checked" in radio.attrs) == result["is_primary"]
        assert f"/instances/{uid}?result={result['id']}" in shown.links or f"?result={result['id']}" in shown.links
    values = primary["values"]
    assert values["chronological_age_months"] is not None, "the phantom has a birth date and a study date"
    assert shown.value("chronological-months") == values["chronological_age_months"]
    output = primary["output"]
    assert shown.value(f"difference-{output}") == values["difference_months"]
    assert shown.shown(f"difference-{output}") == f"{values['difference_months']:+.1f} months"
    if values["z_score"] is not None:
        assert shown.value(f"z-score-{output}") == values["z_score"]
        assert shown.shown(f"assessment-{output}") == values["assessment"]
    assert shown.all("demo-label") and DEMO_LABEL in shown.text, "demo models are labelled"
    assert [job.text for job in (shown.one("job-state-inference"), shown.one("job-state-outputs"))] == ["done"] * 2
    states = {delivery["id"]: delivery["state"] for item in api["written_objects"] for delivery in item["deliveries"]}
    assert len(states) == 5
    for delivery_id, state in states.items():
        assert shown.one(f"delivery-state-{delivery_id}").text == state
    assert states[received.failed_delivery] == "failed" and "pacs answered 0xA900" in shown.text
    assert "0xA900" in shown.text
    assert "<script" in shown.html and "/static/viewer.js" in shown.html


def test_the_image_page_shows_the_apis_probabilities(client: TestClient, received: Received) -> None:
    uid = received.foot.SOPInstanceUID
    [result] = api_instance(client, uid)["results"]
    shown = page(client, f"/instances/{uid}")
    values = result["values"]
    assert set(values["probabilities"]) == {"Normal", "Flatfoot", "Foot Ulcer", "Hallux Valgus"}
    for name, probability in values["probabilities"].items():
        testid = "probability-" + name.lower().replace(" ", "-")
        assert shown.value(testid) == probability
        assert shown.shown(testid) == f"{probability * 100:.1f}%"
        assert f"width: {probability * 100:.1f}%" in shown.html, "a bar as wide as the probability"
    assert shown.one("hv-prediction").text == values["prediction"]
    assert shown.value("hv-confidence") == values["confidence"]
    assert shown.one("heatmap").attrs["src"] == f"{result['heatmap_url']}?max_size=1024"
    assert DEMO_LABEL in shown.text


def test_without_javascript_a_query_parameter_picks_the_overlay(client: TestClient, received: Received) -> None:
    uid = received.hand.SOPInstanceUID
    results = api_instance(client, uid)["results"]
    other = next(result for result in results if not result["is_primary"])
    shown = page(client, f"/instances/{uid}?result={other['id']}")
    assert shown.one("heatmap").attrs["src"] == f"{other['heatmap_url']}?max_size=1024"
    assert "checked" in shown.one(f"overlay-{other['id']}").attrs
    hidden = page(client, f"/instances/{uid}?result=none")
    assert "hidden" in hidden.one("heatmap").attrs and "src" not in hidden.one("heatmap").attrs
    assert "checked" in hidden.one("overlay-none").attrs
    primary = next(result for result in results if result["is_primary"])
    for unknown in ("999999", "abc"):
        fallback = page(client, f"/instances/{uid}?result={unknown}")
        assert fallback.one("heatmap").attrs["src"] == f"{primary['heatmap_url']}?max_size=1024"


def test_a_report_the_node_wrote(client: TestClient, received: Received) -> None:
    api = api_instance(client, received.foot.SOPInstanceUID)
    report_uid = next(
        item["sop_instance_uid"] for item in api["written_objects"] if item["sop_class_uid"] == Comprehensive3DSRStorage
    )
    shown = page(client, f"/instances/{report_uid}")
    assert "This object has no image" in shown.text and not shown.all("xray")
    assert shown.one("source-link").attrs["href"] == f"/instances/{received.foot.SOPInstanceUID}"
    [delivery] = api_instance(client, report_uid)["deliveries"]
    assert shown.one(f"delivery-state-{delivery['id']}").text == delivery["state"]


@pytest.mark.parametrize(
    ("link", "href"),
    [
        ("http://mlflow.example.org/#/experiments/1/runs/abc", "http://mlflow.example.org/#/experiments/1/runs/abc"),
        ("javascript:alert(1)", "#"),  # only http(s) links
    ],
)
def test_the_mlflow_link_of_the_results_run(
    client: TestClient, received: Received, monkeypatch: pytest.MonkeyPatch, link: str, href: str
) -> None:
    """The tracker's real link is shown in tests/test_tracking.py; here, what the page makes of a link."""
    uid = received.foot.SOPInstanceUID
    assert "MLflow run" not in page(client, f"/instances/{uid}").text, "no link before the run is logged"
    original = viewer.get_instance
    monkeypatch.setattr(viewer, "get_instance", lambda *args: original(*args).model_copy(update={"mlflow_url": link}))
    assert page(client, f"/instances/{uid}").one("mlflow-link").attrs["href"] == href


@pytest.mark.parametrize(
    "path", ["/patients/nobody", f"/patients/{segment('AB/12')}", "/instances/1.2.3", "/instances/1.2.3?result=1"]
)
def test_unknown_ids_get_the_not_found_page(client: TestClient, path: str) -> None:
    shown = page(client, path, 404)
    assert shown.all("not-found") and "Back to the patient list" in shown.text


def test_the_static_files(client: TestClient) -> None:
    css = client.get("/static/viewer.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "http" not in css.text, "no fonts or styles from elsewhere"
    assert client.get("/static/viewer.js").status_code == 200


# --- signing in ---------------------------------------------------------------------------------------------


def test_with_users_the_viewer_asks_to_sign_in(received: Received) -> None:
    client = TestClient(app_for(received))
    uid = received.hand.SOPInstanceUID
    with accounts(received.node, UserRole.VIEWER):
        for path in ("/patients?search=doe", f"/patients/{segment(HAND_PATIENT)}", f"/instances/{uid}"):
            response = client.get(path, follow_redirects=False)
            assert response.status_code == 303, path
            location = urlsplit(response.headers["location"])
            assert location.path == "/login" and parse_qs(location.query)["next"] == [path]
        assert client.get(f"/api/instances/{uid}/image.png?max_size=64").status_code == 401
        form = client.get(f"/login?next=/instances/{uid}")
        assert form.status_code == 200 and 'type="password"' in form.text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        fields = {"username": "viewer", "password": PASSWORD, "next": f"/instances/{uid}", "csrf_token": csrf}
        response = client.post("/login", data=fields, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == f"/instances/{uid}"
        # the session opens the pages and the API's images they show
        assert client.get(f"/instances/{uid}").status_code == 200
        assert client.get(f"/api/instances/{uid}/image.png?max_size=64").status_code == 200
        result_id = api_instance(client, uid)["results"][0]["id"]
        assert client.get(f"/api/results/{result_id}/heatmap.png?max_size=64").status_code == 200


def test_without_users_sign_in_is_not_needed(client: TestClient) -> None:
    response = client.get("/login?next=/patients/x", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/patients/x"


# --- in a browser -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(received: Received) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port; yields its base URL."""
    port = free_port()
    with serving(app_for(received, port=port), port) as base:
        yield base


def _save_artifact(path: Path) -> Path:
    """``path``, copied to ``$TEST_ARTIFACTS/viewer/`` when that is set; the copy's path, else ``path``."""
    directory = os.environ.get("TEST_ARTIFACTS")
    if not directory:
        return path
    target = Path(directory) / "viewer"
    target.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(path, target / path.name))


_LOADED = "testid => { const image = document.querySelector(`[data-testid=${testid}]`); " + (
    "return image !== null && !image.hidden && image.complete && image.naturalWidth > 0; }"
)


@pytest.mark.slow
def test_in_a_browser(
    served: str,
    received: Received,
    tmp_path: Path,
    record_property: pytest.RecordProperty,
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM} (Debian's chromium package; scripts/install-system-packages.sh installs it)")
    errors: list[str] = []
    with accounts(received.node, UserRole.VIEWER), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(15_000)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("response", lambda response: response.status >= 400 and errors.append(response.url))

            # signing in first: the viewer sends the browser to its sign-in form
            page.goto(f"{served}/patients")
            assert urlsplit(page.url).path == "/login"
            page.fill("#username", "viewer")
            page.fill("#password", PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"{served}/patients")
            assert page.get_by_test_id("banner").inner_text() == BANNER

            # find the patient, open the image
            page.fill("#search", "doe")
            page.press("#search", "Enter")
            page.wait_for_url("**/patients?search=doe")
            assert page.get_by_test_id("patient-link").all_inner_texts() == [HAND_PATIENT]
            page.get_by_test_id("patient-link").click()
            page.wait_for_url(f"**/patients/{segment(HAND_PATIENT)}")
            page.locator("li.thumb:not(.written) [data-testid=instance-link]").click()
            uid = received.hand.SOPInstanceUID
            page.wait_for_url(f"**/instances/{uid}")

            # the overlay: loaded, and the size of the X-ray
            page.wait_for_function(_LOADED, arg="heatmap")
            page.wait_for_function(_LOADED, arg="xray")
            sizes = page.evaluate(
                "() => ['xray', 'heatmap'].map(t => document.querySelector(`[data-testid=${t}]`))"
                ".map(i => [i.naturalWidth, i.naturalHeight])"
            )
            assert sizes[0] == sizes[1] and sizes[0][0] > 0

            # the values shown are the API's (read with the browser's cookie)
            response = page.request.get(f"{served}/api/instances/{uid}")
            assert response.ok, response.text()
            results = response.json()["results"]
            for result in results:
                output, values = result["output"], result["values"]
                assert page.get_by_test_id(f"bone-age-{output}-months").inner_text() == f"{values['age_months']:.1f}"
                assert page.get_by_test_id(f"bone-age-{output}-sigma").inner_text() == f"{values['sigma_months']:.1f}"
                assert page.get_by_test_id(f"bone-age-{output}-primary").count() == int(result["is_primary"])
            assert page.get_by_test_id("demo-banner").is_visible()
            primary = next(result for result in results if result["is_primary"])
            other = next(result for result in results if not result["is_primary"])
            overlay = page.get_by_test_id("heatmap")
            assert overlay.get_attribute("src") == f"{primary['heatmap_url']}?max_size=1024"
            screenshot = tmp_path / "viewer-hand-primary.png"
            page.screenshot(path=str(screenshot), full_page=True)
            record_property("screenshot", str(_save_artifact(screenshot)))

            # switch the overlay to the other model's heatmap, in place
            page.get_by_test_id(f"overlay-{other['id']}").check()
            assert overlay.get_attribute("src") == f"{other['heatmap_url']}?max_size=1024"
            page.wait_for_function(_LOADED, arg="heatmap")
            assert parse_qs(urlsplit(page.url).query)["result"] == [str(other["id"])]
            page.get_by_test_id("opacity").fill("30")
            assert float(overlay.evaluate("image => image.style.opacity")) == pytest.approx(0.3)
            page.get_by_test_id("overlay-none").check()
            assert overlay.is_hidden()
            page.get_by_test_id(f"overlay-{other['id']}").check()
            page.wait_for_function(_LOADED, arg="heatmap")

            # the foot: the probabilities
            page.goto(f"{served}/patients?search=cd-56")
            page.get_by_test_id("patient-link").click()
            page.locator("li.thumb:not(.written) [data-testid=instance-link]").click()
            page.wait_for_url(f"**/instances/{received.foot.SOPInstanceUID}")
            page.wait_for_function(_LOADED, arg="heatmap")
            [result] = page.request.get(f"{served}/api/instances/{received.foot.SOPInstanceUID}").json()["results"]
            for name, probability in result["values"]["probabilities"].items():
                testid = "probability-" + name.lower().replace(" ", "-")
                assert page.get_by_test_id(testid).inner_text() == f"{probability * 100:.1f}%"
            screenshot = tmp_path / "viewer-foot.png"
            page.screenshot(path=str(screenshot), full_page=True)
            record_property("screenshot", str(_save_artifact(screenshot)))
        finally:
            browser.close()
    assert errors == [], "no script errors or failed loads in the page"
