"""PNGs for the viewer: a stored radiograph in gray, and a result's heatmap to lay over it.

Both are drawn at the same size for the same ``max_size`` (:func:`display_size`), so that the heatmap's PNG
lies pixel for pixel over the image's. The heatmap is coloured as in the Secondary Captures (jet) and
transparent where the Secondary Captures show the radiograph untouched; its alpha rises to 255 at the peak, so
that the viewer chooses the opacity (``MAX_OPACITY`` gives the Secondary Captures' look).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from dicom_node.outputs.render import MAX_OPACITY, TRANSPARENT_BELOW, jet
from inference.pixels import radiograph_pixels
from inference.predict import Heatmap

__all__ = ["MAX_OPACITY", "display_size", "heatmap_png", "image_png"]

_PNG_COMPRESSION = 3  # fast: a PNG per request, not an archive


def display_size(rows: int, columns: int, max_size: int) -> tuple[int, int]:
    """(width, height) of an image of ``rows`` x ``columns`` scaled down (never up) to fit ``max_size``."""
    scale = min(1.0, max_size / max(rows, columns))
    return max(round(columns * scale), 1), max(round(rows * scale), 1)


def image_png(ds: Dataset, max_size: int) -> bytes:
    """The image of ``ds`` through its VOI (bone bright), 8-bit gray; raises
    :class:`inference.pixels.UnsupportedImage` for a dataset without an image."""
    pixels = radiograph_pixels(ds)
    size = display_size(*pixels.shape[:2], max_size)
    shown = np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR, reducing_gap=2.0))
    gray = np.rint(np.clip(shown, 0.0, 1.0) * 255.0).astype(np.uint8)
    return _png(Image.fromarray(gray))


def heatmap_png(heatmap: Heatmap, max_size: int) -> bytes:
    """The heatmap over the image it was computed on, as RGBA at :func:`display_size`."""
    box = heatmap.letterbox
    heat = heatmap.resized(*display_size(box.rows, box.columns, max_size))
    alpha = np.clip((heat - TRANSPARENT_BELOW) / (1.0 - TRANSPARENT_BELOW), 0.0, 1.0)
    rgba = np.concatenate([jet(heat), alpha[..., None]], axis=-1)
    return _png(Image.fromarray(np.rint(rgba * 255.0).astype(np.uint8)))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_COMPRESSION)
    return buffer.getvalue()
