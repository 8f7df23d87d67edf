"""Labelled images for training and evaluation, in three layouts.

- ``phantom``: a directory written by ``dicom-node phantoms`` (DICOM files and ``labels.csv``).
- ``rsna``: the RSNA Pediatric Bone Age layout: a CSV with columns ``id,boneage,male`` and the images
  ``<id>.png`` in the same directory or a subdirectory.
- ``folders``: one folder per foot class (``Normal``, ``Flatfoot``, ``Foot Ulcer`` or ``Foot_Ulcer``,
  ``Hallux Valgus``), images (PNG, JPEG or DICOM) inside.

For the anatomy check, a phantom set's hands, feet and other body parts (``--task all``); its training adds the
images among pydicom's bundled test files (:func:`pydicom_images`) as more "other" images.

Images become model inputs through the same pixel path and letterbox as inference, so training sees exactly
what the node will feed the model.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import torch
from PIL import Image

from inference.model_card import HALLUX_VALGUS_CLASSES
from inference.pixels import radiograph_pixels, stretch
from inference.preprocess import Letterbox
from inference.training.labels import read_labels

Format = Literal["phantom", "rsna", "folders"]
TaskName = Literal["hallux_valgus", "bone_age", "anatomy"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"}


class DatasetError(ValueError):
    """The data directory does not hold what its format promises."""


@dataclass(frozen=True)
class Example:
    path: Path
    sex: str | None = None
    bone_age_months: float | None = None
    foot_class: int | None = None  # index into HALLUX_VALGUS_CLASSES
    hallux_valgus_angle_deg: float | None = None
    finding_box: tuple[int, int, int, int] | None = None
    anatomy: str | None = None  # hand, foot or other (inference.model_card.ANATOMY_CLASSES)


def read_examples(data: Path, layout: Format, task: TaskName) -> list[Example]:
    readers = {"phantom": _phantom, "rsna": _rsna, "folders": _folders}
    examples = readers[layout](Path(data), task)
    if not examples:
        raise DatasetError(f"{data}: no {task} examples found in the {layout} layout")
    return examples


def _phantom(data: Path, task: TaskName) -> list[Example]:
    labels_path = data / "labels.csv"
    if not labels_path.is_file():
        raise DatasetError(f"{data}: labels.csv is missing (write the set with dicom-node phantoms)")
    if task == "anatomy":
        return [
            Example(data / label.file, anatomy=label.task)
            for label in read_labels(labels_path)
            if (data / label.file).is_file()
        ]
    wanted = "hand" if task == "bone_age" else "foot"
    return [
        Example(
            path=data / label.file,
            sex=label.sex,
            bone_age_months=label.bone_age_months,
            foot_class=HALLUX_VALGUS_CLASSES.index(label.foot_class) if label.foot_class else None,
            hallux_valgus_angle_deg=label.hallux_valgus_angle_deg,
            finding_box=label.finding_box,
        )
        for label in read_labels(labels_path)
        if label.task == wanted and (data / label.file).is_file()
    ]


def pydicom_images() -> list[Path]:
    """pydicom's bundled test files that decode to one grayscale image by the node's pixel path: images of other
    body parts and modalities than the phantoms."""
    found = []
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)  # its decoders log each file they cannot read
    try:
        for path in sorted((Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm")):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pixels = radiograph_pixels(pydicom.dcmread(path))
            except Exception:  # noqa: BLE001 - anything the node cannot read is not a training image
                continue
            if pixels.ndim == 2 and min(pixels.shape) >= 32 and pixels.std() > 0.01:
                found.append(path)
    finally:
        pydicom_log.setLevel(level)
    return found


def _rsna(data: Path, task: TaskName) -> list[Example]:
    if task != "bone_age":
        raise DatasetError("the rsna layout holds bone-age labels only")
    tables = [path for path in sorted(data.glob("*.csv")) if _has_columns(path, {"id", "boneage", "male"})]
    if not tables:
        raise DatasetError(f"{data}: no CSV with the columns id,boneage,male")
    images = {path.stem: path for path in data.rglob("*.png")}
    examples = []
    with tables[0].open(newline="") as file:
        for row in csv.DictReader(file):
            if row["id"] in images:
                male = row["male"].strip().lower() in ("true", "1", "yes")
                examples.append(
                    Example(images[row["id"]], sex="M" if male else "F", bone_age_months=float(row["boneage"]))
                )
    return examples


def _folders(data: Path, task: TaskName) -> list[Example]:
    if task != "hallux_valgus":
        raise DatasetError("the folders layout holds foot classes only")
    by_name = {_folder_key(name): index for index, name in enumerate(HALLUX_VALGUS_CLASSES)}
    examples = []
    for folder in sorted(path for path in data.iterdir() if path.is_dir()):
        if _folder_key(folder.name) not in by_name:
            raise DatasetError(f"{folder}: not a class folder; expected one of {list(HALLUX_VALGUS_CLASSES)}")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                examples.append(Example(path, foot_class=by_name[_folder_key(folder.name)]))
    return examples


def _folder_key(name: str) -> str:
    return name.lower().replace("_", " ").replace("-", " ").strip()


def _has_columns(path: Path, columns: set[str]) -> bool:
    with path.open(newline="") as file:
        return columns <= set(next(csv.reader(file), []))


def load_image(path: Path, reduce_to: int | None = None) -> np.ndarray:
    """An image file as float32 in [0, 1], bone bright: DICOM through the pixel path (reduced as the node
    reduces it, with ``reduce_to``: see :func:`inference.pixels.radiograph_pixels`), others stretched."""
    if path.suffix.lower() == ".dcm" or _is_dicom(path):
        return radiograph_pixels(pydicom.dcmread(path), reduce_to=reduce_to)
    with Image.open(path) as image:
        gray = np.asarray(image.convert("F") if image.mode not in ("I;16", "I") else image, np.float32)
    return stretch(gray)


def image_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) of an image file, from its header alone."""
    if path.suffix.lower() == ".dcm" or _is_dicom(path):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        return int(header.Rows), int(header.Columns)
    with Image.open(path) as image:
        return image.height, image.width


def finding_masks(examples: list[Example], size: int) -> torch.Tensor | None:
    """Each example's finding box drawn into its letterboxed input (N x 1 x size x size, uint8; all zero
    without a box), or None when no example has a box."""
    if all(example.finding_box is None for example in examples):
        return None
    masks = torch.zeros(len(examples), 1, size, size, dtype=torch.uint8)
    for index, example in enumerate(examples):
        if example.finding_box is not None:
            letterbox = Letterbox(*image_shape(example.path), size)
            x0, y0, _, _ = letterbox.inner
            left, top, right, bottom = (
                round(value * letterbox.scale + offset)
                for value, offset in zip(example.finding_box, (x0, y0, x0, y0), strict=True)
            )
            masks[index, 0, max(top, 0) : bottom + 1, max(left, 0) : right + 1] = 1
    return masks


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(132)[128:] == b"DICM"


def _square(job: tuple[Path, int]) -> np.ndarray:
    path, size = job
    image = load_image(path)
    return Letterbox(image.shape[0], image.shape[1], size).to_square(image).astype(np.float16)


def prepare_inputs(examples: list[Example], size: int, cache_dir: Path | None = None, workers: int = 2) -> torch.Tensor:
    """Letterboxed [0, 1] inputs (N x 1 x size x size, float16), cached on disk by input size and by the
    files' paths, sizes and modification times (a changed image is read again)."""
    files = "\n".join(f"{e.path}:{e.path.stat().st_size}:{e.path.stat().st_mtime_ns}" for e in examples)
    key = hashlib.sha256(f"{size}\n{files}".encode()).hexdigest()[:16]
    cached = cache_dir / f"inputs-{size}-{key}.pt" if cache_dir else None
    if cached is not None and cached.is_file():
        return torch.load(cached)
    jobs = [(example.path, size) for example in examples]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            squares = list(pool.map(_square, jobs, chunksize=8))
    else:
        squares = [_square(job) for job in jobs]
    inputs = torch.from_numpy(np.stack(squares))[:, None]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(inputs, cached)
    return inputs
