"""The outputs job: from an instance's recorded results to DICOM objects for the PACS, and their outbox rows.

For each result of an illustrated task (``Task.illustrated``), a Secondary Capture image with its heatmap
(:mod:`dicom_node.outputs.secondary_capture`) and a Parametric Map of the heatmap
(:mod:`dicom_node.outputs.parametric_map`); for the instance, one structured report of all its results
(:mod:`dicom_node.outputs.report`), which names the reports it supersedes when the instance was processed before.
Their UIDs derive from the source and the results' ids, so a job run again after a crash writes the same objects to
the same places. One transaction indexes them beside the received instances (``source_instance_pk`` says which one
they report on), adds one outbox row per object and destination (:mod:`dicom_node.delivery`) and marks the job done.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import Comprehensive3DSRStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.ai_tasks.interface import MAP_SERIES_OFFSET, REPORT_SERIES_NUMBER
from dicom_node.ai_tasks.registry import installed_tasks, task_type
from dicom_node.config import OutputKind, Settings
from dicom_node.delivery import destinations_for, schedule_sending
from dicom_node.ingest import InstanceHeader, index_series
from dicom_node.jobs import ClaimedJob, PermanentJobError, finish, record_note, still_claimed
from dicom_node.models import Delivery, InferenceResult, Instance, Series, Study
from dicom_node.outputs.identity import NodeIdentity
from dicom_node.outputs.parametric_map import build_parametric_map
from dicom_node.outputs.preview import Stamp, load_preview, preview_path, preview_shape, source_stamp
from dicom_node.outputs.report import build_measurement_report
from dicom_node.outputs.secondary_capture import build_secondary_capture
from dicom_node.outputs.uids import InstallationUids
from dicom_node.storage import InstanceStore
from dicom_node.tracking import schedule_tracking
from inference.pixels import DEFERRED_PIXEL_DATA
from inference.predict import Heatmap, heatmap_from_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Output:
    dataset: Dataset
    kind: OutputKind


class OutputJobs:
    """The job handler of ``outputs`` jobs (see :mod:`dicom_node.workers`); ``on_queued`` is called after
    deliveries were added, to wake the sender."""

    def __init__(
        self,
        settings: Settings,
        store: InstanceStore,
        sessions: sessionmaker[Session],
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sessions = sessions
        self.on_queued = on_queued
        self.identity = NodeIdentity(
            settings.dicom.ae_title, InstallationUids.of_installation(store.root, settings.dicom.uid_root)
        )

    def __call__(self, jobs: list[ClaimedJob]) -> dict[int, Exception]:
        failures: dict[int, Exception] = {}
        for job in jobs:
            try:
                self._run(job)
            except (InvalidDicomError, ValueError) as error:  # the source or its results cannot make an object
                failures[job.id] = PermanentJobError(f"{type(error).__name__}: {error}")
            except Exception as error:
                failures[job.id] = error
        return failures

    def _run(self, job: ClaimedJob) -> None:
        with self.sessions() as session:
            instance = session.get_one(Instance, job.instance_pk)
            path, calling_ae = PurePosixPath(instance.path), instance.calling_ae
            results = list(
                session.scalars(
                    select(InferenceResult)
                    .where(InferenceResult.instance_pk == instance.id)
                    .order_by(InferenceResult.id)  # the report's UID names them in this order
                )
            )
            earlier_reports = [
                _report_header(*row)
                for row in session.execute(
                    select(Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid)
                    .join(Series, Instance.series_pk == Series.id)
                    .join(Study, Series.study_pk == Study.id)
                    .where(
                        Instance.source_instance_pk == instance.id, Instance.sop_class_uid == Comprehensive3DSRStorage
                    )
                    .order_by(Instance.id)
                )
            ]
        # results of a task no longer installed: its outputs cannot be made, the other tasks' still are
        left_out = sorted({result.task for result in results} - set(installed_tasks()))
        results = [result for result in results if result.task in installed_tasks()]
        if not results:
            self._note(job, "no results to report" + _left_out(left_out))
            return
        # the Pixel Data stays in the file: the pictures are drawn from the preview the inference job kept
        stored_file = self.store.absolute(path)
        stamp = source_stamp(stored_file)
        source = pydicom.dcmread(stored_file, defer_size=DEFERRED_PIXEL_DATA)
        outputs = self._build(source, stamp, results, earlier_reports)
        if not outputs:
            illustrated = any(task_type(result.task).illustrated for result in results)
            self._note(
                job,
                "outputs are switched off (outputs.secondary_captures, outputs.parametric_maps, "
                "outputs.structured_report)"
                if illustrated
                else "no report (outputs.structured_report is off), and its results' tasks make no images",
            )
            return
        written = [(output, *self._write(output.dataset)) for output in outputs]
        with self.sessions.begin() as session:
            if not still_claimed(session, job):
                log.info("job %d was queued again while it ran; its objects are not indexed", job.id)
                return
            queued: list[str] = []
            for output, relative, size in written:
                instance = self._index(session, output.dataset, relative, size, job.instance_pk)
                queued += self._queue_deliveries(session, instance, calling_ae, output.kind)
            schedule_sending(session, set(queued))
            if self.settings.mlflow.enabled:
                schedule_tracking(session)
            note = f"wrote {len(written)} objects; {len(queued)} deliveries queued"
            if not queued:
                note += " (no destination: see delivery.default_destination)"
            finish(session, job, note + _left_out(left_out))
        self.store.absolute(preview_path(results[0].heatmap_path)).unlink(missing_ok=True)  # drawn: no longer needed
        if queued:
            self.on_queued()

    def _build(
        self, source: Dataset, stamp: Stamp, results: list[InferenceResult], earlier_reports: list[Dataset]
    ) -> list[_Output]:
        images = self._images(source, stamp, results)
        written = [output for of_result in images.values() for output in of_result]
        if self.settings.outputs.structured_report:
            illustrations = {key: [output.dataset for output in of_result] for key, of_result in images.items()}
            report = self._report(source, results, illustrations, earlier_reports)
            written.append(_Output(report, "structured_report"))
        return written

    def _images(
        self, source: Dataset, stamp: Stamp, results: list[InferenceResult]
    ) -> dict[tuple[str, str], list[_Output]]:
        """Each result's Secondary Capture and Parametric Map, as switched on, by (task, output); heatmap files are
        read only when one of them is."""
        settings = self.settings.outputs
        results = [result for result in results if task_type(result.task).illustrated]
        if not (results and (settings.secondary_captures or settings.parametric_maps)):
            return {}
        radiograph = self._radiograph(source, stamp, results) if settings.secondary_captures else None
        images: dict[tuple[str, str], list[_Output]] = {}
        for result in results:
            heatmap = heatmap_from_bytes(self.store.absolute(result.heatmap_path).read_bytes(), result.heatmap_name)
            of_result = images.setdefault((result.task, result.output), [])
            if settings.secondary_captures:
                capture = self._secondary_capture(source, heatmap, result, radiograph)
                of_result.append(_Output(capture, "secondary_capture"))
            if settings.parametric_maps:
                of_result.append(_Output(self._parametric_map(source, heatmap, result), "parametric_map"))
        return images

    def _radiograph(self, source: Dataset, stamp: Stamp, results: list[InferenceResult]) -> np.ndarray | None:
        """The preview the inference job kept for the Secondary Captures; None for a source without dimensions,
        which build_secondary_capture refuses with the reason."""
        if not (source.get("Rows") and source.get("Columns")):
            return None
        shape = preview_shape(int(source.Rows), int(source.Columns), self.settings.outputs.max_image_size)
        return load_preview(self.store.absolute(preview_path(results[0].heatmap_path)), shape, stamp)

    def _secondary_capture(
        self, source: Dataset, heatmap: Heatmap, result: InferenceResult, radiograph: np.ndarray | None
    ) -> Dataset:
        uids = self.identity.uids
        return build_secondary_capture(
            source,
            heatmap,
            result,
            self.identity,
            series_instance_uid=uids.derived(source.StudyInstanceUID, result.task, result.output),
            series_number=task_type(result.task).series_number(result.output),
            sop_instance_uid=uids.derived(source.SOPInstanceUID, "sc", result.task, result.output, _named(result)),
            instance_number=_instance_number(source),
            max_size=self.settings.outputs.max_image_size,
            radiograph=radiograph,
        )

    def _parametric_map(self, source: Dataset, heatmap: Heatmap, result: InferenceResult) -> Dataset:
        uids = self.identity.uids
        return build_parametric_map(
            source,
            heatmap,
            result,
            self.identity,
            series_instance_uid=uids.derived(source.StudyInstanceUID, "map", result.task, result.output),
            series_number=task_type(result.task).series_number(result.output) + MAP_SERIES_OFFSET,
            sop_instance_uid=uids.derived(source.SOPInstanceUID, "map", result.task, result.output, _named(result)),
            frame_of_reference_uid=uids.derived(source.SOPInstanceUID, "frame of reference"),
            instance_number=_instance_number(source),
        )

    def _report(
        self,
        source: Dataset,
        results: list[InferenceResult],
        illustrations: dict[tuple[str, str], list[Dataset]],
        earlier_reports: list[Dataset],
    ) -> Dataset:
        uids = self.identity.uids
        report_uid = uids.derived(source.SOPInstanceUID, "report", *(_named(result) for result in results))
        return build_measurement_report(
            source,
            results,
            illustrations,
            self.identity,
            series_instance_uid=uids.derived(source.StudyInstanceUID, "report"),
            series_number=REPORT_SERIES_NUMBER,
            sop_instance_uid=report_uid,
            instance_number=_instance_number(source),
            predecessors=[header for header in earlier_reports if header.SOPInstanceUID != report_uid],
        )

    def _write(self, dataset: Dataset) -> tuple[PurePosixPath, int]:
        """Store ``dataset`` as a DICOM file where a received instance with its identifiers would be."""
        relative = self.store.relative_path(
            dataset.PatientID, dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
        )
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        self.store.publish(self.store.write_temporary([buffer.getvalue()]), relative)
        return relative, buffer.tell()

    def _index(
        self, session: Session, dataset: Dataset, relative: PurePosixPath, size: int, source_pk: int
    ) -> Instance:
        header = InstanceHeader.from_dataset(dataset)
        series = index_series(session, header)
        instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid))
        if instance is None:
            instance = Instance(sop_instance_uid=header.sop_instance_uid, series=series)
            session.add(instance)
        instance.series = series
        instance.sop_class_uid = header.sop_class_uid
        instance.transfer_syntax_uid = dataset.file_meta.TransferSyntaxUID
        instance.instance_number = header.instance_number
        instance.rows, instance.columns = header.rows, header.columns
        instance.path = str(relative)
        instance.size_bytes = size
        instance.calling_ae = self.settings.dicom.ae_title
        instance.source_instance_pk = source_pk
        session.flush()
        return instance

    def _queue_deliveries(
        self, session: Session, instance: Instance, calling_ae: str | None, kind: OutputKind
    ) -> list[str]:
        """An outbox row for each destination of the object that has none yet; the destinations queued."""
        queued = []
        for destination in destinations_for(self.settings, calling_ae, kind):
            exists = session.scalar(
                select(Delivery.id).where(Delivery.instance_pk == instance.id, Delivery.destination == destination)
            )
            if exists is None:
                session.add(Delivery(instance_pk=instance.id, destination=destination))
                queued.append(destination)
        return queued

    def _note(self, job: ClaimedJob, note: str) -> None:
        with self.sessions.begin() as session:
            record_note(session, job, note)


def _named(result: InferenceResult) -> str:
    """A result as output UIDs name it: its row and when it was recorded, so that an index made again (whose ids
    start again) never names another result the same."""
    return f"{result.id}@{result.created_at.isoformat()}"


def _left_out(tasks: list[str]) -> str:
    return f"; the results of {', '.join(tasks)} left out: not installed" if tasks else ""


def _report_header(study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> Dataset:
    """A report the node wrote before, as the Predecessor Documents Sequence names it (from the index)."""
    header = Dataset()
    header.StudyInstanceUID, header.SeriesInstanceUID = study_instance_uid, series_instance_uid
    header.SOPClassUID, header.SOPInstanceUID = Comprehensive3DSRStorage, sop_instance_uid
    return header


def _instance_number(source: Dataset) -> int:
    value = source.get("InstanceNumber")
    return int(value) if value not in (None, "") else 1
