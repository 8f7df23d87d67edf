"""pydicom's bundled test files, as a corpus of what real modalities and archives send."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom.presentation import AllStoragePresentationContexts

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
STORAGE_SOP_CLASSES = {context.abstract_syntax for context in AllStoragePresentationContexts}
IDENTIFIERS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    has_identifiers: bool
    has_pixel_data: bool

    @property
    def name(self) -> str:
        return str(self.path.relative_to(TEST_FILES))


def storage_files() -> list[CorpusFile]:
    """Every bundled file in the DICOM File Format (with file meta) whose SOP class is a storage class."""
    found = []
    for path in sorted(TEST_FILES.rglob("*")):
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError):
            continue
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
        if transfer_syntax is None or ds.get("SOPClassUID") not in STORAGE_SOP_CLASSES:
            continue
        found.append(
            CorpusFile(
                path=path,
                sop_class_uid=ds.SOPClassUID,
                sop_instance_uid=ds.get("SOPInstanceUID", ""),
                transfer_syntax_uid=transfer_syntax,
                patient_id=str(ds.get("PatientID", "")),
                has_identifiers=all(ds.get(keyword) for keyword in IDENTIFIERS),
                has_pixel_data="PixelData" in ds,
            )
        )
    return found
