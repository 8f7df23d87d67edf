"""Uploaded images for ``POST /predict``: size limits, the kind by content, and a DICOM file to ingest.

The kind is told by the bytes alone, never by the file name or the declared content type: a DICOM Part 10
file ("DICM" after the 128-byte preamble), or a PNG, JPEG, TIFF or BMP that Pillow opens, verifies and
decodes. Anything else is refused with 415. The decoded image is held to :data:`MAX_IMAGE_PIXELS`
(decompression-bomb protection: a small PNG can claim gigapixels), a DICOM upload's deflated dataset to
``dicom.max_inflated_mb``, as for images received by the SCP.

A DICOM upload is ingested as it was sent (it carries its own identity). A picture becomes a Secondary Capture
(8-bit MONOCHROME2 from the image's luminance) with the given PatientID and sex, new UIDs, and BodyPartExamined
the task declares (FOOT, HAND ...), so that the node's routing runs that task.
"""

from __future__ import annotations

import datetime as dt
import io
import uuid
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
import pydicom
from fastapi import HTTPException, status
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicom_node.ai_tasks.registry import task_type
from dicom_node.config import InferenceSettings, TaskName
from dicom_node.routing import Route, route

ACCEPTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
# Decoded pixels an uploaded picture may have: a large radiograph has about 4300 x 3500 (15 million).
MAX_IMAGE_PIXELS = 50_000_000
# What a request may carry beyond the image itself: the multipart boundaries and form fields, the JSON around
# the base64 text.
ENVELOPE_BYTES = 256 * 1024
MAX_PATIENT_ID = 64  # VR LO
DEFAULT_PATIENT_PREFIX = "UPLOAD-"
_PREAMBLE_LENGTH = 128
_PREFIX = b"DICM"

Sex = Literal["M", "F"]


class UploadRefused(HTTPException):
    """An upload the node does not take: the status and the reason, in words."""


def too_large(limit_bytes: int) -> UploadRefused:
    return UploadRefused(
        status.HTTP_413_CONTENT_TOO_LARGE, f"the image is larger than the upload limit of {_mib(limit_bytes)}"
    )


def read_limited(stream: BinaryIO, limit_bytes: int) -> bytes:
    """At most ``limit_bytes`` of ``stream``; 413 when there is more (one byte more is read to know)."""
    data = stream.read(limit_bytes + 1)
    if len(data) > limit_bytes:
        raise too_large(limit_bytes)
    if not data:
        raise UploadRefused(status.HTTP_422_UNPROCESSABLE_CONTENT, "the image is empty")
    return data


@dataclass(frozen=True)
class PreparedUpload:
    """A DICOM file to ingest: its file meta, its encoded dataset, and its header (for routing)."""

    kind: str  # "DICOM" or the picture's format
    file_meta: FileMetaDataset
    dataset: bytes
    header: Dataset
    route: Route


def prepare(
    data: bytes,
    settings: InferenceSettings,
    max_inflated_bytes: int,
    patient_id: str | None = None,
    sex: Sex | None = None,
    task: TaskName | None = None,
) -> PreparedUpload:
    """The upload as a DICOM file the node's routing sends to ``task`` (or to any task when None).

    Raises:
        UploadRefused: 413 too large once decoded, 415 not an accepted kind, 422 corrupt, or a DICOM file that
        contradicts ``patient_id`` or ``sex``, or that no model (or not ``task``) runs on.
    """
    routed = [name for name in settings.tasks if name != settings.gate]
    if task is not None and task not in routed:
        why = f"; {task} looks at every image first" if task == settings.gate else ""
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"no task {task!r} runs here (tasks: {', '.join(routed)}){why}"
        )
    if is_dicom(data):
        prepared = _dicom_upload(data, settings, max_inflated_bytes, patient_id, sex)
    else:
        gray, kind = decode_picture(data)
        part10 = secondary_capture(gray, patient_id or new_patient_id(), sex, task, kind)
        prepared = _dicom_upload(part10, settings, max_inflated_bytes, None, None, kind)
    if not prepared.route.tasks:
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"no model runs on this image: {prepared.route.reason}"
        )
    if task is not None and task not in prepared.route.tasks:
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"the node's routing sends this image to {', '.join(prepared.route.tasks)}, not {task} "
            f"({prepared.route.reason})",
        )
    return prepared


def is_dicom(data: bytes) -> bool:
    return data[_PREAMBLE_LENGTH : _PREAMBLE_LENGTH + len(_PREFIX)] == _PREFIX


def new_patient_id() -> str:
    """The PatientID of an upload that gave none: a new one each time, returned in the response."""
    return DEFAULT_PATIENT_PREFIX + uuid.uuid4().hex[:12].upper()


def check_patient_id(value: str | None) -> str | None:
    """A given PatientID without surrounding spaces, 1-64 characters, no control characters or backslash (the
    DICOM value separator); 422 otherwise."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_PATIENT_ID:
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"patient_id must have 1 to {MAX_PATIENT_ID} characters"
        )
    if "\\" in value or any(ord(character) < 0x20 or ord(character) == 0x7F for character in value):
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "patient_id must not hold a backslash or control characters"
        )
    return value


# --- pictures -----------------------------------------------------------------------------------------------


def decode_picture(data: bytes) -> tuple[np.ndarray, str]:
    """The picture's luminance as 8-bit gray (rows x columns) and its format; the first frame of a multi-page
    TIFF. EXIF orientation is applied."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                kind = str(image.format)
                _check_pixels(image.size)
                image.verify()  # the structure (chunks, CRCs) before any pixel is decoded
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                image.load()
                return _luminance(ImageOps.exif_transpose(image)), kind
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb() from None
    except UnidentifiedImageError:
        raise UploadRefused(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "not an image the node takes: send a DICOM Part 10 file, or a PNG, JPEG, TIFF or BMP",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:  # truncated, corrupt
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"the image cannot be decoded ({type(error).__name__}: {error})"
        ) from None


def _check_pixels(size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise UploadRefused(status.HTTP_422_UNPROCESSABLE_CONTENT, f"the image has no pixels ({width} x {height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise _bomb(f" ({width} x {height})")


def _bomb(size: str = "") -> UploadRefused:
    return UploadRefused(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"the image decodes to more than {MAX_IMAGE_PIXELS:,} pixels{size} (decompression-bomb protection)",
    )


def _luminance(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float gray: stretched to 8 bits
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return np.rint(scaled).astype(np.uint8)
    if image.mode != "L":
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
        image = image.convert("L")  # ITU-R 601-2 luma; transparency is dropped
    return np.asarray(image, dtype=np.uint8)


def secondary_capture(
    gray: np.ndarray, patient_id: str, sex: Sex | None, task: TaskName | None, kind: str = "picture"
) -> bytes:
    """A Secondary Capture Image (PS3.3 A.8.1) of 8-bit MONOCHROME2 ``gray``, as a Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * _PREAMBLE_LENGTH)
    now = dt.datetime.now()
    ds.SpecificCharacterSet = "ISO_IR 192"  # the PatientID is free text
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid.generate_uid()
    ds.SeriesInstanceUID = uid.generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = sex or ""
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "HTTP upload"
    ds.SeriesDescription = f"HTTP upload ({kind})"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"  # workstation: a picture sent to the API
    if task is not None and task_type(task).body_part:
        ds.BodyPartExamined = task_type(task).body_part
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = gray.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    pixels = np.ascontiguousarray(gray, np.uint8).tobytes()
    ds.PixelData = pixels + (b"\x00" if len(pixels) % 2 else b"")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- DICOM --------------------------------------------------------------------------------------------------


def _dicom_upload(
    data: bytes,
    settings: InferenceSettings,
    max_inflated_bytes: int,
    patient_id: str | None,
    sex: Sex | None,
    kind: str = "DICOM",
) -> PreparedUpload:
    """Split a Part 10 file into file meta and dataset, read its header and check it against the request."""
    file_meta, offset = _file_meta(data)
    if file_meta.get("TransferSyntaxUID") == uid.DeflatedExplicitVRLittleEndian:
        _check_inflated_size(memoryview(data)[offset:], max_inflated_bytes)
    try:
        # values beyond 4 KiB (the pixels) stay unread: the ingest reads and checks the whole dataset
        header = pydicom.dcmread(io.BytesIO(data), defer_size=4096)
        patient, patient_sex = str(header.get("PatientID") or "").strip(), str(header.get("PatientSex") or "")
        routed = route(header, settings)  # reads the values routing needs, such as ImageType
    except Exception as error:  # pydicom raises many types on malformed input, NotImplementedError for an unknown VR
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"the DICOM file cannot be decoded ({type(error).__name__})"
        ) from None
    if patient_id is not None and patient_id != patient:
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "patient_id differs from the DICOM file's PatientID; a DICOM upload is stored as it was sent",
        )
    if sex is not None and sex != patient_sex.strip():
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "sex differs from the DICOM file's PatientSex; a DICOM upload is stored as it was sent",
        )
    return PreparedUpload(kind, file_meta, data[offset:], header, routed)


def _file_meta(data: bytes) -> tuple[FileMetaDataset, int]:
    """The file meta group of a Part 10 file and where the dataset begins after it."""
    stream = io.BytesIO(data)
    stream.seek(_PREAMBLE_LENGTH + len(_PREFIX))
    try:
        meta = FileMetaDataset(
            read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=_beyond_file_meta)
        )
        missing = [key for key in ("MediaStorageSOPClassUID", "TransferSyntaxUID") if not meta.get(key)]
    except Exception as error:
        raise UploadRefused(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"the DICOM file meta cannot be read ({type(error).__name__})"
        ) from None
    if missing:
        raise UploadRefused(status.HTTP_422_UNPROCESSABLE_CONTENT, f"the DICOM file meta lacks {', '.join(missing)}")
    return meta, stream.tell()


def _beyond_file_meta(tag, vr, length) -> bool:
    return tag >> 16 != 2


def _check_inflated_size(deflated: memoryview, limit: int) -> None:
    inflater, inflated, block = zlib.decompressobj(-zlib.MAX_WBITS), 0, bytes(deflated)
    try:
        while block:
            inflated += len(inflater.decompress(block, 1 << 22))
            if inflated > limit:
                raise UploadRefused(
                    status.HTTP_413_CONTENT_TOO_LARGE,
                    f"the deflated dataset inflates beyond {_mib(limit)} (dicom.max_inflated_mb)",
                )
            block = inflater.unconsumed_tail
    except zlib.error:
        raise UploadRefused(status.HTTP_422_UNPROCESSABLE_CONTENT, "the deflated dataset cannot be inflated") from None


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB"


# --- the request body ---------------------------------------------------------------------------------------


class UploadLimit:
    """ASGI middleware: a POST to one of ``limits``' paths may carry at most that many bytes. A larger declared
    Content-Length is refused with 413 before the body is read; a body without one (chunked) is counted as it
    arrives and refused once past the limit, so nothing larger is ever spooled to disk."""

    def __init__(self, app: ASGIApp, limits: dict[str, tuple[int, int]]) -> None:
        """``limits``: path -> (the body's limit in bytes, the image's limit to name in the reason)."""
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = self.limits.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if limits is None:
            await self.app(scope, receive, send)
            return
        body_limit, image_limit = limits
        refusal = too_large(image_limit)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > body_limit:
            response = JSONResponse({"detail": refusal.detail}, refusal.status_code, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > body_limit:
                    raise refusal  # FastAPI passes an HTTPException raised while reading the body on as it is
            return message

        await self.app(scope, counted, send)
