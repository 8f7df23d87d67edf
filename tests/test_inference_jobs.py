"""The inference job in a running node: X-rays received over DICOM come out as recorded results with heatmaps,
equal to what the models compute on the same files; skips, reruns and undecodable images behave."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from dicom_node.config import InferenceSettings, Settings
from dicom_node.inference_jobs import InferenceModels
from dicom_node.models import InferenceResult, Instance, Job, JobState
from dicom_node.node import Node
from dicom_node.outputs.preview import preview_bytes, preview_path, source_stamp
from dicom_node.part10 import encoded_dataset
from dicom_node.phantoms import generate_phantoms, read_labels
from dicom_node.synthetic import synthetic_dx
from inference.pixels import DEFAULT_PICTURE_SIZE, radiograph_pixels
from inference.predict import heatmap_from_bytes, predict_bone_age, predict_hallux_valgus
from tests.conftest import stored_jobs
from tests.dicom_peers import dcmtk, free_port, send_datasets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models() -> InferenceModels:
    return InferenceModels.load(InferenceSettings())  # the committed demo cards


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, 4, seed=91, task="both")  # two hands, two feet
    return out


@pytest.fixture
def node(tmp_path: Path, models: InferenceModels):
    settings = Settings(
        dicom={"host": "127.0.0.1", "port": free_port()},
        storage={"root": tmp_path / "storage"},
        workers={"count": 1, "poll_interval": 0.05, "max_attempts": 2, "retry_backoff": 0.05},
        inference={"batch_size": 4},
        outputs={"secondary_captures": False, "structured_report": False},  # tests/test_results_to_pacs.py
    )
    node = Node(settings, models=models)
    node.start()
    yield node
    node.stop()


def finished_jobs(node: Node, count: int, timeout: float = 120) -> list[Job]:
    """The ``count`` inference jobs, once they are finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [job for job in stored_jobs(node) if job.kind == "inference"]
        if len(jobs) == count and all(job.state in (JobState.DONE, JobState.FAILED) for job in jobs):
            return jobs
        time.sleep(0.1)
    raise AssertionError(f"jobs not finished: {[(job.state, job.last_error) for job in stored_jobs(node)]}")


def results_by_file(node: Node) -> dict[str, list[InferenceResult]]:
    with node.sessions() as session:
        instances = session.scalars(select(Instance)).all()
        return {instance.sop_instance_uid: list(instance.results) for instance in instances}


def test_received_xrays_get_the_models_results_with_heatmaps(node: Node, models: InferenceModels, phantoms: Path):
    labels = read_labels(phantoms / "labels.csv")
    sent = dcmtk(
        "storescu",
        "-aec",
        "AINODE",
        "127.0.0.1",
        node.settings.dicom.port,
        *(phantoms / label.file for label in labels),
    )
    assert sent.returncode == 0, sent.stderr
    jobs = finished_jobs(node, len(labels))
    assert all(job.state == JobState.DONE for job in jobs)
    assert sorted(job.note for job in jobs) == sorted(
        ["ran bone_age (rule 1 matched BodyPartExamined)"] * 2  # a rule per task, in the order of the tasks
        + ["ran hallux_valgus (rule 2 matched BodyPartExamined)"] * 2
    )

    results = results_by_file(node)
    for label in labels:
        ds = pydicom.dcmread(phantoms / label.file)
        rows = {row.output: row for row in results[ds.SOPInstanceUID]}
        image = radiograph_pixels(ds, reduce_to=DEFAULT_PICTURE_SIZE)  # as the node prepares it
        shape = [(ds.Rows, ds.Columns)]
        assert len({row.heatmap_path for row in rows.values()}) == 1  # one heatmaps file per instance
        for row in rows.values():
            assert (row.model_name, row.demo_model) == (models.of(row.task).card.name, True)
            assert row.weights_digest == models.of(row.task).weights_digest
            assert {"prepare", f"{row.task}_model", "record"} <= set(row.timings_ms)
            stored = heatmap_from_bytes(node.store.absolute(row.heatmap_path).read_bytes(), row.heatmap_name)
            assert stored.letterbox.rows == ds.Rows and stored.letterbox.columns == ds.Columns
        if label.task == "foot":
            [expected] = predict_hallux_valgus(
                models.of("hallux_valgus"), models.of("hallux_valgus").inputs([image], shape), 0.3
            )
            assert set(rows) == {"foot"}
            values = rows["foot"].values
            assert values["prediction"] == expected.prediction and rows["foot"].is_primary
            assert values["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
            assert values["hallux_valgus_detected"] == expected.hallux_valgus_detected
            stored = heatmap_from_bytes(
                node.store.absolute(rows["foot"].heatmap_path).read_bytes(), "hallux_valgus-foot"
            )
            np.testing.assert_allclose(stored.values, expected.heatmap.values, atol=1e-3)
        else:
            [expected] = predict_bone_age(models.of("bone_age"), models.of("bone_age").inputs([image], shape))
            assert set(rows) == {"male", "female"}
            assert rows["male"].is_primary == (label.sex == "M") and rows["female"].is_primary == (label.sex == "F")
            for sex, word in (("M", "male"), ("F", "female")):
                values = rows[word].values
                assert values["age_months"] == pytest.approx(expected[sex].age_months, abs=1e-3)
                assert values["sigma_months"] == pytest.approx(expected[sex].sigma_months, abs=1e-3)
                assert values["chronological_age_months"] == pytest.approx(label.chronological_age_months, abs=0.6)
                if sex != label.sex:  # the other sex's reading is not compared with the patient's reference
                    assert "z_score" not in values
                    continue
                assert values["difference_months"] == pytest.approx(
                    values["age_months"] - values["chronological_age_months"]
                )
                assert values["reference"].startswith("Greulich & Pyle")
                assert values["assessment"] in ("advanced", "delayed", "within range", None)


def test_derived_images_are_skipped_with_a_reason_and_a_rerun_replaces_results(node: Node) -> None:
    hand = synthetic_dx("SKIP-1", side=256, seed=1, body_part="HAND")
    derived = synthetic_dx("SKIP-1", side=256, seed=2, body_part="HAND", study_uid=hand.StudyInstanceUID)
    derived.ImageType = ["DERIVED", "SECONDARY"]
    send_datasets(node.settings.dicom.port, [hand, derived])
    jobs = {job.instance_pk: job for job in finished_jobs(node, 2)}
    results = results_by_file(node)
    assert len(results[hand.SOPInstanceUID]) == 2 and results[derived.SOPInstanceUID] == []
    notes = sorted(job.note for job in jobs.values())
    assert notes[1].startswith("skipped: derived image (ImageType DERIVED\\SECONDARY")

    first_written = max(row.created_at for row in results[hand.SOPInstanceUID])
    with node.sessions.begin() as session:  # queue the hand's job again, as a replace would
        session.execute(update(Job).values(state=JobState.PENDING, attempts=0))
    time.sleep(0.2)
    finished_jobs(node, 2)
    again = results_by_file(node)[hand.SOPInstanceUID]
    assert len(again) == 2 and min(row.created_at for row in again) > first_written, "replaced, not added"


def test_an_undecodable_image_fails_its_own_job_and_the_batch_goes_on(node: Node) -> None:
    good = synthetic_dx("BAD-1", side=256, seed=3, body_part="FOOT")
    bad = synthetic_dx("BAD-1", side=256, seed=4, body_part="FOOT", study_uid=good.StudyInstanceUID)
    bad.PhotometricInterpretation = "PALETTE COLOR"  # and no palette: nothing can show it
    send_datasets(node.settings.dicom.port, [bad, good])
    jobs = finished_jobs(node, 2)
    with node.sessions() as session:
        bad_pk = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == bad.SOPInstanceUID))
    states = {job.instance_pk: job for job in jobs}
    assert states[bad_pk].state == JobState.FAILED and states[bad_pk].attempts == 1, "no retry can read it"
    assert states[bad_pk].last_error.startswith("UnsupportedImage: cannot read PALETTE COLOR")
    assert [job.state for pk, job in states.items() if pk != bad_pk] == [JobState.DONE]
    assert len(results_by_file(node)[good.SOPInstanceUID]) == 1


@pytest.mark.parametrize(("others", "results"), [("FOOT", 1), ("HAND", 2)])  # in a foot batch, or alone in it
def test_a_model_failure_on_one_image_fails_that_job_only(
    node: Node, monkeypatch: pytest.MonkeyPatch, others: str, results: int
) -> None:
    handler = node.workers.handlers["inference"]
    predict = handler._predict

    def fragile(task, images, headers):  # the model cannot take one odd image; in a batch, the whole batch raises
        if any((box.rows, box.columns) == (256, 250) for box in images.letterboxes):
            raise RuntimeError("the runtime refused an input")
        return predict(task, images, headers)

    monkeypatch.setattr(handler, "_predict", fragile)
    datasets = [synthetic_dx("FRAGILE", side=256, seed=n, body_part=others) for n in range(3)]
    datasets[1].BodyPartExamined = "FOOT"
    for ds in datasets[1:]:
        ds.StudyInstanceUID = datasets[0].StudyInstanceUID
        ds.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    odd = datasets[1]
    odd.Columns = 250
    odd.PixelData = odd.pixel_array[:, :250].tobytes()
    send_datasets(node.settings.dicom.port, datasets)
    jobs = finished_jobs(node, 3)
    recorded = results_by_file(node)
    assert [len(recorded[ds.SOPInstanceUID]) for ds in datasets] == [results, 0, results]
    failed = [job for job in jobs if job.state == JobState.FAILED]
    assert len(failed) == 1 and failed[0].last_error == "RuntimeError: the runtime refused an input"


def test_a_record_the_index_refuses_fails_that_job_only_and_the_batch_is_recorded(
    tmp_path: Path, models: InferenceModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(storage={"root": tmp_path / "storage"}, workers={"count": 0})
    node = Node(settings, models=models)
    datasets = [synthetic_dx("REFUSED", side=256, seed=n, body_part="FOOT") for n in range(3)]
    for number, ds in enumerate(datasets):
        ds.StudyInstanceUID = datasets[0].StudyInstanceUID
        ds.save_as(path := tmp_path / f"{number}.dcm", enforce_file_format=True)
        node.ingestor.ingest(pydicom.filereader.read_file_meta_info(path), [encoded_dataset(path)])
    with node.sessions() as session:
        refused_pk = session.scalar(select(Instance.id).where(Instance.sop_instance_uid == datasets[1].SOPInstanceUID))
    handler = node.workers.handlers["inference"]
    record_in = handler._record_in

    def refusing(session, work):  # the index refuses one instance's rows: the batch's transaction fails
        record_in(session, work)
        if work.job.instance_pk == refused_pk:
            raise RuntimeError("the index refused a row")

    monkeypatch.setattr(handler, "_record_in", refusing)
    jobs = node.queue.claim_batch(["inference"], 3)
    assert len(jobs) == 3, "all three in one batch, recorded in one transaction"
    failures = handler(jobs)
    assert {job_id: str(error) for job_id, error in failures.items()} == {
        job.id: "the index refused a row" for job in jobs if job.instance_pk == refused_pk
    }
    recorded = results_by_file(node)
    assert [len(recorded[ds.SOPInstanceUID]) for ds in datasets] == [1, 0, 1]
    states = {job.instance_pk: job.state for job in stored_jobs(node) if job.kind == "inference"}
    assert states[refused_pk] == JobState.RUNNING, "the worker records the failure"
    assert [state for pk, state in states.items() if pk != refused_pk] == [JobState.DONE, JobState.DONE]
    node.engine.dispose()


def test_an_index_that_cannot_be_reached_fails_the_batch_at_once(
    tmp_path: Path, models: InferenceModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(storage={"root": tmp_path / "storage"}, workers={"count": 0})
    node = Node(settings, models=models)
    for number in range(2):
        ds = synthetic_dx("LOCKED", side=256, seed=number, body_part="FOOT")
        ds.save_as(path := tmp_path / f"{number}.dcm", enforce_file_format=True)
        node.ingestor.ingest(pydicom.filereader.read_file_meta_info(path), [encoded_dataset(path)])
    handler = node.workers.handlers["inference"]
    attempts = []

    def locked(session, work):  # each transaction alone would wait busy_timeout again
        attempts.append(work.job.id)
        raise OperationalError("UPDATE jobs ...", {}, Exception("database is locked"))

    monkeypatch.setattr(handler, "_record_in", locked)
    jobs = node.queue.claim_batch(["inference"], 2)
    failures = handler(jobs)
    assert set(failures) == {job.id for job in jobs}
    assert all(isinstance(error, OperationalError) for error in failures.values())
    assert len(attempts) == 1, "no transaction per instance after the batch's"
    node.engine.dispose()


def test_outputs_are_drawn_on_the_kept_preview_as_on_the_decoded_image_and_the_preview_goes(
    tmp_path: Path, models: InferenceModels, phantoms: Path
) -> None:
    """The inference job keeps the radiograph at the Secondary Captures' scale; the outputs job draws on it, then
    deletes it. Without it (results from before, a failed write), or with one read from a file since replaced,
    the outputs job decodes the source: the same pixels."""
    settings = Settings(dicom={"host": "127.0.0.1", "port": free_port()}, storage={"root": tmp_path / "storage"})
    settings.workers.count = 0  # the test runs each job
    node = Node(settings, models=models)
    foot = next(label for label in read_labels(phantoms / "labels.csv") if label.task == "foot")
    path = phantoms / foot.file
    node.ingestor.ingest(pydicom.filereader.read_file_meta_info(path), [encoded_dataset(path)])

    def run(kind: str) -> None:
        with node.sessions() as session:
            job_id = session.scalars(select(Job.id).where(Job.kind == kind).order_by(Job.id.desc())).first()
        assert node.workers.run_now(job_id)

    def secondary_capture() -> np.ndarray:
        with node.sessions() as session:
            [sc] = session.scalars(select(Instance).where(Instance.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"))
            return pydicom.dcmread(node.store.absolute(sc.path)).pixel_array

    def outputs_again(preview_content: bytes | None) -> np.ndarray:
        if preview_content is not None:
            preview.write_bytes(preview_content)
        with node.sessions.begin() as session:
            session.execute(update(Job).where(Job.kind == "outputs").values(state=JobState.PENDING))
        run("outputs")
        return secondary_capture()

    run("inference")
    with node.sessions() as session:
        preview = node.store.absolute(preview_path(session.scalars(select(InferenceResult.heatmap_path)).first()))
        source = node.store.absolute(session.scalars(select(Instance.path)).first())
    with np.load(preview) as kept:
        pixels = kept["pixels"]
    assert pixels.dtype == np.uint8 and max(pixels.shape) == settings.outputs.max_image_size
    run("outputs")
    assert not preview.exists(), "drawn, then deleted"
    from_preview = secondary_capture()
    np.testing.assert_array_equal(outputs_again(None), from_preview)  # none kept: the source decoded

    inode, size, modified = source_stamp(source)
    black = np.zeros_like(pixels)
    assert not np.array_equal(outputs_again(preview_bytes(black, (inode, size, modified))), from_preview)
    stale = preview_bytes(black, (inode, size, modified - 1))  # read from the file this one replaced
    np.testing.assert_array_equal(outputs_again(stale), from_preview)
    node.engine.dispose()
