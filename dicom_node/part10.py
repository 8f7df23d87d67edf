"""The layout of a DICOM file (PS3.10 section 7.1): a 128-byte preamble, ``DICM``, the File Meta Information
group (its first element, 12 bytes, gives the length of the rest), then the dataset as it was encoded."""

from __future__ import annotations

from pathlib import Path

import pydicom

PREAMBLE_AND_PREFIX = 128 + 4
GROUP_LENGTH_ELEMENT = 12


def dataset_offset(path: Path) -> int:
    """Where the encoded dataset begins in the file at ``path``."""
    meta_length = pydicom.filereader.read_file_meta_info(path).FileMetaInformationGroupLength
    return PREAMBLE_AND_PREFIX + GROUP_LENGTH_ELEMENT + meta_length


def encoded_dataset(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, without preamble and file meta, exactly as on disk."""
    return Path(path).read_bytes()[dataset_offset(path) :]
