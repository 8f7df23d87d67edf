"""On-the-fly augmentation of a batch of letterboxed [0, 1] radiographs, as acquisitions vary:
position, rotation, size and side (a left hand is a mirrored right one), exposure, contrast and noise.
Masks of the findings, where given, move with their images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(
    batch: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A randomly varied copy of ``batch`` (B x C x S x S, float, values in [0, 1]) and ``masks``
    (B x 1 x S x S, float) moved by the same geometric transform."""
    count = batch.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(count, generator=generator) * (high - low) + low

    angle = uniform(-12, 12) * math.pi / 180
    scale = uniform(0.9, 1.1)
    flip = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, uniform(-0.06, 0.06)], dim=1),
            torch.stack([sin * flip, cos, uniform(-0.06, 0.06)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    moved = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    gamma = uniform(0.75, 1.33).view(-1, 1, 1, 1)
    contrast = uniform(0.85, 1.15).view(-1, 1, 1, 1)
    brightness = uniform(-0.06, 0.06).view(-1, 1, 1, 1)
    noise = uniform(0.0, 0.03).view(-1, 1, 1, 1) * torch.randn(moved.shape, generator=generator)
    return (moved.clamp(0, 1) ** gamma * contrast + brightness + noise).clamp(0, 1), masks
