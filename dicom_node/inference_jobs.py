"""The inference job: from a stored instance to recorded results with heatmaps.

For a batch of claimed jobs, each stored file is read and routed (:mod:`dicom_node.routing`) and its pixels
decoded (:mod:`inference.pixels`: halved first where it is at least twice ``outputs.max_image_size``); where a gate
is configured, its model runs on every image first and the route follows what it sees; each model then runs once
on all the images routed to it. Per instance, one file of heatmaps is written under ``results/``
beside the layout of ``patients/``, and, where Secondary Captures are made, the radiograph at their scale
(:mod:`dicom_node.outputs.preview`, which the outputs job draws them on, then deletes); then, for each instance, the
batch's transaction replaces its results, queues its outputs job (:mod:`dicom_node.output_jobs`) and marks its
job done with what it did: a process killed before the commit leaves the jobs to run again, which leaves the
same state as one run once; killed after it, they are not run again (new result ids would give new outputs).
An instance that cannot be read, decoded or recorded fails its own job only; an index that cannot be reached
fails the batch, to be retried.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import pydicom
from PIL import Image
from prometheus_client import Histogram
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.ai_tasks.interface import GateTask, GateValues, TaskOutput
from dicom_node.config import InferenceSettings, TaskName
from dicom_node.jobs import OUTPUTS_JOB, ClaimedJob, JobMustWait, PermanentJobError, enqueue, finish, still_claimed
from dicom_node.models import SUMMARY_LENGTH, InferenceResult, Instance, heatmap_name
from dicom_node.outputs.preview import preview, preview_bytes, preview_path, source_stamp
from dicom_node.routing import Route, follow_the_image, route
from dicom_node.storage import InstanceStore
from dicom_node.task_engine import OUTPUTS_QUEUE
from inference.model_card import ModelLoadError, ModelMissingError, read_card
from inference.networks import load_network
from inference.pixels import (
    DEFAULT_PICTURE_SIZE,
    DEFERRED_PIXEL_DATA,
    UnsupportedImage,
    dimensions,
    radiograph_pixels,
)
from inference.predict import Heatmap, Model, ModelInputs, heatmaps_to_bytes
from inference.preprocess import as_picture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceModels:
    """The models of the configured tasks (``inference.tasks``), loaded once and shared by every worker. A model whose
    card or weights file was missing at start (``inference.on_missing_model: degraded``) is absent from ``models``,
    and ``missing`` says why."""

    models: Mapping[TaskName, Model]
    missing: Mapping[TaskName, str] = field(default_factory=dict)

    @classmethod
    def load(
        cls, settings: InferenceSettings, cache_dir: Path | None = None, tasks: Collection[TaskName] | None = None
    ) -> InferenceModels:
        """Load the cards of ``tasks`` (a worker loads those of its queues only; default: every configured task);
        raises :class:`inference.model_card.ModelLoadError` naming the card and problem, but for a missing card or
        weights file under ``on_missing_model: degraded``. ``cache_dir`` keeps the graphs the onnxruntime runtime
        exports."""
        networks = {}
        missing: dict[TaskName, str] = {}
        for task, task_settings in settings.tasks.items():  # every card checked before any graph is exported
            if tasks is not None and task not in tasks:
                continue
            try:
                card = read_card(task_settings.card)
                if card.task != task:
                    raise ModelLoadError(f"{task_settings.card}: a card of the task {card.task!r}, not of {task!r}")
                networks[task] = (card, load_network(card, task_settings.card), task_settings.card)
            except ModelMissingError as error:
                if settings.on_missing_model == "refuse":
                    raise
                missing[task] = str(error)
        models = {
            task: Model.of_network(card, network, path, settings.runtime, cache_dir, settings.threads)
            for task, (card, network, path) in networks.items()
        }
        return cls(models, missing)

    def loaded(self) -> dict[TaskName, Model]:
        """The models that were loaded, by task."""
        return dict(self.models)

    def of(self, task: TaskName) -> Model:
        """The model of ``task``; raises :class:`JobMustWait` when it was missing at start."""
        model = self.models.get(task)
        if model is None:
            reason = self.missing.get(task, "not among the models this worker serves")
            raise JobMustWait(f"waiting for the {task} model: {reason}")
        return model


@dataclass
class _Work:
    """One claimed job on its way through the batch."""

    job: ClaimedJob
    instance_path: PurePosixPath
    header: Dataset
    route: Route
    started: float  # time.perf_counter() when its preparation began
    picture: Image.Image | None = None  # the decoded image, reduced (inference.preprocess.as_picture), until its inputs
    shape: tuple[int, int] = (0, 0)  # (rows, columns) of the full-size image
    inputs: dict[TaskName, ModelInputs] = field(default_factory=dict)  # of the routed tasks' models (and the gate's)
    timings_ms: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # the columns of its InferenceResult rows
    heatmaps: dict[str, Heatmap] = field(default_factory=dict)  # by InferenceResult.heatmap_name
    preview: bytes | None = None  # the radiograph as the Secondary Captures show it (dicom_node.outputs.preview)

    @property
    def heatmap_path(self) -> PurePosixPath:
        """``patients/<key>/<study>/<series>/<sop>.dcm`` -> ``results/<key>/<study>/<series>/<sop>-<generation>.npz``:
        with the generation in the name, a stale run (the instance was replaced meanwhile) never overwrites the
        new one's file."""
        path = self.instance_path
        return PurePosixPath("results", *path.parts[1:-1], f"{path.stem}-{self.job.generation}.npz")


class InferenceJobs:
    """The job handler of ``inference`` jobs (see :mod:`dicom_node.workers`)."""

    def __init__(
        self,
        settings: InferenceSettings,
        models: InferenceModels,
        store: InstanceStore,
        sessions: sessionmaker[Session],
        latency: Histogram | None = None,
        max_image_pixels: int | None = None,
        picture_size: int = DEFAULT_PICTURE_SIZE,
        keep_preview: bool = False,
    ) -> None:
        """``latency`` observes each image's seconds from reading to recorded results, by task; an image of more
        than ``max_image_pixels`` (``dicom.max_image_pixels``) fails its job without being decoded. The radiograph is
        reduced to no less than ``picture_size`` pixels (``outputs.max_image_size``) before its grayscale pipeline
        and the models' letterboxes; with ``keep_preview`` (Secondary Captures are made), it is kept beside the
        heatmaps at that size, for the outputs job to draw on."""
        self.settings = settings
        self.tasks = settings.configured_tasks()
        self.gate = settings.gate
        self.max_image_pixels = max_image_pixels
        self.picture_size = picture_size
        self.keep_preview = keep_preview
        self.models = models
        self.latency = latency
        self.store = store
        self.sessions = sessions
        # Reading and decoding, and writing heatmaps, run on every core while no model runs: numpy, Pillow and
        # fsync release the GIL. The two tasks' models are started from it too (with one thread, one after the
        # other).
        self._preparers = ThreadPoolExecutor(settings.threads or os.cpu_count() or 1, "prepare")

    def __call__(self, jobs: list[ClaimedJob]) -> dict[int, Exception]:
        failures: dict[int, Exception] = {}
        batch = []
        with self.sessions() as session:
            paths = dict(
                session.execute(
                    select(Instance.id, Instance.path).where(Instance.id.in_([job.instance_pk for job in jobs]))
                ).all()
            )
        stored = [paths.get(job.instance_pk) for job in jobs]
        for job, prepared in zip(jobs, self._preparers.map(self._prepare_or_error, jobs, stored), strict=True):
            if isinstance(prepared, Exception):
                failures[job.id] = prepared
            else:
                batch.append(prepared)
        if self.gate is not None:
            self._look_first([work for work in batch if not work.route.skipped], failures)
            batch = [work for work in batch if work.job.id not in failures]
        for work, error in zip(batch, self._preparers.map(self._make_inputs, batch), strict=True):
            if error is not None:
                failures[work.job.id] = error
        batch = [work for work in batch if work.job.id not in failures]
        # The tasks' models run side by side (each runs its batch's images side by side on the cores, see
        # :mod:`inference.runtime`): an image alone that several tasks read has their models at work at once.
        names = [name for name in self.tasks if name != self.gate]
        routed = [[work for work in batch if task in work.route.tasks] for task in names]
        for task, outcomes in zip(names, self._preparers.map(self._run_task, names, routed), strict=True):
            for work, outcome, milliseconds in outcomes:  # the results made into rows in the order of the tasks
                if isinstance(outcome, Exception) or work.job.id in failures:
                    failures.setdefault(work.job.id, outcome)  # the first task's error, when several failed
                    continue
                work.timings_ms[f"{task}_model"] = milliseconds
                try:
                    for output in outcome:
                        self._add_row(work, task, output)
                except Exception as error:
                    failures[work.job.id] = error
        return failures | self._record([work for work in batch if work.job.id not in failures])

    def _look_first(self, batch: list[_Work], failures: dict[int, Exception]) -> None:
        """Run the gate on ``batch`` and route each image by what it sees; its result is kept where it routed the
        image to a task or disagreed with the tags."""
        gate: GateTask = self.tasks[self.gate]
        for work, outcome, milliseconds in self._run_task(self.gate, batch):
            if isinstance(outcome, Exception):
                failures[work.job.id] = outcome
                continue
            work.timings_ms[f"{self.gate}_model"] = milliseconds
            try:
                [output] = outcome
                if not isinstance(output.values, GateValues):
                    raise PermanentJobError(f"gate {self.gate} answered {type(output.values).__name__}, not GateValues")
                work.route, values = follow_the_image(
                    work.route, output.values, gate, self.tasks, self.settings.undecided_tasks
                )
                if values.tasks_run or values.disagreement:
                    self._add_row(work, self.gate, replace(output, values=values))
            except Exception as error:
                failures[work.job.id] = error

    def _make_inputs(self, work: _Work) -> Exception | None:
        """The inputs of the models of the tasks the image is routed to, from its decoded picture; the error, if
        any (a missing model: the job waits)."""
        try:
            for task in work.route.tasks:
                if task not in work.inputs:
                    work.inputs[task] = self.models.of(task).inputs([work.picture], [work.shape])
        except Exception as error:
            return error
        finally:
            work.picture = None
        return None

    def _run_task(self, task: TaskName, routed: list[_Work]) -> list[tuple[_Work, object, float]]:
        """Run ``task`` on the images of ``routed`` in one batch; if the batch fails, image by image, so that
        one image the model cannot take fails its own job only. Returns (work, its result or the error,
        milliseconds of model time) for each."""
        if not routed:
            return []
        try:
            started = time.perf_counter()
            inputs = ModelInputs.concatenate([work.inputs[task] for work in routed])
            outputs = self._predict(task, inputs, [work.header for work in routed])
            share = (time.perf_counter() - started) * 1000 / len(routed)
            return [(work, output, share) for work, output in zip(routed, outputs, strict=True)]
        except Exception as error:
            if len(routed) == 1:
                return [(routed[0], error, 0.0)]
        outcomes = []
        for work in routed:
            started = time.perf_counter()
            try:
                [output] = self._predict(task, work.inputs[task], [work.header])
                outcomes.append((work, output, (time.perf_counter() - started) * 1000))
            except Exception as error:
                outcomes.append((work, error, 0.0))
        return outcomes

    def _prepare_or_error(self, job: ClaimedJob, path: str | None) -> _Work | Exception:
        try:
            return self._prepare(job, path)
        # no retry can read it; pydicom raises NotImplementedError for a value of an unknown VR
        except (InvalidDicomError, UnsupportedImage, NotImplementedError) as error:
            return PermanentJobError(f"{type(error).__name__}: {error}")
        except Exception as error:  # e.g. the file or the index unavailable: this job only, retried
            return error

    def _prepare(self, job: ClaimedJob, path: str | None) -> _Work:
        """Read, route and decode the instance stored at ``path`` (None: it is no longer in the index)."""
        started = time.perf_counter()
        if path is None:
            raise LookupError(f"instance {job.instance_pk} is not in the index")
        relative = PurePosixPath(path)
        # the Pixel Data stays in the file until decoded: :mod:`inference.pixels` reads native values straight from it
        stored_file = self.store.absolute(relative)
        stamp = source_stamp(stored_file)  # before reading: a file replaced meanwhile gets a preview never drawn
        ds = pydicom.dcmread(stored_file, defer_size=DEFERRED_PIXEL_DATA)
        work = _Work(job, relative, ds, route(ds, self.settings), started)
        looks_first = self.gate is not None and not work.route.skipped
        if work.route.tasks or looks_first:
            # a missing model: wait, undecoded (those of the tasks a gate routes to are known after it looked)
            models = {task: self.models.of(task) for task in ([self.gate] if looks_first else work.route.tasks)}
            pixels = radiograph_pixels(ds, self.max_image_pixels, reduce_to=self.picture_size)
            work.picture, work.shape = as_picture(pixels), dimensions(ds)[:2]
            work.inputs = {task: model.inputs([work.picture], [work.shape]) for task, model in models.items()}
            if self.keep_preview:
                work.preview = preview_bytes(preview(pixels, self.picture_size, work.shape), stamp)
        work.timings_ms["prepare"] = (time.perf_counter() - started) * 1000
        return work

    def _predict(self, task: TaskName, images: ModelInputs, headers: list[Dataset]) -> list[list[TaskOutput]]:
        return self.tasks[task].predict(self.models.of(task), images, headers)

    def _add_row(self, work: _Work, task: TaskName, output: TaskOutput) -> None:
        outputs = self.tasks[task].series_numbers
        if output.output not in outputs or len(output.summary) > SUMMARY_LENGTH:  # no retry gives another answer
            raise PermanentJobError(
                f"task {task} answered output {output.output!r} (it declares {', '.join(outputs)}) with a summary of "
                f"{len(output.summary)} characters (at most {SUMMARY_LENGTH})"
            )
        model = self.models.of(task)
        work.rows.append(
            {
                "instance_pk": work.job.instance_pk,
                "task": task,
                "output": output.output,
                "is_primary": output.is_primary,
                "summary": output.summary,
                "values": output.values.model_dump(mode="json", exclude_unset=True),
                "heatmap_path": str(work.heatmap_path),
                "model_name": model.card.name,
                "model_version": model.card.version,
                "weights_digest": model.weights_digest,
                "demo_model": model.card.demo,
            }
        )
        work.heatmaps[heatmap_name(task, output.output)] = output.heatmap

    def _record(self, batch: list[_Work]) -> dict[int, Exception]:
        """Write each instance's heatmaps file, side by side (it is mostly waiting for the disk), then record the
        batch in one transaction, or, if that fails, each instance in its own, so that a record that cannot be made
        fails its own job only. Returns the failed jobs."""
        failures: dict[int, Exception] = {}
        written = []
        for work, error in zip(batch, self._preparers.map(self._write_heatmaps, batch), strict=True):
            if error is None:
                written.append(work)
            else:
                failures[work.job.id] = error
        try:
            with self.sessions.begin() as session:
                recorded = [work for work in written if self._record_in(session, work)]
        except OperationalError as error:  # the index busy or away: each transaction alone would wait as long
            return failures | {work.job.id: error for work in written}
        except Exception as error:
            if len(written) == 1:
                return failures | {written[0].job.id: error}
            recorded = []
            for work in written:
                try:
                    with self.sessions.begin() as session:
                        if self._record_in(session, work):
                            recorded.append(work)
                except Exception as error:
                    failures[work.job.id] = error
        if self.latency is not None:
            for work in recorded:
                for task in work.route.tasks:
                    self.latency.labels(task).observe(time.perf_counter() - work.started)
        return failures

    def _write_heatmaps(self, work: _Work) -> Exception | None:
        """Write and make durable the file of the instance's heatmaps (none when no task ran), then keep its preview;
        the error, if any."""
        started = time.perf_counter()
        try:
            if work.heatmaps:
                temporary = self.store.write_temporary([heatmaps_to_bytes(work.heatmaps)])
                self.store.publish(temporary, work.heatmap_path)
        except Exception as error:
            return error
        if work.preview is not None and any(self.tasks[row["task"]].illustrated for row in work.rows):
            self._keep_preview(work)
        work.timings_ms["record"] = (time.perf_counter() - started) * 1000
        return None

    def _keep_preview(self, work: _Work) -> None:
        """Write the preview beside the heatmaps; it is a cache of the outputs job (which deletes it), so a write
        that fails costs that job a decoding, not this job its results."""
        try:
            self.store.publish(self.store.write_temporary([work.preview]), preview_path(work.heatmap_path))
        except OSError as error:
            log.warning("job %d: no preview kept (%s); its outputs decode the image", work.job.id, type(error).__name__)

    @staticmethod
    def _record_in(session: Session, work: _Work) -> bool:
        """Replace the instance's results, queue its outputs job and mark its job done, in ``session``'s transaction;
        False when the job was queued again meanwhile (nothing recorded)."""
        if not still_claimed(session, work.job):
            log.info("job %d was queued again while it ran; its results are not recorded", work.job.id)
            return False
        session.execute(delete(InferenceResult).where(InferenceResult.instance_pk == work.job.instance_pk))
        if work.rows:  # one bulk INSERT, without the ORM's unit of work
            session.execute(insert(InferenceResult), [row | {"timings_ms": dict(work.timings_ms)} for row in work.rows])
            enqueue(session, session.get_one(Instance, work.job.instance_pk), OUTPUTS_JOB, OUTPUTS_QUEUE)
        note = work.route.reason if not work.route.tasks else f"ran {', '.join(work.route.tasks)} ({work.route.reason})"
        finish(session, work.job, note)
        return True
