"""From a DICOM X-ray to display-ready pixels: bone bright, values in [0, 1].

The order is that of the grayscale pipeline of PS3.4 N.2.1: decode the stored values, apply the Modality LUT
(rescale slope and intercept, or a Modality LUT Sequence), then the VOI LUT (a window, PS3.3 C.11.2.1.2, or a
VOI LUT Sequence), and finally the Presentation LUT implied by the photometric interpretation: MONOCHROME1
shows low values bright, so it is inverted to the MONOCHROME2 convention the models use. Without a VOI, the
image is stretched between robust percentiles of its own values.

For integer pixels of up to 16 bits, the pipeline runs once per stored value that occurs (a lookup table), and
the image is mapped through the table in one pass: the same result as applying each step to every pixel, for
a fraction of the time on a 4-megapixel radiograph. A dataset read with its Pixel Data left in the file
(``dcmread(path, defer_size=...)``) that holds native unsigned 16-bit values has them read from the file into
the array in one copy, not two (file to bytes, bytes to array).
"""

from __future__ import annotations

import numpy as np
from pydicom import uid
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, pixel_array

from inference.codestream import declared_size

# The node reduces radiographs to no less than this many pixels (``outputs.max_image_size``) before its grayscale
# pipeline and its models; the models' evaluation (``dicom-node evaluate``) reduces them the same way.
DEFAULT_PICTURE_SIZE = 1024

# ``dcmread(path, defer_size=DEFERRED_PIXEL_DATA)`` leaves values larger than this (the Pixel Data) in the file
DEFERRED_PIXEL_DATA = 1 << 16  # bytes

# Without a VOI, these percentiles of the image map to 0 and 1: collimator blades and markers do not set the range.
STRETCH_PERCENTILES = (0.5, 99.5)


class UnsupportedImage(ValueError):
    """The dataset holds no image the models can read."""


class ImageTooLarge(UnsupportedImage):
    """The image claims more pixels than the node decodes: a decompression bomb, or simply too large."""


def dimensions(ds: Dataset) -> tuple[int, int, int]:
    """Rows, Columns and Number of Frames as the header states them (PS3.3 C.7.6.3, C.7.6.6): what decoding
    would allocate, whatever the size of the (compressed) Pixel Data. 0 rows or columns where absent, 1 frame."""
    try:
        return int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as error:  # a multi-valued or non-numeric value
        raise UnsupportedImage(f"the image's dimensions are not numbers ({type(error).__name__})") from None


def check_pixel_count(ds: Dataset, max_pixels: int) -> None:
    """Raise :class:`ImageTooLarge` when ``ds`` claims more than ``max_pixels`` pixels (``dicom.max_image_pixels``),
    Rows x Columns x Number of Frames, before anything is decoded."""
    rows, columns, frames = dimensions(ds)
    count = rows * columns * frames
    if count > max_pixels:
        raise ImageTooLarge(f"{count} pixels exceed dicom.max_image_pixels")  # fits an ErrorComment (LO, 64)


def check_codestream(ds: Dataset) -> None:
    """Raise :class:`UnsupportedImage` when the first compressed frame's codestream declares other dimensions than
    Rows and Columns (PS3.5 8.2 requires them to agree; a decoder would allocate what the codestream declares)."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not uid.UID(syntax).is_encapsulated:
        return
    rows, columns, frames = dimensions(ds)
    try:
        first = next(generate_frames(ds.PixelData, number_of_frames=frames))
    except (ValueError, TypeError, StopIteration) as error:
        raise UnsupportedImage(f"the Pixel Data is not encapsulated (PS3.5 A.4): {type(error).__name__}") from None
    declared, header = declared_size(first), (rows, columns)
    if declared is not None and declared != header:
        raise UnsupportedImage(
            f"the codestream declares {declared[0]} x {declared[1]} pixels, Rows x Columns {header[0]} x {header[1]}"
        )


def radiograph_pixels(ds: Dataset, max_pixels: int | None = None, reduce_to: int | None = None) -> np.ndarray:
    """The image of ``ds`` as float32 in [0, 1], MONOCHROME2 convention (high attenuation bright); an image of more
    than ``max_pixels``, or whose codestream disagrees with its header, is refused before it is decoded.

    With ``reduce_to``, stored integer values are first averaged over blocks of 2 x 2 pixels where the longest side
    stays at least ``reduce_to`` pixels (:func:`reduced`): the pipeline then runs on a quarter of the pixels, and
    the image returned is half Rows x Columns."""
    if "PixelData" not in ds:
        raise UnsupportedImage("the dataset has no Pixel Data")
    if max_pixels is not None:
        check_pixel_count(ds, max_pixels)
    check_codestream(ds)
    full = _first_frame(ds)
    # a stretch takes its range from the full image: averaging blocks would narrow it
    stored = reduced(full, reduce_to) if reduce_to is not None and full.ndim == 2 and full.dtype.kind in "ui" else full
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return _colour_to_gray(ds, stored)
    if stored.dtype.kind in "ui" and stored.dtype.itemsize <= 2:
        return _through_lookup_table(stored, ds, photometric, full)
    return _grayscale_pipeline(stored, ds, photometric, full)


def reduced(values: np.ndarray, at_least: int) -> np.ndarray:
    """Integer ``values`` (rows x columns) averaged over blocks of 2 x 2, rounded, where the longest side is at least
    twice ``at_least`` (else ``values`` as they are). The last row and column that make no whole block are left out.

    Averaging before the grayscale pipeline is not the same as after it where a window or stretch clips (the mean
    of clipped noise is not the clipped mean); with blocks of 2 x 2 the pictures drawn stay within one grey level
    of those drawn from every pixel (tests/test_secondary_capture.py), with larger blocks they did not."""
    if max(values.shape) < 2 * at_least:
        return values
    rows, columns = values.shape[0] // 2 * 2, values.shape[1] // 2 * 2
    total = values[0:rows:2, 0:columns:2].astype(np.uint32 if values.dtype.kind == "u" else np.int32)
    total += values[1:rows:2, 0:columns:2]
    total += values[0:rows:2, 1:columns:2]
    total += values[1:rows:2, 1:columns:2]
    return ((total + 2) // 4).astype(values.dtype)


def _first_frame(ds: Dataset) -> np.ndarray:
    """The stored values of the first frame. pydicom raises ValueError for Pixel Data shorter than the header's
    dimensions say (PS3.5 8.1.1), RuntimeError when no decoder reads the codestream and AttributeError when the
    Image Pixel module lacks an element it needs (Samples per Pixel, say): damaged data, which no retry reads, so
    :class:`UnsupportedImage`."""
    from_file = _native_values_from_file(ds)
    if from_file is not None:
        return from_file
    frames = dimensions(ds)[2]
    try:
        return pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError) as error:  # AttributeError: an element
        raise UnsupportedImage(f"the pixels cannot be decoded: {error}") from None  # decoding needs is missing


def _native_values_from_file(ds: Dataset) -> np.ndarray | None:
    """The values of a single-frame, unsigned 16-bit, little endian native grayscale image whose Pixel Data is still
    in its file, read straight into an array; None for any other image, one whose header pydicom would question,
    or one with bits set above Bits Stored (which pydicom masks), so that pydicom decodes it: the values are those
    of ``ds.pixel_array`` either way."""
    element = ds.get_item("PixelData", keep_deferred=True)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    rows, columns, frames = dimensions(ds)
    bits_stored = ds.get("BitsStored")
    if not (
        isinstance(element, RawDataElement)
        and element.value is None  # deferred: still in the file
        and isinstance(ds.filename, str)
        and syntax in (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)
        and (ds.get("BitsAllocated"), ds.get("SamplesPerPixel"), ds.get("PixelRepresentation")) == (16, 1, 0)
        and isinstance(bits_stored, int)
        and 1 <= bits_stored <= 16
        and str(ds.get("PhotometricInterpretation")) in ("MONOCHROME1", "MONOCHROME2")
        and frames == 1
        and 0 < rows * columns * 2 <= element.length
    ):
        return None
    values = np.fromfile(ds.filename, np.dtype("<u2"), rows * columns, offset=element.value_tell)
    if len(values) < rows * columns or int(values.max()) >> bits_stored:
        return None
    return values.reshape(rows, columns)


def _grayscale_pipeline(values: np.ndarray, ds: Dataset, photometric: str, image: np.ndarray) -> np.ndarray:
    """Modality LUT, VOI and presentation of stored ``values``; a stretch takes its range from ``image``."""
    modality = apply_modality_lut(values, ds).astype(np.float32)
    shown = _apply_voi(modality, ds, image)
    return (1.0 - shown) if photometric == "MONOCHROME1" else shown


def _through_lookup_table(stored: np.ndarray, ds: Dataset, photometric: str, image: np.ndarray) -> np.ndarray:
    """The pipeline of the stored values that occur, as a table, and ``stored`` through it; a stretch takes its
    range from ``image``."""
    # unsigned values index a table from 0 as they are; signed ones are shifted by their minimum
    low = 0 if stored.dtype.kind == "u" else int(stored.min())
    levels = np.arange(low, int(stored.max()) + 1, dtype=np.int64).astype(stored.dtype)
    table = _grayscale_pipeline(levels, ds, photometric, image).astype(np.float32)
    return table[stored] if low == 0 else table[stored.astype(np.int32) - low]


def _apply_voi(values: np.ndarray, ds: Dataset, image: np.ndarray) -> np.ndarray:
    """The VOI of ``ds`` on modality ``values``; without one, a stretch over the range of ``image``."""
    if "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        return window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), function)
    if "VOILUTSequence" in ds:
        return voi_lut(values, ds.VOILUTSequence[0])
    return stretch(values, range_of=apply_modality_lut(_sample(image), ds).astype(np.float32))


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A VOI window of PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT or SIGMOID), with output range [0, 1]."""
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))).astype(np.float32)
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / max(width, 1e-6) + 0.5, 0.0, 1.0).astype(np.float32)
    if width <= 1.0:  # LINEAR with a width of 1 is a threshold
        return (values > center - 0.5).astype(np.float32)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0).astype(np.float32)


def voi_lut(values: np.ndarray, item: Dataset) -> np.ndarray:
    """A VOI LUT (PS3.3 C.11.2.1.1): values below the first mapped one take the first entry, above the last
    the last; the output is scaled by the LUT's largest entry (some vendors declare 16 bits and use 12)."""
    entries, first_mapped, _bits = (int(v) for v in item.LUTDescriptor)
    lut = np.asarray(item.LUTData, np.float32).ravel()[: entries or 65536]
    index = np.clip(np.rint(values).astype(np.int64) - first_mapped, 0, len(lut) - 1)
    return lut[index] / max(float(lut.max()), 1.0)


def stretch(values: np.ndarray, range_of: np.ndarray | None = None) -> np.ndarray:
    """Map robust percentiles of ``range_of`` (by default a subsample of ``values``) to [0, 1]."""
    sample = _sample(values) if range_of is None else range_of
    low, high = np.percentile(sample, STRETCH_PERCENTILES)
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    out = values.astype(np.float32, copy=True)
    out -= low
    out *= 1.0 / (high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def _sample(image: np.ndarray) -> np.ndarray:
    """About 512 x 512 pixels of a 2-D image, evenly spaced: enough for its percentiles."""
    return image[:: max(image.shape[0] // 512, 1), :: max(image.shape[1] // 512, 1)]


def _colour_to_gray(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Luminance of a colour image (an X-ray saved as RGB, a secondary capture), stretched to [0, 1]."""
    if stored.ndim != 3 or stored.shape[-1] != 3:
        raise UnsupportedImage(f"cannot read {ds.get('PhotometricInterpretation')} with shape {stored.shape}")
    # pydicom hands YBR images over converted to RGB, so one luminance formula serves both
    luminance = stored.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return stretch(luminance)


def _first(value) -> float:
    """The first of a multi-valued window attribute (several windows may be offered)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)
