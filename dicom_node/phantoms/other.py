"""Radiograph phantoms of body parts that are neither a hand nor a foot: what the anatomy check must call "other".

Five regions, drawn with the same bones, soft tissue and exposure as the hands and feet so that the check cannot
tell them apart by the drawing style alone: a knee (AP), a chest (PA), a pelvis (AP), a skull (PA) and a forearm
with the elbow (AP, no wrist or hand, cut off above the carpus). Dimensions are adult millimetres times ``size``;
the origin lies in the middle of the region, +y upwards (cranial, or distal for the limbs).
"""

from __future__ import annotations

import numpy as np

from dicom_node.phantoms.radiograph import Canvas, ellipse, long_bone, unit

OTHER_REGIONS = ("knee", "chest", "pelvis", "skull", "forearm")
OTHER_EXTENT_MM = (-180.0, 180.0)  # the height the placement must fit, as HAND_EXTENT_MM is for hands


def draw_other(canvas: Canvas, region: str, size: float, rng: np.random.Generator) -> None:
    """Draw ``region`` (one of :data:`OTHER_REGIONS`) onto ``canvas``."""
    drawers = {"knee": _knee, "chest": _chest, "pelvis": _pelvis, "skull": _skull, "forearm": _forearm}
    if region not in drawers:
        raise ValueError(f"unknown region {region!r}; expected one of {OTHER_REGIONS}")
    drawers[region](canvas, size, rng)


def _at(x: float, y: float, size: float) -> np.ndarray:
    """A point given in adult millimetres, at ``size``."""
    return np.array([x, y], float) * size


def _knee(canvas: Canvas, size: float, rng: np.random.Generator) -> None:
    canvas.fill(canvas.tissue, long_bone(_at(0, -180, size), _at(0, 180, size), 150 * size, 0.8), 1.0)
    femur = long_bone(_at(0, 180, size), _at(0, 12, size), 85 * size, waist=0.4)
    canvas.bone_shape(femur, density=1.1)
    for side in (-1, 1):  # the condyles
        canvas.bone_shape(ellipse(_at(side * 20, 22, size), 19 * size, 16 * size), 1.0, 0.6)
    tibia = long_bone(_at(0, -8, size), _at(0, -180, size), 80 * size, waist=0.45)
    canvas.bone_shape(tibia, density=1.1)
    fibula = long_bone(_at(38, -22, size), _at(34, -180, size), 17 * size, waist=0.6)
    canvas.bone_shape(fibula, density=1.0)
    canvas.bone_shape(ellipse(_at(0, 30, size), 22 * size, 25 * size), 0.6, 0.5)  # patella, seen through


def _chest(canvas: Canvas, size: float, rng: np.random.Generator) -> None:
    canvas.fill(canvas.tissue, ellipse(np.zeros(2), 175 * size, 190 * size, points=60), 1.1)
    for side in (-1, 1):  # the lungs: air, so less tissue
        canvas.fill(canvas.tissue, ellipse(_at(side * 70, 10, size), 55 * size, 120 * size), -0.7)
    for level in range(12):  # the spine
        y = 150 - level * 26
        canvas.bone_shape(ellipse(_at(0, y, size), 16 * size, 10 * size), 0.9, 0.5)
    for level in range(10):  # ribs: arcs from the spine outwards and down
        y = 135 - level * 24
        for side in (-1, 1):
            arc = [
                _at(side * (14 + 120 * np.sin(t)), y - 40 * (1 - np.cos(t)) - 30 * t, size)
                for t in np.linspace(0, 2.2, 12)
            ]
            for start, end in zip(arc, arc[1:], strict=False):
                canvas.bone_shape(long_bone(start, end, 9 * size, waist=0.9), 0.55, 0.7)
    for side in (-1, 1):  # clavicles
        start, end = _at(side * 12, 165, size), _at(side * 140, 180, size)
        canvas.bone_shape(long_bone(start, end, 14 * size, waist=0.8), 0.9)
    canvas.fill(canvas.tissue, ellipse(_at(20, -20, size), 60 * size, 55 * size), 0.6)  # the heart


def _pelvis(canvas: Canvas, size: float, rng: np.random.Generator) -> None:
    canvas.fill(canvas.tissue, ellipse(np.zeros(2), 180 * size, 170 * size, points=60), 1.2)
    for side in (-1, 1):
        canvas.bone_shape(ellipse(_at(side * 75, 60, size), 60 * size, 55 * size, side * 25), 0.8, 0.7)
        canvas.bone_shape(ellipse(_at(side * 50, -30, size), 30 * size, 25 * size), 0.9, 0.4)  # obturator
        canvas.bone_shape(ellipse(_at(side * 95, -10, size), 24 * size, 24 * size), 1.1, 0.6)  # femoral head
        neck = long_bone(_at(side * 95, -10, size), _at(side * 125, -60, size), 32 * size)
        canvas.bone_shape(neck, 1.0)
        shaft = long_bone(_at(side * 125, -55, size), _at(side * 115, -180, size), 40 * size)
        canvas.bone_shape(shaft, 1.1)
    canvas.bone_shape(ellipse(_at(0, 55, size), 30 * size, 45 * size), 0.9, 0.6)  # sacrum
    for level in range(3):
        canvas.bone_shape(ellipse(_at(0, 120 + level * 30, size), 22 * size, 12 * size), 0.95, 0.5)


def _skull(canvas: Canvas, size: float, rng: np.random.Generator) -> None:
    vault = ellipse(np.zeros(2), 78 * size, 100 * size, points=60)
    canvas.fill(canvas.tissue, ellipse(np.zeros(2), 86 * size, 110 * size, points=60), 1.0)
    canvas.bone_shape(vault, density=1.0, medulla=0.92)
    for side in (-1, 1):  # orbits: less bone
        canvas.fill(canvas.bone, ellipse(_at(side * 30, -10, size), 18 * size, 16 * size), -0.3)
    canvas.bone_shape(ellipse(_at(0, -75, size), 50 * size, 22 * size), 0.9, 0.6)  # maxilla
    canvas.bone_shape(long_bone(_at(-55, -70, size), _at(55, -70, size), 20 * size), 0.9)


def _forearm(canvas: Canvas, size: float, rng: np.random.Generator) -> None:
    canvas.fill(canvas.tissue, long_bone(_at(0, -180, size), _at(0, 150, size), 90 * size, 0.85), 1.0)
    humerus = long_bone(_at(0, -180, size), _at(0, -95, size), 60 * size, waist=0.5)
    canvas.bone_shape(humerus, 1.1)
    angle = float(rng.normal(0, 4))
    for x, width in ((-16, 22), (16, 18)):  # radius and ulna, ending well above the wrist
        start = _at(x, -92, size)
        canvas.bone_shape(long_bone(start, start + unit(angle) * 230 * size, width * size, waist=0.6), 1.05)
