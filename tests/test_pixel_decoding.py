"""Pixels of every transfer syntax the listener accepts can be decoded with the installed plugins."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom import uid

from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES
from tests.pydicom_corpus import TEST_FILES, storage_files

# pydicom's deliberately damaged samples: decoding must raise, never return made-up pixels.
UNDECODABLE = {
    "MR_truncated.dcm": "pixel data cut short",
    "JPEG-lossy.dcm": "misplaced JPEG marker segment",
    "JPEG2000-embedded-sequence-delimiter.dcm": "corrupt JPEG 2000 header",
    "badVR.dcm": "NumberOfFrames is not a number",
}
IMAGES = [item for item in storage_files() if item.has_pixel_data and item.name not in UNDECODABLE]

# Lossless encodings of MR_small.dcm that pydicom ships: each must decode to exactly the same pixels.
LOSSLESS_TWINS_OF_MR_SMALL = [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
]


def read(name_or_path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(TEST_FILES / name_or_path)


def test_every_accepted_transfer_syntax_but_one_has_a_sample() -> None:
    covered = {item.transfer_syntax_uid for item in IMAGES}
    assert {item.name for item in storage_files()} >= set(UNDECODABLE)
    # No sample of JPEG Lossless process 14 with other selection values exists in pydicom's data;
    # its decoder is the same libjpeg path as the SV1 variant, which is covered.
    assert set(ACCEPTED_TRANSFER_SYNTAXES) - covered == {uid.JPEGLossless}


@pytest.mark.parametrize("item", IMAGES, ids=lambda item: item.name)
def test_pixels_decode(item) -> None:
    ds = read(item.path)
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = (ds.Rows, ds.Columns) if frames == 1 else (frames, ds.Rows, ds.Columns)
    assert pixels.shape[: len(expected)] == expected
    assert np.ptp(pixels) > 0, "decoded to a constant image"


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_damaged_pixel_data_raises(name: str) -> None:
    with pytest.raises((RuntimeError, ValueError)):
        _ = read(name).pixel_array


@pytest.mark.parametrize("name", LOSSLESS_TWINS_OF_MR_SMALL)
def test_lossless_encodings_decode_to_identical_pixels(name: str) -> None:
    reference = read("MR_small.dcm").pixel_array
    assert np.array_equal(read(name).pixel_array, reference)
