"""Synthetic Digital X-Ray (DX) instances for tests and benchmarks of the DICOM path.

The pixels are smooth noise, not anatomy: they exist to give the network and storage realistic sizes and
attributes. Anatomical phantoms with ground truth for the models are a separate generator.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom import uid
from pydicom.dataset import FileDataset, FileMetaDataset
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

_BITS_STORED = 12


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
    """A DX For Presentation instance (PS3.3 A.26) of ``side`` x ``side`` 12-bit pixels, explicit VR LE."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 2**_BITS_STORED, size=(side // 64 + 2, side // 64 + 2)).astype(np.float32)
    pixels = np.kron(coarse, np.ones((64, 64), np.float32))[:side, :side]
    pixels += rng.normal(0, 40, size=(side, side))
    pixels = np.clip(pixels, 0, 2**_BITS_STORED - 1).astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    now = dt.datetime(2026, 1, 15, 10, 30, 0)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or uid.generate_uid()
    ds.SeriesInstanceUID = series_uid or uid.generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientSex = "F"
    ds.PatientBirthDate = "20150301"
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"ACC{seed:06d}"
    ds.StudyID = "1"
    ds.StudyDescription = f"XR {body_part}"
    ds.SeriesDescription = f"{body_part} PA"
    ds.Modality = "DX"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.PixelSpacing = [0.15, 0.15]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    return ds


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
