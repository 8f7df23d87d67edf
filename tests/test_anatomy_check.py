"""The anatomy check in a running node, on held-out phantoms (a seed no training or evaluation set uses): with their
tags removed, hands get only the bone age, feet only the foot model and other body parts nothing; a foot whose tags
say hand gets the foot model, and the disagreement shows in the job's note, the report and the viewer; an image the
check sends to a task whose model is missing waits, and the others go on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import highdicom
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.inference_jobs import InferenceModels
from dicom_node.models import Instance, JobState
from dicom_node.node import Node
from dicom_node.phantoms import generate_phantoms, read_labels
from tests.conftest import stored_jobs
from tests.dicom_peers import free_port, send_datasets
from tests.validators import dciodvfy_errors, sr_validator_errors
from web.app import create_app
from web.dependencies import WebContext

pytestmark = pytest.mark.slow

TAGS = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")
OWN_TASKS = {"hand": {"anatomy", "bone_age"}, "foot": {"anatomy", "hallux_valgus"}, "other": set()}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("held-out")
    generate_phantoms(out, 9, seed=2100, task="all")  # hand, foot, other in turn
    return out


def gated_settings(root: Path, **inference: object) -> Settings:
    """A node with the anatomy check, as the shipped config.yaml runs it."""
    return Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": root / "storage"},
        workers={"count": 1, "poll_interval": 0.05, "max_attempts": 1},
        inference={"batch_size": 4, "tasks": {"anatomy": {}, "bone_age": {}, "hallux_valgus": {}}} | inference,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> InferenceModels:
    return InferenceModels.load(gated_settings(tmp_path_factory.mktemp("models")).inference)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, models: InferenceModels) -> Iterator[Node]:
    node = Node(gated_settings(tmp_path_factory.mktemp("node")), models=models)
    node.start()
    yield node
    node.stop()


def untagged(path: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    for keyword in TAGS:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def processed(node: Node, sop_uids: list[str], timeout: float = 180) -> dict[str, Instance]:
    """The instances of ``sop_uids`` with their results, once their inference jobs and any outputs are done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = stored_jobs(node)
        if len(jobs) >= len(sop_uids) and all(job.state in (JobState.DONE, JobState.FAILED) for job in jobs):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"jobs not finished: {[(job.kind, job.state) for job in stored_jobs(node)]}")
    return instances_of(node, sop_uids)


def instances_of(node: Node, sop_uids: list[str]) -> dict[str, Instance]:
    """The instances of ``sop_uids``, with their results and jobs loaded."""
    with node.sessions() as session:
        instances = session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sop_uids))).all()
        for instance in instances:
            _ = instance.results, instance.jobs
        return {instance.sop_instance_uid: instance for instance in instances}


def test_untagged_images_get_only_their_own_tasks_results(node: Node, held_out: Path) -> None:
    labels = read_labels(held_out / "labels.csv")
    datasets = [untagged(held_out / label.file) for label in labels]
    assert all(status.Status == 0 for status in send_datasets(node.settings.dicom.port, datasets))
    instances = processed(node, [ds.SOPInstanceUID for ds in datasets])
    for label, ds in zip(labels, datasets, strict=True):
        instance = instances[ds.SOPInstanceUID]
        [job] = [job for job in instance.jobs if job.kind == "inference"]
        assert {result.task for result in instance.results} == OWN_TASKS[label.task], (label.file, job.note)
        assert job.note.startswith("no rule matched; the image shows no body part" if label.task == "other" else "ran")
        if label.task != "other":
            [check] = [result for result in instance.results if result.task == "anatomy"]
            assert check.values["seen"] == label.task and check.values["tagged_tasks"] is None


def test_a_foot_tagged_as_a_hand_gets_the_foot_model_and_the_disagreement_is_shown(
    node: Node, held_out: Path, tmp_path: Path
) -> None:
    [foot] = [label for label in read_labels(held_out / "labels.csv") if label.task == "foot"][:1]
    ds = pydicom.dcmread(held_out / foot.file)
    ds.BodyPartExamined = "HAND"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    assert send_datasets(node.settings.dicom.port, [ds])[0].Status == 0
    instance = processed(node, [ds.SOPInstanceUID])[ds.SOPInstanceUID]
    [job] = [job for job in instance.jobs if job.kind == "inference"]
    assert job.note.startswith("ran hallux_valgus (rule 1 matched BodyPartExamined, but the image shows a foot (")
    assert job.note.endswith("): followed the image)")
    check = {result.task: result for result in instance.results}["anatomy"]
    assert check.values | {"confidence": None, "probabilities": None, "heatmap_peak_xy": None} == {
        "seen": "foot",
        "body_part": "FOOT",
        "confidence": None,
        "probabilities": None,
        "heatmap_peak_xy": None,
        "tagged_tasks": ["bone_age"],
        "tasks_run": ["hallux_valgus"],
        "disagreement": True,
        "followed": "image",
    }

    with node.sessions() as session:
        written = session.scalars(select(Instance).where(Instance.source_instance_pk == instance.id)).all()
        paths = {row.sop_class_uid: node.store.absolute(row.path) for row in written}
    captures = [row for row in written if row.sop_class_uid == pydicom.uid.SecondaryCaptureImageStorage]
    assert len(captures) == 1, "the foot's picture; the check makes none of its own"
    report_path = paths[pydicom.uid.Comprehensive3DSRStorage]
    assert dciodvfy_errors(report_path) == [] and sr_validator_errors(report_path) == []
    groups = highdicom.sr.srread(report_path).content.get_image_measurement_groups()
    evaluations = {item.name.meaning: item.value.meaning for item in groups[0].get_qualitative_evaluations()}
    assert evaluations["Agrees with the body part of the DICOM attributes"] == "No"

    viewer = TestClient(create_app(WebContext(node.settings, node.sessions, lambda: True)))
    page = viewer.get(f"/instances/{ds.SOPInstanceUID}")
    assert page.status_code == 200
    assert 'data-testid="anatomy-disagreement"' in page.text and "followed the image" in page.text
    listed = viewer.get(f"/results/{ds.PatientID}")
    assert listed.status_code == 200, listed.text
    [prediction] = [item for item in listed.json()["predictions"] if item["sop_instance_uid"] == ds.SOPInstanceUID]
    assert prediction["tasks"] == ["anatomy", "hallux_valgus"] and prediction["male_prediction"] is None
    assert {key: prediction["anatomy"][key] for key in ("shows", "tags_disagree", "followed", "tasks_run")} == {
        "shows": "foot",
        "tags_disagree": True,
        "followed": "image",
        "tasks_run": ["hallux_valgus"],
    }


def test_an_image_the_check_routes_to_a_missing_model_waits_and_the_others_go_on(
    tmp_path: Path, held_out: Path, models: InferenceModels
) -> None:
    without_bone_age = InferenceModels(
        {task: model for task, model in models.models.items() if task != "bone_age"}, {"bone_age": "card missing"}
    )
    node = Node(gated_settings(tmp_path, on_missing_model="degraded"), models=without_bone_age)
    node.start()
    try:
        labels = [label for label in read_labels(held_out / "labels.csv") if label.task in ("hand", "foot")][:2]
        datasets = [untagged(held_out / label.file) for label in labels]
        assert all(status.Status == 0 for status in send_datasets(node.settings.dicom.port, datasets))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = {job.instance_pk: job.state for job in stored_jobs(node) if job.kind == "inference"}
            if sorted(states.values()) == sorted([JobState.DONE, JobState.WAITING]):
                break
            time.sleep(0.2)
        instances = instances_of(node, [ds.SOPInstanceUID for ds in datasets])
        hand, foot = (instances[ds.SOPInstanceUID] for ds in datasets)
        [hand_job] = hand.jobs
        assert hand_job.state == JobState.WAITING and "waiting for the bone_age model" in hand_job.note
        assert not hand.results, "nothing recorded until the model is back"
        assert {result.task for result in foot.results} == {"anatomy", "hallux_valgus"}
    finally:
        node.stop()
