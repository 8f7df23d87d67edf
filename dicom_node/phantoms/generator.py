"""``dicom-node phantoms``: a deterministic set of synthetic DX files and their ``labels.csv``.

Image ``i`` of seed ``s`` depends on ``(s, i)`` alone, so a larger set extends a smaller one, and sets of
disjoint seeds never share an image (training and evaluation sets are made with different seeds).
"""

from __future__ import annotations

import csv
import datetime as dt
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom import uid

from dicom_node.phantoms.foot import FOOT_CLASSES, FOOT_EXTENT_MM, draw_foot
from dicom_node.phantoms.hand import FULL_MATURITY_MONTHS, HAND_EXTENT_MM, draw_hand, growth, maturity
from dicom_node.phantoms.other import OTHER_EXTENT_MM, OTHER_REGIONS, draw_other
from dicom_node.phantoms.radiograph import MAX_VALUE, Canvas, Placement, clear_of, expose, random_exposure
from dicom_node.synthetic import Demographics, dx_dataset
from inference.training.labels import LABEL_COLUMNS, PhantomLabel

Task = Literal["hand", "foot", "other", "both", "all"]
Kind = Literal["hand", "foot", "other"]
CYCLES: dict[str, tuple[Kind, ...]] = {"both": ("hand", "foot"), "all": ("hand", "foot", "other")}
COMPRESSIONS = {"none": None, "jpeg-ls": uid.JPEGLSLossless, "rle": uid.RLELossless}
SIDE_RANGE = (1500, 3000)  # pixels, each side
MONOCHROME1_SHARE = 0.3
WINDOW_SHARE = 0.5
HIGHEST_MATURITY = 0.94  # bone ages are drawn below full fusion, where the image still tells them apart
LOWEST_BONE_AGE_MONTHS = 12.0
CHRONOLOGICAL_SD_MONTHS = 10.0  # spread of chronological around bone age, about one reference SD


def generate_phantoms(
    out: Path, count: int, seed: int, task: Task = "both", compression: str = "none", workers: int = 1
) -> list[PhantomLabel]:
    """Write ``count`` phantoms as DICOM files into ``out`` with ``labels.csv``; return the labels.

    ``compression`` (a key of :data:`COMPRESSIONS`) stores the pixels losslessly compressed. ``workers``
    processes draw images in parallel; the files and ``labels.csv`` are the same for any number of them.
    """
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (out, seed, index, CYCLES[task][index % len(CYCLES[task])] if task in CYCLES else task, compression)
        for index in range(count)
    ]
    labels = []
    with (out / "labels.csv").open("w", newline="") as file, ProcessPoolExecutor(workers) as pool:
        writer = csv.DictWriter(file, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        for label in pool.map(_write_phantom, jobs) if workers > 1 else map(_write_phantom, jobs):
            # a row per finished file, in index order, so that an interrupted set is still a valid (smaller) set
            writer.writerow({key: "" if value is None else value for key, value in asdict(label).items()})
            file.flush()
            labels.append(label)
    return labels


def _write_phantom(job: tuple[Path, int, int, Kind, str]) -> PhantomLabel:
    out, seed, index, kind, compression = job
    ds, label = render_phantom(seed, index, kind)
    if COMPRESSIONS[compression] is not None:
        ds.compress(COMPRESSIONS[compression])
    ds.save_as(out / label.file, enforce_file_format=True)
    return label


def render_phantom(seed: int, index: int, kind: Kind):
    """The DICOM dataset and label of phantom ``index`` of ``seed``: a hand, a foot, or another body part."""
    rng = np.random.default_rng([seed, index, ("hand", "foot", "other").index(kind)])
    sex = str(rng.choice(["F", "M"]))
    laterality = str(rng.choice(["L", "R"]))
    rows = int(rng.integers(2000, 2600))
    columns = int(np.clip(rows * rng.uniform(0.72, 0.85), *SIDE_RANGE))
    if kind == "hand":
        bone_age = float(rng.uniform(LOWEST_BONE_AGE_MONTHS, HIGHEST_MATURITY * FULL_MATURITY_MONTHS[sex]))
        age = float(np.clip(bone_age + rng.normal(0, CHRONOLOGICAL_SD_MONTHS), 3.0, 240.0))
        extent, size = HAND_EXTENT_MM, growth(maturity(bone_age, sex))
    elif kind == "foot":
        foot_class = FOOT_CLASSES[int(rng.integers(len(FOOT_CLASSES)))]
        age = float(rng.uniform(20 * 12, 80 * 12))
        extent, size = FOOT_EXTENT_MM, float(rng.uniform(0.85, 1.05))
    else:
        region = str(rng.choice(OTHER_REGIONS))
        age = float(rng.uniform(20 * 12, 80 * 12))
        extent, size = OTHER_EXTENT_MM, float(rng.uniform(0.8, 1.05))
    height_mm = (extent[1] - extent[0]) * size
    spacing = height_mm / (rows * rng.uniform(0.70, 0.82))  # room for rotation and collimation
    middle_mm = (extent[0] + extent[1]) / 2 * size
    placement = Placement(
        rows=rows,
        columns=columns,
        spacing_mm=round(float(spacing), 4),
        center_px=(
            columns / 2 + rng.normal(0, columns * 0.03),
            rows / 2 + middle_mm / spacing + rng.normal(0, rows * 0.02),
        ),
        rotation_deg=float(rng.uniform(-10, 10)),
        mirrored=laterality == "L",
    )
    canvas = Canvas(placement)
    if kind == "hand":
        truth = draw_hand(canvas, bone_age, sex, rng)
        box, foot_class, hva, ima = truth.wrist_box, None, None, None
    elif kind == "foot":
        truth = draw_foot(canvas, foot_class, size, rng)
        box, hva, ima = truth.finding_box, truth.hallux_valgus_angle, truth.intermetatarsal_angle
        bone_age = None
    else:
        draw_other(canvas, region, size, rng)
        box, foot_class, hva, ima, bone_age = None, None, None, None, None
    exposure = random_exposure(rng, laterality)
    if box is not None:  # the finding must stay in the exposed field: every label decidable from the image
        exposure = clear_of(exposure, box, rows, columns)
    pixels = expose(canvas, exposure, rng)

    monochrome1 = bool(rng.random() < MONOCHROME1_SHARE)
    window = _window(pixels) if rng.random() < WINDOW_SHARE else None
    if monochrome1:
        pixels = MAX_VALUE - pixels
        window = (MAX_VALUE - window[0], window[1]) if window else None
    study_date = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 1000)))
    patient_id = f"PH{seed:04d}-{index:05d}"
    who = Demographics(
        patient_id=patient_id,
        patient_name=f"PHANTOM^{kind.upper()}^{index:05d}",
        sex=sex,
        birth_date=study_date - dt.timedelta(days=round(age * 30.4375)),
        study_date=study_date,
        accession_number=f"PH{seed % 10000:04d}{index:06d}",
        body_part=region.upper() if kind == "other" else kind.upper(),
        view_position="PA" if kind == "hand" else "AP",
        laterality=laterality,
    )
    ds = dx_dataset(
        pixels,
        who,
        pixel_spacing_mm=placement.spacing_mm,
        monochrome1=monochrome1,
        window=window,
        **{
            f"{level}_uid": uid.generate_uid(entropy_srcs=[str(seed), str(index), kind, level])
            for level in ("study", "series", "sop")
        },
    )
    view = {"hand": "HAND PA", "foot": "FOOT DP"}.get(kind) or f"{region.upper()} AP"
    ds.SeriesDescription = f"{view} (synthetic phantom)"
    ds.ImageComments = "Synthetic phantom: not a patient image"
    label = PhantomLabel(
        file=f"{kind}_{seed:04d}_{index:05d}.dcm",
        task=kind,
        sex=sex,
        chronological_age_months=round(age, 2),
        bone_age_months=None if bone_age is None else round(bone_age, 2),
        foot_class=foot_class,
        hallux_valgus_angle_deg=None if hva is None else round(hva, 2),
        intermetatarsal_angle_deg=None if ima is None else round(ima, 2),
        finding_x0=box[0] if box else None,
        finding_y0=box[1] if box else None,
        finding_x1=box[2] if box else None,
        finding_y1=box[3] if box else None,
        photometric_interpretation=ds.PhotometricInterpretation,
        patient_id=patient_id,
    )
    return ds, label


def _window(pixels: np.ndarray) -> tuple[float, float]:
    """A VOI window around the anatomy: the 1st to 99th percentile of a subsample."""
    low, high = np.percentile(pixels[::8, ::8], [1, 99])
    return float((low + high) / 2), float(max(high - low, 1.0))
