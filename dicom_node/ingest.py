"""Ingest: make one received instance durable, indexed and queued, or refuse it and change nothing.

The order matters for "never lose an acknowledged image":

1. the received bytes go to a temporary file, fsynced;
2. the header is read back from it and checked (identifiers, SOP class);
3. in one database transaction: patient/study/series/instance rows and the instance's job are written,
   the file is renamed into its place, and the transaction commits.

Only then does the caller answer Success. A crash before the commit leaves at most a temporary file (swept at
start-up) or a file without an index row that the sender, having had no Success, sends again.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import pydicom
from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.valuerep import DA
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import InferenceSettings
from dicom_node.jobs import enqueue
from dicom_node.models import Instance, Patient, Series, Study
from dicom_node.part10 import dataset_offset
from dicom_node.routing import route
from dicom_node.status import StoreStatus
from dicom_node.storage import InstanceStore, InvalidIdentifier, patient_key
from dicom_node.task_engine import inference_queue
from inference.pixels import ImageTooLarge, UnsupportedImage, check_pixel_count

log = logging.getLogger(__name__)

INFERENCE_JOB = "inference"
_PREAMBLE = b"\x00" * 128 + b"DICM"
_INTEGRITY_RETRIES = 3
_MAX_PATIENT_ID = 64  # VR LO
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Values larger than this stay on disk while the header is checked.
_DEFER_BYTES = 4096
_UNDEFINED_LENGTH = 0xFFFFFFFF


DuplicatePolicy = Literal["keep_first", "replace"]


class Rejected(Exception):
    """The instance is refused with a DICOM status; nothing was stored."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class TooLarge(Rejected):
    """Refused for a size beyond a configured limit: a decompression bomb or an image too large to decode.

    The status is 0xC000 (Error: Cannot understand), not 0xA700 (Refused: Out of Resources): PS3.4 B.2.3 makes
    A7xx a lack of resources, which senders retry; this dataset would be refused on every retry.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(StoreStatus.CANNOT_UNDERSTAND, reason)


class Outcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE_IGNORED = "duplicate-ignored"
    REPLACED = "replaced"


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    sop_instance_uid: str
    path: PurePosixPath
    patient_id: str  # the audit trail names whose data came in
    study_instance_uid: str


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the index keeps, read from a received dataset."""

    patient_id: str
    patient_name: str | None
    patient_sex: str | None
    patient_birth_date: dt.date | None
    study_instance_uid: str
    study_date: dt.date | None
    accession_number: str | None
    study_description: str | None
    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    sop_class_uid: str
    sop_instance_uid: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    has_pixel_data: bool

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceHeader:
        return cls(
            patient_id=_text(ds, "PatientID") or "",
            patient_name=_fitted(ds, "PatientName", Patient.name),
            patient_sex=_fitted(ds, "PatientSex", Patient.sex),
            patient_birth_date=_date(ds, "PatientBirthDate"),
            study_instance_uid=_text(ds, "StudyInstanceUID") or "",
            study_date=_date(ds, "StudyDate"),
            accession_number=_fitted(ds, "AccessionNumber", Study.accession_number),
            study_description=_fitted(ds, "StudyDescription", Study.description),
            series_instance_uid=_text(ds, "SeriesInstanceUID") or "",
            modality=_fitted(ds, "Modality", Series.modality),
            body_part_examined=_fitted(ds, "BodyPartExamined", Series.body_part_examined),
            series_description=_fitted(ds, "SeriesDescription", Series.description),
            sop_class_uid=_text(ds, "SOPClassUID") or "",
            sop_instance_uid=_text(ds, "SOPInstanceUID") or "",
            instance_number=_integer(ds, "InstanceNumber"),
            rows=_integer(ds, "Rows"),
            columns=_integer(ds, "Columns"),
            has_pixel_data=any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS),
        )


class Ingestor:
    """Stores, indexes and queues received instances; safe to call from many association threads."""

    def __init__(
        self,
        store: InstanceStore,
        sessions: sessionmaker[Session],
        duplicate_policy: DuplicatePolicy = "keep_first",
        max_inflated_bytes: int = 256 * 2**20,
        max_image_pixels: int = 100_000_000,
        on_queued: Callable[[], None] = lambda: None,
        routing: InferenceSettings | None = None,
    ) -> None:
        """``on_queued`` is called after an instance and its job were committed, to wake the workers; ``routing``
        decides which models an instance's inference job needs, and so its queue (see :mod:`dicom_node.routing`)."""
        self.store = store
        self.routing = routing or InferenceSettings()
        self.on_queued = on_queued
        self.sessions = sessions
        self.duplicate_policy = duplicate_policy
        self.max_inflated_bytes = max_inflated_bytes
        self.max_image_pixels = max_image_pixels
        # Serialises the read-then-write of get-or-create rows between this process's threads;
        # other processes are handled by retrying on a unique-constraint violation.
        self._lock = threading.Lock()

    def ingest(
        self,
        file_meta: FileMetaDataset,
        dataset: Iterable[bytes | memoryview],
        calling_ae: str | None = None,
        expected_sop_class_uid: str | None = None,
    ) -> IngestResult:
        """Make the encoded ``dataset`` (as received, without file meta) durable and indexed.

        Raises:
            Rejected: the dataset is not acceptable or cannot be stored now. No index row was written, and a
            previously acknowledged copy of the same instance is kept.
        """
        try:
            return self._ingest(file_meta, dataset, calling_ae, expected_sop_class_uid)
        except Rejected:
            raise
        # Only the error's type is logged: messages of storage and database errors can carry patient data.
        except OSError as error:
            log.error("storage write failed (%s)", type(error).__name__)
            raise Rejected(StoreStatus.OUT_OF_RESOURCES, f"cannot write to storage: {error.strerror}") from None
        except OperationalError:
            log.error("index write failed (OperationalError)")
            raise Rejected(StoreStatus.OUT_OF_RESOURCES, "index unavailable, try again") from None
        except Exception as error:
            log.error("ingest failed (%s)", type(error).__name__)
            raise Rejected(StoreStatus.PROCESSING_FAILURE, f"internal error ({type(error).__name__})") from None

    def _ingest(
        self,
        file_meta: FileMetaDataset,
        dataset: Iterable[bytes | memoryview],
        calling_ae: str | None,
        expected_sop_class_uid: str | None,
    ) -> IngestResult:
        temporary = self.store.write_temporary([_PREAMBLE, _encode_file_meta(file_meta), *dataset])
        try:
            header, ds = _read_header(
                temporary, file_meta.TransferSyntaxUID, self.max_inflated_bytes, self.max_image_pixels
            )
            relative = self._check(header, file_meta, expected_sop_class_uid)
            queue = self._inference_queue(ds)
            return self._index_and_publish(header, relative, temporary, calling_ae, file_meta.TransferSyntaxUID, queue)
        finally:
            self.store.discard(temporary)  # a no-op once published

    def _inference_queue(self, ds: Dataset) -> str:
        """Where the instance's inference job waits on PostgreSQL: the queue of the models it is routed to. A header
        routing cannot read goes to the queue of all models, whose worker records why."""
        try:
            return inference_queue(route(ds, self.routing).models(self.routing))
        except Exception:
            return inference_queue(self.routing.tasks)

    def _check(
        self, header: InstanceHeader, file_meta: FileMetaDataset, expected_sop_class_uid: str | None
    ) -> PurePosixPath:
        if not header.patient_id:
            raise Rejected(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "PatientID is missing")
        if len(header.patient_id) > _MAX_PATIENT_ID:
            raise Rejected(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "PatientID is longer than 64 characters")
        if not header.sop_class_uid:
            raise Rejected(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID is missing")
        if header.sop_class_uid != (expected_sop_class_uid or file_meta.MediaStorageSOPClassUID):
            raise Rejected(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID does not match the request")
        if _is_image_storage(header.sop_class_uid) and not header.has_pixel_data:
            raise Rejected(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "PixelData is missing")
        try:
            relative = self.store.relative_path(
                header.patient_id, header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
        except InvalidIdentifier as error:
            raise Rejected(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(error)) from None
        if header.sop_instance_uid != file_meta.MediaStorageSOPInstanceUID:
            # Seen from archives that rewrote one and not the other; the dataset is what readers will see.
            log.warning(
                "%s sent as %s: indexed by the dataset's UID",
                header.sop_instance_uid,
                file_meta.MediaStorageSOPInstanceUID,
            )
        return relative

    def _index_and_publish(
        self,
        header: InstanceHeader,
        relative: PurePosixPath,
        temporary: Path,
        calling_ae: str | None,
        transfer_syntax_uid: str,
        queue: str,
    ) -> IngestResult:
        size = temporary.stat().st_size
        for attempt in range(1, _INTEGRITY_RETRIES + 1):
            try:
                with self._lock:
                    return self._transaction(header, relative, temporary, size, calling_ae, transfer_syntax_uid, queue)
            except IntegrityError:  # another process inserted the same patient/study/series first
                if attempt == _INTEGRITY_RETRIES:
                    raise Rejected(StoreStatus.OUT_OF_RESOURCES, "index conflict, try again") from None
        raise AssertionError("unreachable")

    def _transaction(
        self,
        header: InstanceHeader,
        relative: PurePosixPath,
        temporary: Path,
        size: int,
        calling_ae: str | None,
        transfer_syntax_uid: str,
        queue: str,
    ) -> IngestResult:
        with self.sessions() as session:
            existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid))
            if existing is not None and self.duplicate_policy == "keep_first":
                self._restore_if_missing(PurePosixPath(existing.path), temporary)
                return IngestResult(
                    Outcome.DUPLICATE_IGNORED,
                    header.sop_instance_uid,
                    PurePosixPath(existing.path),
                    header.patient_id,
                    header.study_instance_uid,
                )

            series = index_series(session, header)
            previous = PurePosixPath(existing.path) if existing is not None else None
            instance = existing if existing is not None else Instance(sop_instance_uid=header.sop_instance_uid)
            session.add(instance)
            instance.series = series
            instance.sop_class_uid = header.sop_class_uid
            instance.transfer_syntax_uid = transfer_syntax_uid
            instance.instance_number = header.instance_number
            instance.rows, instance.columns = header.rows, header.columns
            instance.path = str(relative)
            instance.size_bytes = size
            instance.calling_ae = calling_ae
            instance.received_at = dt.datetime.now(dt.UTC)
            enqueue(session, instance, INFERENCE_JOB, queue)
            session.flush()

            set_aside = self.store.set_aside(previous) if previous is not None else None
            try:
                self.store.publish(temporary, relative)
                session.commit()
            except BaseException:
                # The acknowledged copy goes back in place. The new file is not deleted: a commit that
                # reported an error may still have reached the database, and then its row points at it.
                if set_aside is not None:
                    self.store.restore(set_aside, previous)
                raise
        if set_aside is not None:
            set_aside.unlink(missing_ok=True)
        self.on_queued()
        outcome = Outcome.STORED if previous is None else Outcome.REPLACED
        return IngestResult(outcome, header.sop_instance_uid, relative, header.patient_id, header.study_instance_uid)

    def _restore_if_missing(self, relative: PurePosixPath, temporary: Path) -> None:
        """A duplicate whose indexed file is gone (lost after an uncertain commit) puts it back."""
        if not self.store.absolute(relative).exists():
            log.warning("file of an indexed instance was missing; stored the copy sent again")
            self.store.publish(temporary, relative)


def index_series(session: Session, header: InstanceHeader) -> Series:
    """Get or create the patient, study and series rows of ``header``."""
    patient = session.scalar(select(Patient).where(Patient.patient_id == header.patient_id))
    if patient is None:
        patient = Patient(
            patient_id=header.patient_id,
            storage_key=patient_key(header.patient_id),
            name=header.patient_name,
            sex=header.patient_sex,
            birth_date=header.patient_birth_date,
        )
        session.add(patient)
    study = session.scalar(select(Study).where(Study.study_instance_uid == header.study_instance_uid))
    if study is not None and study.patient is not patient:
        raise Rejected(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID is indexed under another patient"
        )
    if study is None:
        study = Study(
            study_instance_uid=header.study_instance_uid,
            patient=patient,
            study_date=header.study_date,
            accession_number=header.accession_number,
            description=header.study_description,
        )
        session.add(study)
    series = session.scalar(select(Series).where(Series.series_instance_uid == header.series_instance_uid))
    if series is not None and series.study is not study:
        raise Rejected(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SeriesInstanceUID is indexed under another study")
    if series is None:
        series = Series(
            series_instance_uid=header.series_instance_uid,
            study=study,
            modality=header.modality,
            body_part_examined=header.body_part_examined,
            description=header.series_description,
        )
        session.add(series)
    return series


def _encode_file_meta(file_meta: FileMetaDataset) -> bytes:
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, file_meta, enforce_standard=True)
    return buffer.getvalue()


def _read_header(
    path: Path, transfer_syntax_uid: str, max_inflated_bytes: int, max_pixels: int
) -> tuple[InstanceHeader, Dataset]:
    """Parse the whole dataset, leaving large values on disk, and refuse it if it was cut short or claims more
    than ``max_pixels`` pixels (nothing is decoded here; the workers would decode it). Returns what the index
    keeps and the parsed dataset."""
    deflated = transfer_syntax_uid == uid.DeflatedExplicitVRLittleEndian
    if deflated:
        _check_inflated_size(path, max_inflated_bytes)
    # A deflated dataset is parsed from its inflated copy in memory, where deferred offsets mean nothing.
    defer = None if deflated else _DEFER_BYTES
    try:
        ds = pydicom.dcmread(path, defer_size=defer)
        truncated = _is_truncated(ds, path.stat().st_size)  # before any access converts the raw elements
        header = InstanceHeader.from_dataset(ds)
        _check_pixel_count(ds, max_pixels)
    except ImageTooLarge as error:
        raise TooLarge(str(error)) from None
    except Exception as error:  # pydicom raises many types on malformed input; all mean the same here
        raise Rejected(StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be decoded ({type(error).__name__})") from None
    if truncated:
        raise Rejected(StoreStatus.CANNOT_UNDERSTAND, "dataset is truncated")
    return header, ds


def _check_pixel_count(ds: Dataset, max_pixels: int) -> None:
    """Refuse an image that claims more than ``max_pixels``; one whose dimensions are not numbers (``badVR.dcm``'s
    Number of Frames '1A') is stored as received, as any peer would keep it, and its job records why it cannot be
    read."""
    try:
        check_pixel_count(ds, max_pixels)
    except ImageTooLarge:
        raise
    except UnsupportedImage:
        pass


def _check_inflated_size(path: Path, limit: int) -> None:
    """Refuse a deflated dataset that would inflate beyond ``limit`` bytes (pydicom inflates it whole), or that is
    no raw deflate stream at all (PS3.5 A.5: RFC 1951 without zlib header)."""
    with open(path, "rb") as file:
        file.seek(dataset_offset(path))
        inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
        try:
            while block := file.read(1 << 20):
                while block:
                    inflated += len(inflater.decompress(block, 1 << 22))
                    if inflated > limit:
                        raise TooLarge(f"deflated dataset inflates beyond {limit >> 20} MiB")
                    block = inflater.unconsumed_tail
                if inflater.eof:
                    return
        except zlib.error:
            raise Rejected(StoreStatus.CANNOT_UNDERSTAND, "deflated dataset cannot be inflated") from None


def _is_truncated(ds: Dataset, stream_size: int) -> bool:
    """Whether the last element holds fewer bytes than its length says.

    pydicom reads a short final value without complaint; a dataset cut off in transit or by a faulty
    modality would otherwise be acknowledged and fail only later, in the workers.
    """
    if not ds:
        return False
    last = ds.get_item(max(ds.keys()), keep_deferred=True)  # the raw element, its value not read
    if not isinstance(last, RawDataElement) or last.length == _UNDEFINED_LENGTH:
        return False
    if last.value is None:  # deferred: still on disk
        return last.value_tell + last.length > stream_size
    return len(last.value) < last.length


def _is_image_storage(sop_class_uid: str) -> bool:
    """Image storage SOP classes require Pixel Data (PS3.3 C.7.6.3, Type 1)."""
    return "Image Storage" in uid.UID(sop_class_uid).name


def _text(ds: Dataset, keyword: str) -> str | None:
    """The value as received; a multi-valued one (a backslash in the value) joined back with backslashes."""
    value = ds.get(keyword)
    if value is None or isinstance(value, bytes):
        return None
    text = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
    return text.strip() or None


def _date(ds: Dataset, keyword: str) -> dt.date | None:
    text = _text(ds, keyword)
    if not text:
        return None
    try:
        value = DA(text)
    except ValueError:
        return None
    return dt.date(value.year, value.month, value.day) if value else None


def _integer(ds: Dataset, keyword: str) -> int | None:
    """An integer that fits the index (32 bits), else None: the file keeps the value as sent."""
    try:
        value = ds.get(keyword)
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is not None and -(2**31) <= number < 2**31 else None


def _fitted(ds: Dataset, keyword: str, column) -> str | None:
    """Text for an index column, cut to the column's length (a longer value breaks the VR, not the node)."""
    text = _text(ds, keyword)
    return text[: column.type.length] if text else text
