"""Model input from a radiograph: aspect-preserving resize into a square with padding, then normalisation.

:class:`Letterbox` remembers where the image went inside the square, so that a heatmap computed on the
model's input can be mapped back onto the original image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow
from PIL import Image


@dataclass(frozen=True)
class Letterbox:
    """Placement of an image of ``rows`` x ``columns`` inside a ``size`` x ``size`` square."""

    rows: int
    columns: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.rows, self.columns)

    @property
    def inner(self) -> tuple[int, int, int, int]:
        """(x0, y0, width, height) of the image inside the square."""
        width = max(round(self.columns * self.scale), 1)
        height = max(round(self.rows * self.scale), 1)
        return (self.size - width) // 2, (self.size - height) // 2, width, height

    def to_square(self, image: np.ndarray | Image.Image, fill: float = 0.0) -> np.ndarray:
        """``image`` (float32, rows x columns, or its :func:`as_picture`) resized and centred in the square,
        padded with ``fill``."""
        x0, y0, width, height = self.inner
        resized = np.asarray(as_picture(image).resize((width, height), Image.BILINEAR, reducing_gap=2.0))
        square = np.full((self.size, self.size), fill, np.float32)
        square[y0 : y0 + height, x0 : x0 + width] = resized
        return square

    def to_image(self, square_map: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """A map over the square (any resolution) cropped to the image and resized to rows x columns, or to
        ``size`` (width, height)."""
        factor = square_map.shape[0] / self.size
        x0, y0, width, height = (round(value * factor) for value in self.inner)
        crop = np.ascontiguousarray(square_map[y0 : y0 + max(height, 1), x0 : x0 + max(width, 1)], np.float32)
        return np.asarray(Image.fromarray(crop).resize(size or (self.columns, self.rows), Image.BILINEAR))

    def point_to_image(self, x: float, y: float) -> tuple[float, float]:
        """A point of the square (pixel coordinates) in image pixel coordinates."""
        x0, y0, _, _ = self.inner
        return (x - x0) / self.scale, (y - y0) / self.scale


def as_picture(image: np.ndarray | Image.Image) -> Image.Image:
    """A float32 image as a Pillow image: made once, it serves the inputs of several models.

    The picture shares the array's memory through the Arrow C data interface (Pillow's ``fromarray`` would copy
    a radiograph's 20 MB of float32 pixels), so the array must not change while the picture is in use."""
    if isinstance(image, Image.Image):
        return image
    pixels = np.ascontiguousarray(image, np.float32)
    rows, columns = pixels.shape
    return Image.fromarrow(pyarrow.array(pixels.reshape(-1)), "F", (columns, rows))


def model_input(
    image: np.ndarray | Image.Image, size: int, mean: float, std: float, shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, Letterbox]:
    """The normalised square input for a model of input ``size`` and where the image lies in it. ``shape`` is
    (rows, columns) of the image ``image`` is a scaled-down copy of (:func:`inference.pixels.reduced`): the
    letterbox places that image, so that heatmaps map onto its pixels."""
    rows, columns = shape or ((image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2])
    box = Letterbox(rows, columns, size)
    return (box.to_square(image) - mean) / std, box
