"""The AI task interface: the core names no task, and a task installed from a package of its own runs through
the whole node (inference, Secondary Capture, report, API, viewer, MLflow) with no change to the core."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.filereader import read_file_meta_info
from sqlalchemy import select, update

from dicom_node.ai_tasks.registry import default_tasks, installed_tasks, node_tasks
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.jobs import PermanentJobError
from dicom_node.models import InferenceResult, Instance, Job, JobState
from dicom_node.node import Node
from dicom_node.part10 import encoded_dataset
from dicom_node.synthetic import synthetic_dx
from tests.serve_process import DICOM_NODE, REPO, ServeProcess, with_onnx_graphs
from tests.test_output_uids import _node

EXAMPLE_PACKAGE = Path(__file__).parent / "example_task"
CORE = [REPO / "dicom_node", REPO / "web"]
# Where a task's name may appear besides its own module and template: the demo models' tooling (synthetic
# phantoms, training and evaluation of those two models; not part of the running node) and the frozen history
# of the index's schema.
NOT_CORE = ["dicom_node/ai_tasks/templates/", "dicom_node/phantoms/", "dicom_node/demo_models.py"]
NOT_CORE += ["dicom_node/migrations/versions/"]


def _spellings(name: str) -> list[str]:
    """``hallux_valgus`` as code, words and file names write it: hallux_valgus, hallux valgus, hallux-valgus."""
    return list(dict.fromkeys([name, name.replace("_", " "), name.replace("_", "-")]))  # "anatomy" is spelt once


def names_of_tasks_in(sources: list[Path]) -> list[str]:
    """Each place in ``sources`` where one of the node's tasks is named, as "path:line: spelling"."""
    found = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for name in node_tasks():
            for spelling in _spellings(name):
                for match in re.finditer(re.escape(spelling), text, re.IGNORECASE):
                    found.append(f"{path}:{text.count(chr(10), 0, match.start()) + 1}: {spelling}")
    return found


def test_no_module_of_the_core_names_a_task() -> None:
    own = {Path(sys.modules[task.__module__].__file__).resolve() for task in installed_tasks().values()}
    sources = [
        path
        for root in CORE
        for path in root.rglob("*")
        if path.suffix in (".py", ".html", ".js", ".css")
        and path.resolve() not in own
        and not any(str(path.relative_to(REPO)).startswith(prefix) for prefix in NOT_CORE)
    ]
    assert len(sources) > 40, "the scan finds the core's modules"
    found = names_of_tasks_in(sources)
    assert found == [], "the core names a task:\n" + "\n".join(found)


def test_the_scan_finds_a_task_named_in_any_spelling(tmp_path: Path) -> None:
    for name in node_tasks():
        for spelling in _spellings(name):
            module = tmp_path / "module.py"
            module.write_text(f"def shown(result):\n    return result.task == {spelling.upper()!r}\n")
            assert names_of_tasks_in([module]) == [f"{module}:2: {spelling}"]


# --- a task installed from a package ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/example_task built and installed by pip into a directory of its own, as a site installs a task."""
    site = tmp_path_factory.mktemp("site-packages")
    source = tmp_path_factory.mktemp("source") / "example_task"  # pip builds in the source tree: not in the repo
    shutil.copytree(EXAMPLE_PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", site, source],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [entry_points] = site.glob("dicom_node_example_task-*.dist-info/entry_points.txt")
    assert "example = example_task:ExampleTask" in entry_points.read_text()
    return site


def example_card(directory: Path) -> Path:
    """A card of the example task on the demo foot model's weights (their first output is the example's)."""
    foot = REPO / "models" / "hallux-valgus-demo.yaml"
    text = foot.read_text()
    text = re.sub(r"(?m)^task: .*$", "task: example", text)
    text = re.sub(r"(?m)^name: .*$", "name: example-demo", text)
    text = re.sub(r"(?m)^(\s*path: )(.*)$", lambda m: f"{m[1]}{REPO / 'models' / m[2].strip()}", text, count=1)
    card = directory / "example.yaml"
    card.write_text(text)
    return card


def picture() -> bytes:
    rows, columns = np.mgrid[0:300, 0:240]
    gray = ((rows * 0.5 + columns * 0.3) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for_api(client: httpx.Client, url: str, ready, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(url).json()
        if ready(body):
            return body
        time.sleep(0.3)
    raise TimeoutError(f"{url}: not ready: {body}")


@pytest.mark.slow
def test_a_task_installed_from_its_own_package_runs_through_the_whole_node(
    example_site: Path, tmp_path: Path, onnx_graphs: Path
) -> None:
    rules = [
        {"pattern": r"\bTOE\b", "tasks": ["example"]},
        *({"pattern": installed_tasks()[name].routing_pattern, "tasks": [name]} for name in default_tasks()),
    ]
    node = ServeProcess(
        with_onnx_graphs(tmp_path / "storage", onnx_graphs),
        environment={
            "PYTHONPATH": str(example_site),
            "DICOM_NODE_INFERENCE__TASKS__EXAMPLE__CARD": str(example_card(tmp_path)),
            "DICOM_NODE_INFERENCE__TASKS__EXAMPLE__SCALE": "0.5",
            "DICOM_NODE_INFERENCE__RULES": json.dumps(rules),
            "DICOM_NODE_INFERENCE__UNDECIDED_TASKS": "[]",
        },
    )
    try:
        node.wait_until_ready(timeout=120)
        with httpx.Client(base_url=f"http://127.0.0.1:{node.web_port}", timeout=60) as client:
            response = client.post("/predict", files={"image": ("toe.png", picture())}, data={"task": "example"})
            assert response.status_code == 200, response.text
            body = response.json()
            # the API: the task's own field beside those of every prediction, the node's tasks' fields null
            assert body["tasks"] == ["example"] and 0 < body["example_score"] < 1
            assert body["models"]["example"]["name"] == "example-demo"
            assert body["prediction"] is None and body["male_prediction"] is None
            assert (
                "example_score"
                in client.get("/openapi.json").json()["components"]["schemas"]["PredictionOut"]["properties"]
            )

            detail = wait_for_api(
                client,
                body["instance_url"],
                lambda detail: (
                    detail["mlflow_url"] is not None
                    and {job["kind"]: job["state"] for job in detail["jobs"]}.get("outputs") == "done"
                ),
            )
            [result] = detail["results"]
            assert (result["task"], result["output"], result["summary"]) == (
                "example",
                "main",
                f"example score {body['example_score']:.2f}",
            )

            # the seeds' listing: the MLflow run's id, a string as the seeds gave it, once logged
            [listed] = client.get(f"/results/{body['patient_id']}").json()["predictions"]
            assert isinstance(listed["mlflow_run_id"], str) and detail["mlflow_url"].endswith(listed["mlflow_run_id"])

            # the viewer: the task's own template
            page = client.get(f"/instances/{body['sop_instance_uid']}").text
            assert f'data-testid="example-score" data-value="{result["values"]["score"]}"' in page
            assert "Example score" in page
    finally:
        node.stop()

    # the DICOM outputs: its Secondary Capture in its series, its measurement in the report
    written = [pydicom.dcmread(path) for path in (tmp_path / "storage" / "patients").rglob("*.dcm")]
    [capture] = [ds for ds in written if ds.get("SeriesNumber") == 9050]
    assert capture.SeriesDescription == "AI example heatmap"
    [report] = [ds for ds in written if ds.get("Modality") == "SR"]
    scores = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for group in report.ContentSequence
        for item in _items(group)
        if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "122157"
    ]
    assert scores == [pytest.approx(body["example_score"], abs=1e-6)]

    # MLflow: the run of the image, with the task's values as metrics
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'storage' / 'mlflow' / 'mlflow.db'}")
    [run] = mlflow.search_runs(experiment_names=["inference"], output_format="list")
    assert run.data.params["tasks"] == "example" and run.info.run_id == listed["mlflow_run_id"]
    assert run.data.metrics["example.main.score"] == pytest.approx(body["example_score"])


def _items(item: pydicom.Dataset):
    yield item
    for child in item.get("ContentSequence", []):
        yield from _items(child)


def test_a_task_that_cannot_be_loaded_stops_only_a_node_configured_to_run_it(tmp_path: Path) -> None:
    """An entry point whose module is missing: the node's own tasks are still there, and a node that lists it
    stops with one line naming it."""
    info = tmp_path / "site" / "broken_task-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-task\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[dicom_node.tasks]\nbroken = broken_task_module:BrokenTask\n")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    listed = subprocess.run(
        [sys.executable, "-c", "from dicom_node.ai_tasks.registry import installed_tasks; print(*installed_tasks())"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert listed.stdout.split() == list(node_tasks())
    assert "broken_task_module:BrokenTask: cannot load: ModuleNotFoundError" in listed.stderr
    configured = subprocess.run(
        [DICOM_NODE, "db", "current", "--config", REPO / "config.yaml"],
        capture_output=True,
        text=True,
        env=environment | {"DICOM_NODE_INFERENCE__TASKS__BROKEN__CARD": "x.yaml"},
        timeout=120,
        cwd=tmp_path,
    )
    assert configured.returncode == 2
    [line] = configured.stderr.strip().splitlines()[-1:]
    assert "broken_task_module:BrokenTask: cannot load" in line and "Traceback" not in configured.stderr


# --- what a task answers, and results of a task no longer installed -----------------------------------------


@pytest.fixture
def node(tmp_path: Path, onnx_graphs: Path) -> Iterator[Node]:
    node = _node(tmp_path, onnx_graphs)
    source = tmp_path / "source.dcm"
    synthetic_dx("TASKS-1", side=128, seed=5, body_part="CHEST").save_as(source, enforce_file_format=True)  # every task
    node.ingestor.ingest(read_file_meta_info(source), [encoded_dataset(source)], "MODALITY")
    yield node
    node.engine.dispose()


def test_an_output_a_task_does_not_declare_fails_the_job_at_once(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    handler = node.workers.handlers[INFERENCE_JOB]
    task = handler.tasks["hallux_valgus"]
    predict = task.predict
    monkeypatch.setattr(
        task,
        "predict",
        lambda *arguments: [[replace(output, output="bogus") for output in outputs] for outputs in predict(*arguments)],
    )
    [failure] = handler(node.queue.claim_batch([INFERENCE_JOB], 8)).values()
    assert isinstance(failure, PermanentJobError) and "answered output 'bogus'" in str(failure)


def test_the_results_of_a_task_no_longer_installed_are_left_out_of_the_outputs(node: Node) -> None:
    assert node.workers.handlers[INFERENCE_JOB](node.queue.claim_batch([INFERENCE_JOB], 8)) == {}
    with node.sessions.begin() as session:
        session.execute(update(InferenceResult).where(InferenceResult.task == "bone_age").values(task="retired"))
    while node.workers.run_once():
        pass
    with node.sessions() as session:
        [job] = session.scalars(select(Job).where(Job.kind == "outputs")).all()
        written = session.scalars(select(Instance.path).where(Instance.source_instance_pk.is_not(None))).all()
    assert job.state == JobState.DONE and job.note.endswith("the results of retired left out: not installed")
    series = {pydicom.dcmread(node.store.absolute(path)).SeriesNumber for path in written}
    assert series == {9001, 9101, 9010}, "the foot's Secondary Capture, map and the report"
