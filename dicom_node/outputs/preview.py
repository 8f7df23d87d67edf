"""The radiograph kept for the Secondary Captures, from the inference job to the outputs job.

The inference job has the radiograph's pixels at hand; it keeps them scaled to the pictures' size
(:func:`preview`) in a file beside the instance's heatmaps (:func:`preview_path`), stamped with the identity of
the file they were read from (:func:`source_stamp`: its inode, size and modification time). The outputs job draws
on a preview of the shape its pictures need whose stamp is that of the file stored now (a replaced instance has
a new file: an older run's preview is never drawn under newer results), then deletes it; otherwise it decodes the
source. It is a cache: losing it costs a decoding, never a result.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from dicom_node.outputs.render import resized

Stamp = tuple[int, int, int]  # inode, size, modification time (ns) of the source file


def preview(radiograph: np.ndarray, max_size: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """``radiograph`` (float in [0, 1]) as gray uint8, scaled down (never up) so that its longest side is at most
    ``max_size``: what :func:`dicom_node.outputs.render.render` draws a picture of that size from. ``shape``:
    (rows, columns) of the full-size image, where ``radiograph`` is a reduced copy of it
    (:func:`inference.pixels.reduced`)."""
    height, width = preview_shape(*(shape or radiograph.shape), max_size)
    return np.rint(np.clip(resized(radiograph, width, height), 0.0, 1.0) * 255.0).astype(np.uint8)


def preview_shape(rows: int, columns: int, max_size: int) -> tuple[int, int]:
    """(rows, columns) of the :func:`preview` of an image of ``rows`` x ``columns``."""
    scale = min(1.0, max_size / max(rows, columns))
    return max(int(rows * scale), 1), max(int(columns * scale), 1)


def preview_path(heatmap_path: str | PurePosixPath) -> PurePosixPath:
    """The preview's file, beside the instance's heatmaps file."""
    return PurePosixPath(heatmap_path).with_suffix(".preview.npz")


def source_stamp(path: Path) -> Stamp:
    """What tells the file at ``path`` from a file that replaced it."""
    status = os.stat(path)
    return status.st_ino, status.st_size, status.st_mtime_ns


def preview_bytes(pixels: np.ndarray, stamp: Stamp) -> bytes:
    """The content of a preview file: ``pixels`` and the stamp of the file they were read from."""
    buffer = io.BytesIO()
    np.savez(buffer, pixels=pixels, source=np.array(stamp, np.int64))
    return buffer.getvalue()


def load_preview(path: Path, shape: tuple[int, int], stamp: Stamp) -> np.ndarray | None:
    """The preview at ``path`` when it is of ``shape`` and read from the file of ``stamp``; None otherwise (none
    kept, another shape, another source file, a torn write)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            pixels, source = stored["pixels"], tuple(int(value) for value in stored["source"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return pixels if pixels.dtype == np.uint8 and pixels.shape == shape and source == stamp else None
