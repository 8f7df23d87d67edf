"""MLflow tracking of every inference: one run per processed instance, logged in the background.

Which runs are due is found by a query rather than queued by the inference job: an instance whose results have
no ``tracking`` row, or one for older results (replaced results have new ids), gets a pending row once its
outputs job has finished, so that the structured report it wrote can go with the run. The inference job needs
no change for it, and results recorded while tracking was off or failing are caught up with the same query.

A thread of its own (like the delivery sender) takes due rows and logs each as one MLflow run in the configured
experiment: params (tasks, each model's name, version, weights digest and input size, a pseudonymous patient
key), metrics (every numeric result value and the timings), tags (the results in words) and artifacts (the
heatmaps, and the structured report as JSON). A run that cannot be logged (the server unreachable) is tried
again with exponential backoff, forever: inference and delivery never wait for MLflow, and a claim is a lease
(``available_at`` moved forward), so a node stopped mid-run needs no recovery step. The thread gives way: it logs
while no job or delivery is due and no request is served, or after a minute of giving way. With the artifact store
on the node's disk a run takes three calls to MLflow and the heatmaps file is linked into its artifacts, not
copied; elsewhere each artifact is one more call.

On PostgreSQL no thread polls: logging is a ``track`` job of the task engine, one at a time in the cluster,
deferred when an outputs job finishes (:func:`schedule_tracking`) and by the workers' catch-up
(:meth:`InferenceTracker.schedule_waiting`: results recorded while tracking was off, a job that failed); it logs
what is due, as a pass of the thread does, and defers the next one for when the earliest backoff ends.

Each run is tagged with a key of the instance's results; a row found again after a crash between creating the
run and recording it adopts the finished run with that key, and deletes an unfinished one before logging anew.

Patient data: unless ``mlflow.log_phi``, no PatientID, PatientName or UID goes to MLflow. The patient key is a
keyed digest (HMAC-SHA256) of the PatientID with a key that stays in the storage root; ``Patient.storage_key``
is not used, for its readable prefix is the PatientID. The report loses the Patient group, person names,
instance UIDs, dates, times and other identifiers before it is logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage
from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import task_engine
from dicom_node.background import Foreground, GiveWay, PollingThread
from dicom_node.config import MlflowSettings
from dicom_node.jobs import OUTPUTS_JOB
from dicom_node.models import (
    Delivery,
    DeliveryState,
    InferenceResult,
    Instance,
    Job,
    JobState,
    TrackedRun,
    TrackingState,
)
from dicom_node.secret_file import kept_secret
from dicom_node.storage import InstanceStore

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from dicom_node.inference_jobs import InferenceModels

log = logging.getLogger(__name__)

TRACK_TASK = "track"
RUN_KEY_TAG = "dicom_node.run_key"
PSEUDONYM_KEY_FILE = "pseudonym.key"
_MAX_ERROR_LENGTH = 2000
REPORT_ARTIFACT = "structured-report.json"
MAX_GIVE_WAY_S = 60.0  # the longest the tracker waits for a busy node to be idle before it logs anyway
_REPORT_CLASS = Comprehensive3DSRStorage  # of the structured report dicom_node.outputs.report writes
# Identifiers outside the Patient group (0010,xxxx) that a report copies from its source (PS3.15 Table E.1-1)
_IDENTIFYING_KEYWORDS = frozenset(
    {
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "RequestedProcedureID",
        "PlacerOrderNumberImagingServiceRequest",
        "FillerOrderNumberImagingServiceRequest",
    }
)
_NAMES_AND_DATES = frozenset({"PN", "DA", "DT", "TM"})


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The page of a run in the MLflow UI."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def tracked_run_url(session: Session, settings: MlflowSettings, instance_pk: int) -> str | None:
    """The MLflow page of the run of an instance's current results; None until it is logged."""
    row = session.execute(
        select(TrackedRun.experiment_id, TrackedRun.run_id).where(
            TrackedRun.instance_pk == instance_pk, TrackedRun.state == TrackingState.LOGGED
        )
    ).first()
    return run_url(settings.ui_url, row.experiment_id, row.run_id) if row else None


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, the artifacts beside it (as the training runs keep theirs); else the server's choice."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(make_url(tracking_uri).database).parent / "artifacts").resolve().as_uri()


def pseudonym(key: bytes, patient_id: str) -> str:
    """A patient's key in MLflow: the same for the same PatientID, and no way back to it without ``key``."""
    return "p-" + hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:24]


def without_identifiers(ds: Dataset) -> Dataset:
    """Remove from ``ds`` and every sequence item, in place: the Patient group, person names, instance UIDs,
    dates and times, private elements and the other identifiers a report copies from its source."""
    for element in list(ds):
        if _identifies(element):
            del ds[element.tag]
        elif element.VR == "SQ":
            for item in element.value:
                without_identifiers(item)
    return ds


def _identifies(element: DataElement) -> bool:
    return (
        element.tag.group == 0x0010
        or element.tag.is_private
        or element.VR in _NAMES_AND_DATES
        or element.keyword.endswith("InstanceUID")
        or element.keyword in _IDENTIFYING_KEYWORDS
    )


@dataclass(frozen=True)
class ClaimedRun:
    id: int
    instance_pk: int
    result_id: int
    attempt: int


@dataclass(frozen=True)
class InferenceRun:
    """What one run logs: an instance's results and what identifies it, read from the index."""

    instance_pk: int
    results: list[InferenceResult]
    patient_id: str
    patient_name: str | None
    study_instance_uid: str
    sop_instance_uid: str
    report_path: str | None  # of the structured report the outputs job wrote, relative to the storage root

    @property
    def key(self) -> str:
        """Tells these results apart from any other's, also those of an index made anew with reused ids."""
        newest = self.results[-1]
        return hashlib.sha256(f"{self.instance_pk}:{newest.id}:{newest.created_at}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class RunContents:
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


def run_contents(
    run: InferenceRun, patient_key: str, log_phi: bool, models: InferenceModels | None = None
) -> RunContents:
    """The params, metrics and tags of ``run``'s MLflow run; patient data only when ``log_phi``."""
    first = run.results[0]
    params = {"tasks": ",".join(dict.fromkeys(result.task for result in run.results)), "patient_key": patient_key}
    metrics = {f"timings.{_name(step)}_ms": float(ms) for step, ms in first.timings_ms.items()}
    tags = {
        "dicom_node.instance_pk": str(run.instance_pk),
        "demo_model": str(any(result.demo_model for result in run.results)).lower(),
    }
    for result in run.results:
        params |= _model_params(result, models)
        prefix = f"{result.task}.{result.output}"
        tags[f"{prefix}.summary"] = result.summary
        for name, value in result.values.items():
            _add_value(f"{prefix}.{_name(name)}", value, metrics, tags)
    if log_phi:
        params |= {
            "patient_id": run.patient_id,
            "patient_name": run.patient_name or "",
            "study_instance_uid": run.study_instance_uid,
            "sop_instance_uid": run.sop_instance_uid,
        }
    return RunContents(params, metrics, tags)


def _model_params(result: InferenceResult, models: InferenceModels | None) -> dict[str, str]:
    params = {
        f"{result.task}.model_name": result.model_name,
        f"{result.task}.model_version": result.model_version,
        f"{result.task}.weights_digest": result.weights_digest,
    }
    model = models.loaded().get(result.task) if models is not None else None
    if model is not None and model.weights_digest == result.weights_digest:  # the model that made the result
        params[f"{result.task}.input_size"] = str(model.card.input_size)
    return params


def _add_value(key: str, value: object, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """A result value as metrics (numbers, flags as 0 or 1, each number of a mapping) or a tag (words)."""
    if isinstance(value, bool | int | float):
        metrics[key] = float(value)
    elif isinstance(value, str):
        tags[key] = value
    elif isinstance(value, dict):
        for name, item in value.items():
            _add_value(f"{key}.{_name(name)}", item, metrics, tags)
    # lists (heatmap peaks) and None (a value not computed) are not logged


def _name(text: str) -> str:
    """A key part: ``Foot Ulcer`` -> ``foot_ulcer``."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")


def schedule_tracking(session: Session, at: dt.datetime | None = None) -> None:
    """On PostgreSQL, in ``session``'s transaction: a ``track`` job, unless one waits already; on SQLite the tracker
    thread finds the due runs itself."""
    if session.get_bind().dialect.name == "postgresql":
        task_engine.defer_unique(
            session, TRACK_TASK, task_engine.TRACK_QUEUE, queueing_lock=TRACK_TASK, lock=TRACK_TASK, schedule_at=at
        )


class TrackingQueue:
    """The ``tracking`` rows: queue instances with new results, claim due rows, record what became of them."""

    def __init__(self, sessions: sessionmaker[Session], settings: MlflowSettings) -> None:
        self.sessions = sessions
        self.settings = settings

    def add_new(self) -> None:
        """Make a run due for each instance whose results have no logged or pending run yet, once its outputs
        job has finished."""
        newest = (
            select(InferenceResult.instance_pk, func.max(InferenceResult.id).label("result_id"))
            .group_by(InferenceResult.instance_pk)
            .subquery()
        )
        outputs_busy = exists().where(
            Job.instance_pk == newest.c.instance_pk,
            Job.kind == OUTPUTS_JOB,
            Job.state.in_((JobState.PENDING, JobState.RUNNING)),
        )
        with self.sessions.begin() as session:
            rows = session.execute(
                select(newest.c.instance_pk, newest.c.result_id, TrackedRun)
                .outerjoin(TrackedRun, TrackedRun.instance_pk == newest.c.instance_pk)
                .where(or_(TrackedRun.id.is_(None), TrackedRun.result_id != newest.c.result_id), ~outputs_busy)
            ).all()
            for instance_pk, result_id, row in rows:
                if row is None:
                    session.add(TrackedRun(instance_pk=instance_pk, result_id=result_id))
                else:  # new results: a new run
                    row.result_id, row.state, row.attempts, row.available_at = (
                        result_id,
                        TrackingState.PENDING,
                        0,
                        _now(),
                    )
                    row.last_error = row.experiment_id = row.run_id = row.logged_at = None

    def pipeline_busy(self, destinations: Collection[str]) -> bool:
        """Whether a job, or a delivery to one of ``destinations``, is running or due now: the work that results
        wait for (rows of a destination no longer configured are never sent, so they do not count)."""
        now = _now()
        with self.sessions() as session:
            return bool(
                session.scalar(
                    select(
                        exists().where(
                            or_(
                                Job.state == JobState.RUNNING,
                                (Job.state == JobState.PENDING) & (Job.available_at <= now),
                            )
                        )
                        | exists().where(
                            Delivery.destination.in_(destinations),
                            or_(
                                Delivery.state == DeliveryState.SENDING,
                                (Delivery.state == DeliveryState.PENDING) & (Delivery.available_at <= now),
                            ),
                        )
                    )
                )
            )

    def claim(self) -> ClaimedRun | None:
        """Take the oldest due row; until the claim's backoff has passed, no other claim takes it."""
        with self.sessions.begin() as session:
            row = session.execute(
                select(TrackedRun.id, TrackedRun.instance_pk, TrackedRun.result_id, TrackedRun.attempts)
                .where(TrackedRun.state == TrackingState.PENDING, TrackedRun.available_at <= _now())
                .order_by(TrackedRun.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            attempt = row.attempts + 1
            delay = min(self.settings.retry_backoff * 2 ** (attempt - 1), self.settings.max_backoff)
            taken = session.execute(
                update(TrackedRun)
                .where(TrackedRun.id == row.id, TrackedRun.attempts == row.attempts)
                .values(attempts=attempt, available_at=_now() + dt.timedelta(seconds=delay))
                .execution_options(synchronize_session=False)
            ).rowcount
            return ClaimedRun(row.id, row.instance_pk, row.result_id, attempt) if taken else None

    def read(self, claimed: ClaimedRun) -> InferenceRun | None:
        """The claimed run's results and identifiers; None when the results were replaced since the claim."""
        with self.sessions() as session:
            instance = session.get_one(Instance, claimed.instance_pk)
            results = list(instance.results)
            if not results or results[-1].id != claimed.result_id:
                return None
            study = instance.series.study
            report_path = session.scalar(
                select(Instance.path)
                .where(Instance.source_instance_pk == instance.id, Instance.sop_class_uid == _REPORT_CLASS)
                .order_by(Instance.id.desc())
                .limit(1)
            )
            return InferenceRun(
                instance.id,
                results,
                study.patient.patient_id,
                study.patient.name,
                study.study_instance_uid,
                instance.sop_instance_uid,
                report_path,
            )

    def next_due(self) -> dt.datetime | None:
        """When the earliest run that waits out a backoff is due; None when none waits."""
        with self.sessions() as session:
            return session.scalar(
                select(func.min(TrackedRun.available_at)).where(TrackedRun.state == TrackingState.PENDING)
            )

    def logged(self, claimed: ClaimedRun, experiment_id: str, run_id: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(TrackedRun)
                .where(TrackedRun.id == claimed.id, TrackedRun.result_id == claimed.result_id)
                .values(
                    state=TrackingState.LOGGED,
                    experiment_id=experiment_id,
                    run_id=run_id,
                    last_error=None,
                    logged_at=_now(),
                )
            )

    def failed(self, claimed: ClaimedRun, error: str) -> None:
        """Note why; the claim already put the next attempt off."""
        with self.sessions.begin() as session:
            session.execute(
                update(TrackedRun).where(TrackedRun.id == claimed.id).values(last_error=error[:_MAX_ERROR_LENGTH])
            )


class InferenceTracker(PollingThread):
    """A thread that logs the due runs to MLflow, a batch per pass; started only where the node runs models."""

    def __init__(
        self,
        settings: MlflowSettings,
        sessions: sessionmaker[Session],
        store: InstanceStore,
        models: InferenceModels | None = None,
        foreground: Foreground | None = None,
        destinations: Collection[str] = (),
    ) -> None:
        """``foreground`` and the deliveries to ``destinations`` (the configured ones) are what the thread gives
        way to, besides due jobs."""
        super().__init__("tracking", settings.poll_interval)
        self.foreground = foreground
        self.destinations = list(destinations)
        self.settings = settings
        self.queue = TrackingQueue(sessions, settings)
        self.store = store
        self.models = models
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._pseudonym_key: bytes | None = None
        self._failing = False
        self._warmed_up = False
        self.give_way = GiveWay(MAX_GIVE_WAY_S)

    def start(self) -> None:
        if self.settings.enabled and self.models is not None:
            super().start()

    def run_once(self) -> int:
        """A pass of the thread (SQLite): log the due runs, giving way to requests, jobs and deliveries (the rest
        wait for the next pass); return how many were taken."""
        if not self._warmed_up:
            self._warm_up()
        return self._log_due(give_way=True)

    def run_pass(self) -> bool:
        return self.run_once() == self.settings.batch_size

    def schedule_waiting(self) -> None:
        """On PostgreSQL: a ``track`` job for when the first run is due, if any waits (a catch-up: the job that would
        log it may have failed with the index away, or results were recorded while tracking was off)."""
        if not self.settings.enabled:
            return
        self.queue.add_new()
        next_due = self.queue.next_due()
        if next_due is not None:
            with self.queue.sessions.begin() as session:
                schedule_tracking(session, at=next_due)

    def track(self) -> None:
        """The ``track`` job on PostgreSQL: log every due run, then schedule the next job for the runs that wait
        out a backoff."""
        if not self.settings.enabled:
            return
        while self._log_due() == self.settings.batch_size:
            pass
        self.schedule_waiting()

    def _log_due(self, give_way: bool = False) -> int:
        """Queue the instances with new results, then log up to ``batch_size`` due runs, stopping at the first
        that fails; with ``give_way``, none while the node has other work (:meth:`_busy`), none after a request
        came in, and one only when it has given way long enough while a request is served."""
        forced = False  # let through while the node is busy, having given way long enough
        if give_way:
            busy = self._busy()
            if self.give_way.defers(busy):
                return 0
            forced = busy
        self.queue.add_new()
        taken = 0
        while taken < self.settings.batch_size and not self.stopping:
            if give_way and (taken or not forced) and self.foreground is not None and self.foreground.busy():
                break  # a request came in, or waits: it shares the cores with one run at most
            claimed = self.queue.claim()
            if claimed is None or not self._log(claimed):
                break
            taken += 1
        return taken

    def _warm_up(self) -> None:
        """Import MLflow and open its store now, at start, rather than when the first results compete for the cores;
        an MLflow that cannot be reached yet is left to the first run to report."""
        self._warmed_up = True
        try:
            self._connect()
        except Exception as error:
            log.debug("MLflow not reached at start (%s)", type(error).__name__)

    def _busy(self) -> bool:
        """Whether a request is served or a job or delivery is due: runs are logged once the node is idle, or after
        :data:`MAX_GIVE_WAY_S` of giving way (a batch, then giving way again), so that a node never idle logs them
        too, ``batch_size`` runs a minute at least."""
        foreground = self.foreground is not None and self.foreground.busy()
        return foreground or self.queue.pipeline_busy(self.destinations)

    def _log(self, claimed: ClaimedRun) -> bool:
        """Log one claimed run; False when MLflow failed (recorded on the row)."""
        run = self.queue.read(claimed)
        if run is None:  # the results were replaced: the next pass queues the new ones
            return True
        started = time.perf_counter()
        try:
            experiment_id, run_id = self._log_run(run, first_attempt=claimed.attempt == 1)
        except Exception as error:  # MLflow unreachable or refusing: never an error of the node
            self._experiment_id = None  # found again next time: it may have been deleted meanwhile
            self.queue.failed(claimed, f"{type(error).__name__}: {error}")
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(
                level,
                "MLflow run of instance %d not logged, attempt %d (%s); retried later",
                run.instance_pk,
                claimed.attempt,
                type(error).__name__,
            )
            self._failing = True
            return False
        self.queue.logged(claimed, experiment_id, run_id)
        if self._failing:
            log.info("MLflow tracking works again")
            self._failing = False
        log.info(
            "MLflow run %s of instance %d logged (%.0f ms)",
            run_id,
            run.instance_pk,
            (time.perf_counter() - started) * 1000,
        )
        return True

    def _log_run(self, run: InferenceRun, first_attempt: bool) -> tuple[str, str]:
        """Log ``run`` as one MLflow run, or adopt the finished run an earlier attempt logged; return the ids.

        The run with its tags, its params and metrics in one batch, the artifacts (:meth:`_log_artifacts`), the end.
        A first attempt looks for no earlier run: the claim that counted the attempt came before any."""
        from mlflow.entities import Metric, Param

        client, experiment_id = self._connect()
        if not first_attempt:
            earlier = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run.key}'")
            for found in earlier:
                if found.info.status == "FINISHED":
                    return experiment_id, found.info.run_id
            for found in earlier:  # an attempt cut short: replaced by a whole run
                client.delete_run(found.info.run_id)
        patient_key = pseudonym(self._secret(), run.patient_id)
        contents = run_contents(run, patient_key, self.settings.log_phi, self.models)
        tags = {RUN_KEY_TAG: run.key, **contents.tags}
        if run.report_path is None:
            tags["dicom_node.report"] = "none (outputs.structured_report off, or the outputs job failed)"
        info = client.create_run(experiment_id, run_name=f"instance {run.instance_pk}", tags=tags).info
        now_ms = int(time.time() * 1000)
        client.log_batch(
            info.run_id,
            metrics=[Metric(key, value, now_ms, 0) for key, value in contents.metrics.items()],
            params=[Param(key, value) for key, value in contents.params.items()],
        )
        self._log_artifacts(client, info.run_id, info.artifact_uri, run)
        client.set_terminated(info.run_id)
        return experiment_id, info.run_id

    def _log_artifacts(self, client: MlflowClient, run_id: str, artifact_uri: str, run: InferenceRun) -> None:
        """The heatmaps file (one per instance) under ``heatmaps/`` and the report as JSON under ``report/``. In an
        artifact store on this machine's disk the heatmaps file is linked, not copied: it never changes."""
        heatmaps = [self.store.absolute(path) for path in sorted({result.heatmap_path for result in run.results})]
        report = self._report_json(run.report_path) if run.report_path is not None else None
        local = _local_directory(artifact_uri)
        if local is None:
            for path in heatmaps:
                client.log_artifact(run_id, str(path), "heatmaps")
            if report is not None:
                client.log_dict(run_id, report, f"report/{REPORT_ARTIFACT}")
            return
        (local / "heatmaps").mkdir(parents=True, exist_ok=True)
        for path in heatmaps:
            _link_or_copy(path, local / "heatmaps" / path.name)
        if report is not None:
            (local / "report").mkdir(exist_ok=True)
            (local / "report" / REPORT_ARTIFACT).write_text(json.dumps(report, indent=2))

    def _report_json(self, relative: str) -> dict:
        """The structured report as DICOM JSON (PS3.18 F.2), without identifiers unless ``log_phi``."""
        report = pydicom.dcmread(self.store.absolute(relative))
        return (report if self.settings.log_phi else without_identifiers(report)).to_json_dict()

    def _connect(self) -> tuple[MlflowClient, str]:
        """The client, made on first use (importing MLflow takes seconds), and the experiment's id."""
        if self._client is None:
            # The tracker retries with its own backoff; MLflow's retries (7, minutes long) would hold the thread
            # and the node's stop. Set in the environment, these win.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            from mlflow import MlflowClient

            uri = self.settings.tracking_uri
            if uri.startswith("sqlite:///"):
                Path(make_url(uri).database).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(uri)
        if self._experiment_id is None:
            self._experiment_id = self._experiment(self._client)
        return self._client, self._experiment_id

    def _experiment(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        name = self.settings.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=local_artifact_location(self.settings.tracking_uri))
        except MlflowException:  # made meanwhile by another node on the same server
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _secret(self) -> bytes:
        if self._pseudonym_key is None:
            self._pseudonym_key = kept_secret(self.store.root / PSEUDONYM_KEY_FILE)
        return self._pseudonym_key


def _local_directory(artifact_uri: str) -> Path | None:
    """The directory of a run's artifacts when they are kept on this machine's disk (a ``file:`` URI)."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.parse.unquote(parsed.path))
    return None


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link at ``target`` to ``source``, or a copy where no link can be made (another file system)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
