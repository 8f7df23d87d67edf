"""Drawing an X-ray phantom: shapes in millimetres, two attenuation layers, and exposure to 12-bit pixels.

Anatomy is described in an anatomical frame in millimetres (+y towards the fingertips or toes, +x as the
caller's module defines it). A :class:`Canvas` maps that frame to detector pixels
with a rotation, a scale (the pixel spacing), a translation and an optional mirror (left/right), and
accumulates two layers: soft tissue and bone. :func:`expose` turns them into a radiograph: attenuation to
brightness (MONOCHROME2: bone bright), exposure and contrast variation, quantum noise, collimation and a
lead side marker.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

MAX_VALUE = 4095  # 12 bits stored

# Attenuation of each layer in display units (before exposure variation); bone cortex adds up with medulla.
_TISSUE_BRIGHTNESS = 900.0
_BONE_BRIGHTNESS = 1500.0
_AIR_LEVEL = 260.0
_COLLIMATED_LEVEL = 3850.0


def unit(angle_deg: float) -> np.ndarray:
    """The unit vector at ``angle_deg`` from +y, positive towards +x."""
    angle = np.radians(angle_deg)
    return np.array([np.sin(angle), np.cos(angle)])


def perpendicular(direction: np.ndarray) -> np.ndarray:
    """``direction`` turned 90 degrees towards +x when it points along +y."""
    return np.array([direction[1], -direction[0]])


def ellipse(center: np.ndarray, rx: float, ry: float, angle_deg: float = 0.0, points: int = 40) -> np.ndarray:
    """Polygon of an ellipse with semi-axes ``rx`` (across) and ``ry`` (along ``angle_deg``)."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    local = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
    along = unit(angle_deg)
    basis = np.stack([perpendicular(along), along])  # rows: across, along
    return np.asarray(center) + local @ basis


def long_bone(start: np.ndarray, end: np.ndarray, width: float, waist: float = 0.72, points: int = 18) -> np.ndarray:
    """Polygon of a tubular bone from ``start`` to ``end``: full ``width`` at the ends, narrower shaft,
    rounded ends."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    axis = end - start
    length = float(np.hypot(*axis))
    along = axis / length
    across = perpendicular(along)
    t = np.linspace(0.0, 1.0, points)
    half = width / 2 * (waist + (1 - waist) * np.abs(2 * t - 1) ** 3)
    cap = np.linspace(0, np.pi, 9)[1:-1]
    right = start + np.outer(t * length, along) + np.outer(half, across)
    left = start + np.outer(t * length, along) - np.outer(half, across)
    top = end + np.outer(np.sin(cap) * width * 0.22, along) + np.outer(np.cos(cap) * half[-1], across)
    bottom = start - np.outer(np.sin(cap) * width * 0.22, along) - np.outer(np.cos(cap) * half[0], across)
    return np.concatenate([right, top, left[::-1], bottom])


@dataclass(frozen=True)
class Placement:
    """Where the anatomy lies on the detector."""

    rows: int
    columns: int
    spacing_mm: float
    center_px: tuple[float, float]  # (x, y) of the anatomical origin
    rotation_deg: float
    mirrored: bool


class Canvas:
    """Two attenuation layers (soft tissue and bone) on the detector's pixel grid."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.tissue = np.zeros((placement.rows, placement.columns), np.float32)
        self.bone = np.zeros((placement.rows, placement.columns), np.float32)
        self.drawn_mm: dict[str, np.ndarray] = {}  # named bone outlines, for finding boxes and geometry tests
        angle = np.radians(placement.rotation_deg)
        self._rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def to_pixels(self, points_mm: np.ndarray) -> np.ndarray:
        """Anatomical millimetres (y up) to detector pixels (x right, y down)."""
        points = np.atleast_2d(np.asarray(points_mm, float)) / self.placement.spacing_mm
        points = points * np.array([-1.0 if self.placement.mirrored else 1.0, -1.0])
        return points @ self._rotation.T + np.asarray(self.placement.center_px)

    def fill(self, layer: np.ndarray, polygon_mm: np.ndarray, value: float) -> None:
        """Add ``value`` to ``layer`` inside the polygon."""
        polygon = self.to_pixels(polygon_mm)
        x0, y0 = np.floor(polygon.min(axis=0)).astype(int) - 1
        x1, y1 = np.ceil(polygon.max(axis=0)).astype(int) + 2
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, layer.shape[1]), min(y1, layer.shape[0])
        if x1 <= x0 or y1 <= y0:
            return
        mask = Image.new("L", (x1 - x0, y1 - y0))
        ImageDraw.Draw(mask).polygon([tuple(p) for p in polygon - (x0, y0)], fill=255)
        layer[y0:y1, x0:x1] += np.asarray(mask, np.float32) * (value / 255.0)

    def bone_shape(
        self, outline_mm: np.ndarray, density: float = 1.0, medulla: float = 0.55, name: str | None = None
    ) -> None:
        """A bone: dense cortex around a lighter medullary cavity (the outline shrunk by ``medulla``)."""
        if name is not None:
            self.drawn_mm[name] = outline_mm
        self.fill(self.bone, outline_mm, density)
        center = outline_mm.mean(axis=0)
        self.fill(self.bone, center + (outline_mm - center) * medulla, -0.35 * density)

    def box(self, polygon_mm: np.ndarray, margin_mm: float = 0.0) -> tuple[int, int, int, int]:
        """Pixel bounding box (x0, y0, x1, y1) of a region, clipped to the detector."""
        center = polygon_mm.mean(axis=0)
        spread = polygon_mm - center
        grown = center + spread + np.sign(spread) * margin_mm
        pixels = self.to_pixels(grown)
        x0, y0 = np.clip(np.floor(pixels.min(axis=0)), 0, None).astype(int)
        x1 = int(min(np.ceil(pixels[:, 0].max()), self.placement.columns - 1))
        y1 = int(min(np.ceil(pixels[:, 1].max()), self.placement.rows - 1))
        return int(x0), int(y0), x1, y1


@dataclass(frozen=True)
class Exposure:
    """Acquisition variation: brightness gain, contrast (gamma), noise and the collimated field."""

    gain: float
    gamma: float
    noise: float
    collimation: tuple[float, float, float, float]  # fraction of the image collimated at left, top, right, bottom
    marker: str  # "L" or "R"


def clear_of(exposure: Exposure, box: tuple[int, int, int, int], rows: int, columns: int) -> Exposure:
    """The same exposure with the collimator blades moved back so that they leave ``box`` exposed."""
    x0, y0, x1, y1 = box
    margin = 0.01
    left, top, right, bottom = exposure.collimation
    collimation = (
        min(left, max(x0 / columns - margin, 0.0)),
        min(top, max(y0 / rows - margin, 0.0)),
        min(right, max(1 - x1 / columns - margin, 0.0)),
        min(bottom, max(1 - y1 / rows - margin, 0.0)),
    )
    return replace(exposure, collimation=collimation)


def random_exposure(rng: np.random.Generator, laterality: str) -> Exposure:
    return Exposure(
        gain=float(rng.uniform(0.85, 1.15)),
        gamma=float(rng.uniform(0.8, 1.25)),
        noise=float(rng.uniform(0.6, 1.6)),
        collimation=tuple(float(v) for v in rng.uniform(0.0, 0.06, size=4)),
        marker=laterality,
    )


def expose(canvas: Canvas, exposure: Exposure, rng: np.random.Generator) -> np.ndarray:
    """The radiograph as 12-bit MONOCHROME2 pixels (uint16): bone bright, air dark, collimation white."""
    spacing = canvas.placement.spacing_mm
    tissue = _smooth(np.clip(canvas.tissue, 0, None), sigma_px=2.5 / spacing)
    bone = gaussian_filter(np.clip(canvas.bone, 0, None), sigma=0.25 / spacing)
    signal = (_TISSUE_BRIGHTNESS * tissue + _BONE_BRIGHTNESS * bone) * exposure.gain
    signal = MAX_VALUE * (signal / MAX_VALUE) ** exposure.gamma + _AIR_LEVEL
    noisy = signal + rng.normal(0.0, 1.0, signal.shape).astype(np.float32) * exposure.noise * np.sqrt(signal + 100)
    _collimate(noisy, exposure.collimation, rng)
    _side_marker(noisy, exposure.marker, exposure.collimation)
    return np.clip(noisy, 0, MAX_VALUE).astype(np.uint16)


def _smooth(layer: np.ndarray, sigma_px: float) -> np.ndarray:
    """A wide Gaussian blur, computed on a 4x smaller grid: soft-tissue edges are soft anyway."""
    small = np.asarray(Image.fromarray(layer).reduce(4))
    blurred = gaussian_filter(small, sigma=max(sigma_px / 4, 0.5))
    return np.asarray(Image.fromarray(blurred).resize(layer.shape[::-1], Image.BILINEAR))


def _collimate(image: np.ndarray, fractions: tuple[float, float, float, float], rng: np.random.Generator) -> None:
    rows, columns = image.shape
    left, top, right, bottom = fractions
    level = _COLLIMATED_LEVEL + rng.normal(0, 30, size=image.shape).astype(np.float32)
    for region in (
        (slice(None), slice(0, int(left * columns))),
        (slice(0, int(top * rows)), slice(None)),
        (slice(None), slice(columns - int(right * columns), columns)),
        (slice(rows - int(bottom * rows), rows), slice(None)),
    ):
        image[region] = level[region]


def _side_marker(image: np.ndarray, letter: str, collimation: tuple[float, float, float, float]) -> None:
    """A lead letter in the upper corner of the exposed field: it stops the beam, so it shows white."""
    rows, columns = image.shape
    size = max(rows // 25, 24)
    font = ImageFont.load_default(size=size)
    mask = Image.new("L", (size * 2, size * 2))
    ImageDraw.Draw(mask).text((size // 3, size // 6), letter, fill=255, font=font)
    x0 = int(collimation[0] * columns) + size // 2
    y0 = int(collimation[1] * rows) + size // 2
    block = np.asarray(mask, np.float32)[: rows - y0, : columns - x0] / 255.0
    region = image[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]]
    region[:] = region * (1 - block) + 3950.0 * block
