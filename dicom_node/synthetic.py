"""Synthetic Digital X-Ray (DX) instances for tests and benchmarks of the DICOM path.

:func:`dx_dataset` wraps any pixel array in a realistic DX header; :func:`synthetic_dx` fills it with smooth
noise, to give the network and storage realistic sizes and attributes. The anatomical phantoms with ground
truth for the models (:mod:`dicom_node.phantoms`) use :func:`dx_dataset` too.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import uid
from pydicom.dataset import FileDataset, FileMetaDataset
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

_BITS_STORED = 12


@dataclass(frozen=True)
class Demographics:
    """Who and what a synthetic X-ray shows; realistic values, none of them a real person's."""

    patient_id: str = "SYNTH-0001"
    patient_name: str = "Synthetic^Patient"
    sex: str = "F"
    birth_date: dt.date = dt.date(2015, 3, 1)
    study_date: dt.date = dt.date(2026, 1, 15)
    accession_number: str = "ACC000000"
    body_part: str = "HAND"
    view_position: str = "PA"
    laterality: str = "R"


def dx_dataset(
    pixels: np.ndarray,
    who: Demographics,
    *,
    pixel_spacing_mm: float = 0.15,
    monochrome1: bool = False,
    window: tuple[float, float] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> FileDataset:
    """A DX For Presentation instance (PS3.3 A.26) holding ``pixels`` (12-bit, uint16), explicit VR LE.

    ``monochrome1`` stores the pixels as given but labels them MONOCHROME1 (bright = low attenuation), as
    some CR/DX systems do; the caller inverts the values for that case.
    """
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ValueError("pixels must be a 2-D uint16 array")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid or uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    acquired = dt.datetime.combine(who.study_date, dt.time(10, 30))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or uid.generate_uid()
    ds.SeriesInstanceUID = series_uid or uid.generate_uid()
    ds.PatientID = who.patient_id
    ds.PatientName = who.patient_name
    ds.PatientSex = who.sex
    ds.PatientBirthDate = who.birth_date.strftime("%Y%m%d")
    ds.StudyDate = ds.ContentDate = acquired.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = acquired.strftime("%H%M%S")
    ds.AccessionNumber = who.accession_number
    ds.StudyID = "1"
    ds.StudyDescription = f"XR {who.body_part}"
    ds.SeriesDescription = f"{who.body_part} {who.view_position}"
    ds.Modality = "DX"
    ds.BodyPartExamined = who.body_part
    ds.ViewPosition = who.view_position
    ds.ImageLaterality = who.laterality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"] if who.laterality == "R" else ["R", "F"]
    ds.ImagerPixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = round(window[0], 1), round(window[1], 1)
    ds.PixelData = pixels.tobytes()
    return ds


def synthetic_dx(
    patient_id: str = "SYNTH-0001",
    patient_name: str = "Synthetic^Patient",
    *,
    side: int = 512,
    seed: int = 0,
    body_part: str = "HAND",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> FileDataset:
    """A DX instance of ``side`` x ``side`` smooth 12-bit noise, for tests of the DICOM path."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 2**_BITS_STORED, size=(side // 64 + 2, side // 64 + 2)).astype(np.float32)
    pixels = np.kron(coarse, np.ones((64, 64), np.float32))[:side, :side]
    pixels += rng.normal(0, 40, size=(side, side))
    pixels = np.clip(pixels, 0, 2**_BITS_STORED - 1).astype(np.uint16)
    who = Demographics(patient_id, patient_name, accession_number=f"ACC{seed:06d}", body_part=body_part)
    return dx_dataset(pixels, who, window=(2048, 4096), study_uid=study_uid, series_uid=series_uid)


def write_synthetic_dx(directory: Path, count: int, *, side: int = 512, patient_prefix: str = "SYNTH") -> list[Path]:
    """Write ``count`` synthetic DX files to ``directory``, one patient and study each."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        ds = synthetic_dx(f"{patient_prefix}-{number:04d}", side=side, seed=number)
        path = directory / f"dx_{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
