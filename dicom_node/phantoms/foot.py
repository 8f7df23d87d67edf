"""A dorsoplantar (DP) foot radiograph phantom for the four classes of the foot model.

- Normal: hallux valgus angle (HVA) 3-12 degrees, intermetatarsal angle (IMA) 5-8 degrees.
- Hallux Valgus: HVA 18-45 degrees (clinically > 15; the band 12-18 is left out so that every label is
  decidable), IMA widened to 10-18 degrees, a medial eminence on the first metatarsal head and a bunion.
- Flatfoot: on a DP view, talonavicular uncoverage (the navicular slides laterally off the talar head), an
  abducted forefoot and a medial midfoot bulge.
- Foot Ulcer: a crater through the skin and fat over the first or fifth metatarsal head or the heel, with a
  swollen rim and gas lucencies in the soft tissue beside it.
The finding's box covers the region that shows the sign. Frame: origin at the midfoot, +y towards the toes,
-x towards the hallux (medial); millimetres of an adult foot, scaled by ``size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.phantoms.radiograph import Canvas, ellipse, long_bone, perpendicular, unit
from inference.model_card import HALLUX_VALGUS_CLASSES

FOOT_CLASSES = HALLUX_VALGUS_CLASSES  # the classes of the foot model
FOOT_EXTENT_MM = (-150.0, 180.0)
NORMAL_HVA, HALLUX_VALGUS_HVA = (3.0, 12.0), (18.0, 45.0)
NORMAL_IMA, HALLUX_VALGUS_IMA = (5.0, 8.0), (10.0, 18.0)

# name: (base x, base y, angle relative to the second metatarsal, length, width); the first one's angle is -IMA
METATARSALS = {
    "mt1": (-21.0, -2.0, None, 62.0, 15.0),
    "mt2": (-9.0, 1.0, 0.0, 76.0, 9.5),
    "mt3": (2.0, -1.0, 5.0, 71.0, 9.0),
    "mt4": (12.0, -5.0, 10.0, 67.0, 9.0),
    "mt5": (21.0, -11.0, 16.0, 64.0, 10.0),
}
# phalanges of each ray, proximal to distal: (length, width)
TOES = {
    "mt1": [(31.0, 13.0), (26.0, 12.0)],
    "mt2": [(27.0, 8.0), (11.0, 7.5), (9.0, 7.0)],
    "mt3": [(24.0, 8.0), (10.0, 7.0), (8.0, 6.5)],
    "mt4": [(21.0, 7.5), (9.0, 7.0), (8.0, 6.5)],
    "mt5": [(19.0, 7.5), (8.0, 7.0), (7.0, 6.5)],
}
# name: (x, y, rx, ry, angle)
TARSALS = {
    "calcaneus": (12.0, -118.0, 20.0, 28.0, 8.0),
    "talus": (-4.0, -88.0, 17.0, 22.0, 12.0),
    "talar head": (-13.0, -60.0, 12.0, 10.0, 0.0),
    "navicular": (-15.0, -38.0, 15.0, 7.5, -12.0),
    "cuboid": (15.0, -42.0, 12.0, 15.0, 10.0),
    "medial cuneiform": (-21.0, -17.0, 7.5, 11.0, 0.0),
    "intermediate cuneiform": (-9.0, -15.0, 5.5, 8.0, 0.0),
    "lateral cuneiform": (2.0, -17.0, 6.5, 9.5, 0.0),
}
OUTLINE = np.array(
    [
        [-24, -150], [30, -150], [40, -100], [37, -40], [44, 20], [47, 60], [42, 80], [25, 95],
        [0, 100], [-25, 98], [-40, 85], [-41, 60], [-37, 20], [-31, -40], [-30, -100],
    ],
    float,
)  # fmt: skip
JOINT_GAP_MM = 3.0
ULCER_SITES = ("first metatarsal head", "fifth metatarsal head", "heel")


@dataclass(frozen=True)
class FootTruth:
    foot_class: str
    hallux_valgus_angle: float
    intermetatarsal_angle: float
    finding_box: tuple[int, int, int, int] | None  # pixels; None for a normal foot


def draw_foot(canvas: Canvas, foot_class: str, size: float, rng: np.random.Generator) -> FootTruth:
    if foot_class not in FOOT_CLASSES:
        raise ValueError(f"unknown foot class {foot_class!r}; expected one of {FOOT_CLASSES}")
    hallux_valgus = foot_class == "Hallux Valgus"
    flatfoot = foot_class == "Flatfoot"
    hva = float(rng.uniform(*(HALLUX_VALGUS_HVA if hallux_valgus else NORMAL_HVA)))
    ima = float(rng.uniform(*(HALLUX_VALGUS_IMA if hallux_valgus else NORMAL_IMA)))
    abduction = float(rng.uniform(8, 13) if flatfoot else rng.uniform(-2, 2))

    def mm(point) -> np.ndarray:
        return np.asarray(point, float) * size

    canvas.fill(canvas.tissue, mm(OUTLINE), 1.0)
    finding: list[np.ndarray] = []
    tarsal_shift = {"navicular": (rng.uniform(7, 10), 0.0), "talar head": (-6.0, 0.0)} if flatfoot else {}
    for name, (x, y, rx, ry, angle) in TARSALS.items():
        dx, dy = tarsal_shift.get(name, (0.0, 0.0))
        outline = ellipse(
            mm((x + dx, y + dy)), rx * size, ry * size, angle + (15.0 if flatfoot and name == "talus" else 0.0)
        )
        canvas.bone_shape(outline, density=0.85, medulla=0.6)
        if flatfoot and name in ("talar head", "navicular"):
            finding.append(outline)

    second_axis = -3.0 + abduction
    heads = {}
    for name, (x, y, relative, length, width) in METATARSALS.items():
        angle = second_axis - ima if relative is None else second_axis + relative
        start = mm((x, y))
        end = start + unit(angle) * length * size
        outline = long_bone(start, end, width * size)
        canvas.bone_shape(outline, density=1.05, name=name)
        heads[name] = (end, angle, width * size)
        toe_angle = angle + hva if name == "mt1" else angle * 0.5
        _toe(canvas, name, end, toe_angle, size)
        canvas.fill(
            canvas.tissue,
            long_bone(start, end + unit(toe_angle) * _toe_length(name) * size, (width + 12) * size, 0.9),
            0.4,
        )

    mt1_end, mt1_angle, mt1_width = heads["mt1"]
    across = perpendicular(unit(mt1_angle))  # towards +x, i.e. lateral
    for side in (-1, 1):  # sesamoids under the first metatarsal head
        canvas.bone_shape(
            ellipse(mt1_end - unit(mt1_angle) * 9 * size + across * side * 4 * size, 3.5 * size, 4 * size), 0.9
        )
    if hallux_valgus:
        eminence = ellipse(
            mt1_end - across * mt1_width * 0.5 - unit(mt1_angle) * 6 * size, (3 + 0.12 * (hva - 15)) * size, 7 * size
        )
        canvas.bone_shape(eminence, density=0.95, medulla=0.4)
        canvas.fill(canvas.tissue, ellipse(mt1_end - across * mt1_width * 0.9, 9 * size, 14 * size), 0.9)
        finding += [eminence, canvas.drawn_mm["hallux p1"], mt1_end + (canvas.drawn_mm["mt1"] - mt1_end) * 0.4]
    if flatfoot:
        bulge = ellipse(mm((-33.0, -52.0)), 9 * size, 20 * size)
        canvas.fill(canvas.tissue, bulge, 0.7)
        finding.append(bulge)
    if foot_class == "Foot Ulcer":
        finding.append(_ulcer(canvas, heads, size, rng))

    box = canvas.box(np.concatenate(finding), margin_mm=6 * size) if finding else None
    return FootTruth(foot_class, hva, ima, box)


def _toe_length(ray: str) -> float:
    return sum(length for length, _ in TOES[ray]) + JOINT_GAP_MM * len(TOES[ray]) + 6


def _toe(canvas: Canvas, ray: str, metatarsal_head: np.ndarray, angle: float, size: float) -> None:
    direction = unit(angle)
    position = metatarsal_head + direction * JOINT_GAP_MM * size
    for index, (length, width) in enumerate(TOES[ray]):
        end = position + direction * length * size
        name = "hallux p1" if ray == "mt1" and index == 0 else None
        canvas.bone_shape(long_bone(position, end, width * size), density=0.95, name=name)
        position = end + direction * JOINT_GAP_MM * size


def _ulcer(canvas: Canvas, heads: dict, size: float, rng: np.random.Generator) -> np.ndarray:
    """Cut a crater through the skin edge and sprinkle gas lucencies beside it; returns its region."""
    site = ULCER_SITES[int(rng.integers(len(ULCER_SITES)))]
    if site == "first metatarsal head":
        end, angle, width = heads["mt1"]
        center, inward = end - perpendicular(unit(angle)) * (width / 2 + 9 * size), perpendicular(unit(angle))
    elif site == "fifth metatarsal head":
        end, angle, width = heads["mt5"]
        center, inward = end + perpendicular(unit(angle)) * (width / 2 + 9 * size), -perpendicular(unit(angle))
    else:
        center, inward = np.array([3.0, -146.0]) * size, np.array([0.0, 1.0])  # at the skin of the heel
    radius = rng.uniform(14, 19) * size
    canvas.fill(canvas.tissue, ellipse(center + inward * radius, radius * 1.7, radius * 1.7), 0.6)  # swollen rim
    crater_center = center + inward * radius * 0.35  # deep enough to reach the fat over the bone
    angles = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    crater = crater_center + np.stack([np.cos(angles), np.sin(angles)], 1) * radius * rng.uniform(0.8, 1.15, (28, 1))
    canvas.fill(canvas.tissue, crater, -5.0)  # clipped at zero: air where skin and fat were
    bubbles = []
    for _ in range(int(rng.integers(5, 9))):
        spot = center + inward * rng.uniform(radius * 1.1, radius * 2.2) + rng.normal(0, radius * 0.45, 2)
        bubble = ellipse(spot, rng.uniform(1.8, 3.2) * size, rng.uniform(1.8, 3.2) * size, points=12)
        canvas.fill(canvas.tissue, bubble, -2.0)
        bubbles.append(bubble)
    return np.concatenate([crater, *bubbles])
