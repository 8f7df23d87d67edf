"""A PA hand radiograph phantom whose skeletal maturity follows bone age and sex.

Maturity ``m`` runs from 0 (newborn) to 1 (all growth plates fused). Girls reach each stage earlier than boys
(Greulich and Pyle's separate atlases): here ``m = bone age / 192 months`` for girls and ``/ 216 months`` for
boys, so the same hand reads as a younger bone age on the female scale than on the male one.

What maturity changes, in the order the atlases use it:
- carpal bones ossify one after another (capitate and hamate first, pisiform last) and grow;
- epiphyses of the radius, ulna, metacarpals and phalanges appear, widen towards the width of their
  metaphysis, and finally fuse (the dark physis line closes);
- the whole hand grows.
Dimensions are adult millimetres scaled by growth; positions are in a frame with the origin between the distal
radius and ulna, +y towards the fingertips, +x towards the little finger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.phantoms.radiograph import Canvas, ellipse, long_bone, unit

FULL_MATURITY_MONTHS = {"F": 192.0, "M": 216.0}
HAND_EXTENT_MM = (-100.0, 215.0)  # forearm to fingertips, adult: the height the placement must fit

# name: (x, y, rx, ry, maturity at which ossification starts)
CARPALS = {
    "capitate": (0.0, 22.0, 8.0, 11.0, 0.01),
    "hamate": (11.0, 21.0, 7.0, 9.5, 0.02),
    "triquetrum": (12.0, 9.0, 6.0, 6.0, 0.14),
    "lunate": (-1.0, 8.0, 7.0, 6.5, 0.20),
    "trapezium": (-19.0, 21.0, 7.0, 7.0, 0.28),
    "trapezoid": (-10.0, 24.0, 5.5, 6.5, 0.30),
    "scaphoid": (-12.0, 9.0, 6.5, 9.0, 0.32),
    "pisiform": (17.0, 13.0, 4.0, 4.0, 0.50),
}

# ray: (base x, base y, angle, [(length, width) of metacarpal and phalanges, proximal to distal])
RAYS = {
    "thumb": (-18.0, 29.0, -38.0, [(42, 10), (30, 9), (22, 8)]),
    "index": (-10.0, 35.0, -7.0, [(64, 9), (38, 9), (23, 8), (17, 7)]),
    "middle": (0.0, 36.0, 0.0, [(62, 9), (43, 9), (27, 8), (18, 7)]),
    "ring": (9.0, 34.0, 7.0, [(56, 8.5), (40, 8.5), (25, 7.5), (18, 6.5)]),
    "little": (17.0, 31.0, 14.0, [(51, 8), (31, 8), (18, 7), (16, 6)]),
}
JOINT_GAP_MM = 3.0
EPIPHYSIS_ONSET = 0.08  # phalanges and metacarpals
RADIUS_EPIPHYSIS_ONSET = 0.05
ULNA_EPIPHYSIS_ONSET = 0.38
FUSION_START, FUSION_END = 0.80, 0.97
FULL_SIZE_MATURITY = 0.75


def maturity(bone_age_months: float, sex: str) -> float:
    return float(np.clip(bone_age_months / FULL_MATURITY_MONTHS[sex], 0.0, 1.0))


def growth(m: float) -> float:
    """Hand size relative to an adult's."""
    return 0.55 + 0.45 * min(1.0, m / 0.9) ** 0.8


@dataclass(frozen=True)
class HandTruth:
    maturity: float
    growth: float
    ossified_carpals: tuple[str, ...]
    fused_fraction: float  # 0 = all growth plates open, 1 = all fused
    wrist_box: tuple[int, int, int, int]  # pixels: carpals and distal radius/ulna, where maturity shows first


def _ramp(value: float, start: float, end: float) -> float:
    return float(np.clip((value - start) / (end - start), 0.0, 1.0))


def draw_hand(canvas: Canvas, bone_age_months: float, sex: str, rng: np.random.Generator) -> HandTruth:
    m = maturity(bone_age_months, sex)
    scale = growth(m)
    fusion = _ramp(m, FUSION_START, FUSION_END)
    # individual variation: a little jitter of proportions, the same for every bone of this hand
    proportions = 1.0 + rng.normal(0, 0.03)

    def mm(value: float) -> float:
        return value * scale * proportions

    _soft_tissue(canvas, scale * proportions)
    wrist = []
    wrist += _forearm(canvas, m, fusion, mm)
    ossified = []
    for name, (x, y, rx, ry, onset) in CARPALS.items():
        size = _ramp(m, onset, FULL_SIZE_MATURITY) ** 0.7
        if m <= onset or size < 0.08:
            continue
        outline = ellipse(np.array([mm(x), mm(y)]), mm(rx) * size, mm(ry) * size, rng.normal(0, 8))
        canvas.bone_shape(outline, density=0.9, medulla=0.5)
        ossified.append(name)
        wrist.append(outline)
    for name, (x, y, angle, bones) in RAYS.items():
        _ray(canvas, name, np.array([mm(x), mm(y)]), angle + rng.normal(0, 1.5), bones, m, fusion, mm)
    wrist_region = np.concatenate(wrist + [ellipse(np.array([0.0, mm(15)]), mm(26), mm(22))])
    return HandTruth(
        maturity=m,
        growth=scale,
        ossified_carpals=tuple(ossified),
        fused_fraction=fusion,
        wrist_box=canvas.box(wrist_region, margin_mm=mm(4)),
    )


def _forearm(canvas: Canvas, m: float, fusion: float, mm) -> list[np.ndarray]:
    """Distal radius and ulna with their epiphyses; returns the outlines that make up the wrist region."""
    outlines = []
    for x, end_y, width, onset in (
        (-11.0, -6.0, 22.0, RADIUS_EPIPHYSIS_ONSET),
        (12.0, -9.0, 14.0, ULNA_EPIPHYSIS_ONSET),
    ):
        start, end = np.array([mm(x), mm(-100)]), np.array([mm(x), mm(end_y)])
        shaft = long_bone(start, end, mm(width), waist=0.6)
        canvas.bone_shape(shaft, density=1.1)
        outlines.append(ellipse(end, mm(width) / 2, mm(6)))
        epiphysis = _epiphysis(end, 0.0, mm(width), m, onset, fusion)
        if epiphysis is not None:
            canvas.bone_shape(epiphysis, density=0.95, medulla=0.5)
            outlines.append(epiphysis)
    return outlines


def _ray(canvas: Canvas, name: str, base: np.ndarray, angle: float, bones, m: float, fusion: float, mm) -> None:
    """A metacarpal and its phalanges along one direction, each with its epiphysis.

    Metacarpals 2-5 carry the epiphysis distally (the head), the thumb's metacarpal and every phalanx
    proximally (the base).
    """
    direction = unit(angle)
    position = base
    for index, (length, width) in enumerate(bones):
        start, end = position, position + direction * mm(length)
        canvas.bone_shape(long_bone(start, end, mm(width)), density=1.0)
        distal_epiphysis = index == 0 and name != "thumb"
        if distal_epiphysis:
            epiphysis = _epiphysis(end, angle, mm(width), m, EPIPHYSIS_ONSET, fusion)
        else:
            epiphysis = _epiphysis(start, angle + 180.0, mm(width), m, EPIPHYSIS_ONSET, fusion)
        if epiphysis is not None:
            canvas.bone_shape(epiphysis, density=0.9, medulla=0.5)
        position = end + direction * mm(JOINT_GAP_MM) * (1.6 if distal_epiphysis else 1.0)


def _epiphysis(
    bone_end: np.ndarray, outward_deg: float, width: float, m: float, onset: float, fusion: float
) -> np.ndarray | None:
    """The epiphysis beyond ``bone_end``, in the direction ``outward_deg``: absent before ``onset``, then
    widening to the width of the bone, separated by a physis gap that closes as ``fusion`` goes to 1."""
    if m <= onset:
        return None
    size = _ramp(m, onset, FULL_SIZE_MATURITY) ** 0.8
    across = width * (0.25 + 0.75 * size) / 2
    along = max(width * 0.16 * (0.5 + 0.5 * size), 0.5)
    gap = width * 0.22 * (1.0 - fusion)
    outward = unit(outward_deg)
    return ellipse(bone_end + outward * (gap + along * (1.0 - 0.8 * fusion)), across, along, outward_deg)


def _soft_tissue(canvas: Canvas, scale: float) -> None:
    """Forearm, palm and fingers: thickness in the tissue layer (blurred when exposed)."""
    forearm = np.array([[-36, -100], [36, -100], [38, 0], [44, 30], [-44, 30], [-38, 0]], float) * scale
    palm = np.array([[-30, 20], [30, 20], [34, 95], [-24, 100], [-36, 40]], float) * scale
    canvas.fill(canvas.tissue, forearm, 0.85)
    canvas.fill(canvas.tissue, palm, 0.95)
    for x, y, angle, bones in RAYS.values():
        base = np.array([x, y]) * scale
        length = sum(bone[0] for bone in bones) + JOINT_GAP_MM * len(bones) + 8
        width = bones[1][1] + 10
        tip = base + unit(angle) * length * scale
        canvas.fill(canvas.tissue, long_bone(base, tip, width * scale, waist=0.9), 0.8)
