"""Model cards: what a set of weights is, how to feed it, what it outputs, and how well it measured.

A card is a YAML file beside its weights (``models/*.yaml``). Loading checks the card's fields, the weights'
SHA-256 and that the weights fit the declared architecture, and says precisely what is wrong otherwise.
Weights can be a PyTorch state dict of MONAI's DenseNet121, a TorchScript file, or an MLflow model URI
(``models:/name/version``); :mod:`inference.networks` builds and loads them. This module imports neither torch
nor MONAI, so that reading a configuration does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

HALLUX_VALGUS_CLASSES = ("Normal", "Flatfoot", "Foot Ulcer", "Hallux Valgus")
HALLUX_VALGUS_ANGLE = "hallux_valgus_angle"
DEFAULT_HALLUX_VALGUS_THRESHOLD = 0.3  # the Hallux Valgus probability that flags, unless configured
BONE_AGE_OUTPUTS = ("male_mean", "male_log_variance", "female_mean", "female_log_variance")
ANATOMY_CLASSES = ("hand", "foot", "other")
LOG_VARIANCE_RANGE = (-7.0, 3.0)  # of the bone-age heads, in training and in inference alike
DEMO_DISCLAIMER = "trained on synthetic phantoms; not for clinical use"
TASK_NAME = r"[a-z][a-z0-9_]{0,31}"  # a task's name: what the node's index and queue names hold


class ModelLoadError(Exception):
    """A model card or its weights cannot be used; the message names the card and the problem."""


class ModelMissingError(ModelLoadError):
    """A model card or its weights file does not exist (as opposed to one that exists but fails its checks)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Weights(Strict):
    format: Literal["state_dict", "torchscript", "mlflow"]
    path: str | None = None  # relative to the card's directory
    uri: str | None = None  # MLflow model URI
    sha256: str | None = None

    @model_validator(mode="after")
    def _location_fits_format(self) -> Weights:
        if self.format == "mlflow":
            if not self.uri:
                raise ValueError("an mlflow weights entry needs a uri such as models:/name/1")
        elif not (self.path and self.sha256):
            raise ValueError(f"{self.format} weights need a path and their sha256")
        return self


class Preprocessing(Strict):
    """Aspect-preserving resize into a square of ``input_size``, padding black, then (x - mean) / std."""

    mean: float = 0.5
    std: float = Field(0.25, gt=0)


class TargetScaling(Strict):
    """Regression outputs are (value - center) / scale."""

    age_center_months: float = 108.0
    age_scale_months: float = 60.0
    angle_scale_deg: float = 45.0


class DenseNetLayout(Strict):
    """The sizes of a MONAI DenseNet (Huang et al., arXiv:1608.06993): DenseNet121's by default. Each dense block
    after the first halves the feature map, after the stem's factor of 4."""

    init_features: int = Field(64, ge=4, le=128)
    growth_rate: int = Field(32, ge=4, le=64)
    block_config: tuple[int, ...] = Field((6, 12, 24, 16), min_length=2, max_length=4)

    @property
    def feature_stride(self) -> int:
        """Input pixels per cell of the last feature map."""
        return 4 * 2 ** (len(self.block_config) - 1)


HeatmapKind = Literal["class_activation", "weight_magnitude"]


class ModelCard(Strict):
    name: str
    version: str
    task: str = Field(pattern=f"^{TASK_NAME}$", description="The task whose outputs these are.")
    architecture: Literal["monai.DenseNet121", "monai.DenseNet"] = "monai.DenseNet121"
    layout: DenseNetLayout | None = Field(None, description="The sizes of a monai.DenseNet (none for DenseNet121).")
    in_channels: Literal[1, 3] = 1
    input_size: int = Field(ge=32, le=1024)
    feature_stride: Literal[16, 32] = Field(
        32,
        description="Input pixels per cell of the last feature map, so of the heatmap; see "
        "inference.networks.densenet121().",
    )
    heatmap: HeatmapKind = Field(
        "class_activation",
        description="class_activation: the CAM of an output, ReLU(sum_c w_c F_c); weight_magnitude: "
        "sum_c |w_c| F_c, where the features an output reads are active whichever way they push it (for a "
        "regression, whose CAM is negative wherever it reads a value below its bias).",
    )
    preprocessing: Preprocessing = Preprocessing()
    outputs: list[str]
    target_scaling: TargetScaling = TargetScaling()
    sigma_scale: float = Field(1.0, gt=0, description="Calibration factor for predicted sigmas.")
    weights: Weights
    demo: bool = False
    disclaimer: str = ""
    training_data: str = ""
    intended_use: str = ""
    limitations: list[str] = []
    metrics: dict[str, float | int | str] = {}

    @model_validator(mode="after")
    def _outputs_fit_task(self) -> ModelCard:
        if self.task == "hallux_valgus":
            if tuple(self.outputs[:4]) != HALLUX_VALGUS_CLASSES or self.outputs[4:] not in ([], [HALLUX_VALGUS_ANGLE]):
                raise ValueError(
                    f"hallux_valgus outputs must be {list(HALLUX_VALGUS_CLASSES)} [+ {HALLUX_VALGUS_ANGLE}]"
                )
        elif self.task == "bone_age" and tuple(self.outputs) != BONE_AGE_OUTPUTS:
            raise ValueError(f"bone_age outputs must be {list(BONE_AGE_OUTPUTS)}")
        elif self.task == "anatomy" and tuple(self.outputs) != ANATOMY_CLASSES:
            raise ValueError(f"anatomy outputs must be {list(ANATOMY_CLASSES)}")
        if (self.architecture == "monai.DenseNet") != (self.layout is not None):
            raise ValueError("a monai.DenseNet card gives its layout, a monai.DenseNet121 card none")
        if self.layout is not None and self.layout.feature_stride != self.feature_stride:
            raise ValueError(
                f"feature_stride must be {self.layout.feature_stride}: the layout has "
                f"{len(self.layout.block_config)} dense blocks"
            )
        if self.demo and DEMO_DISCLAIMER not in self.disclaimer:
            raise ValueError(f"a demo model's disclaimer must say '{DEMO_DISCLAIMER}'")
        return self

    @property
    def label(self) -> str:
        """Name and version, with the demo disclaimer where it applies: what every output shows."""
        return f"{self.name} {self.version}" + (f" ({DEMO_DISCLAIMER})" if self.demo else "")


def read_card(path: Path) -> ModelCard:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return ModelCard.model_validate(values)
    except FileNotFoundError as error:
        raise ModelMissingError(f"{path}: cannot read the model card: {error.strerror}") from None
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read the model card: {error.strerror}") from None
    except yaml.YAMLError:
        raise ModelLoadError(f"{path}: the model card is not valid YAML") from None
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(card)"
        raise ModelLoadError(f"{path}: {key}: {first['msg'].removeprefix('Value error, ')}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
