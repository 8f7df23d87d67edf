"""Class activation maps without a backward pass.

For a network that ends in ReLU -> global average pooling -> one linear layer (DenseNet121 does), the
Grad-CAM weights of output ``k`` are the gradients of ``y_k`` with respect to the feature map averaged over
space, which is ``w_k / (H * W)``: Grad-CAM (Selvaraju et al., arXiv:1610.02391, section 3.1) is then the CAM
of Zhou et al. up to a constant, ``ReLU(sum_c w_kc F_c)``. The identity holds for the post-ReLU feature map;
the linear layer's bias adds a constant and is left out. :class:`CamNetwork` returns that feature map with
the outputs of the same forward pass, so heatmaps cost one small matrix product. Networks of another shape
fall back to autograd Grad-CAM (:func:`autograd_grad_cam`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class CamNetwork(nn.Module):
    """Outputs and the post-ReLU last feature map of a features -> ReLU -> GAP -> linear network."""

    def __init__(self, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = torch.relu(self.features(x))
        return self.head(feature_map.mean(dim=(2, 3))), feature_map


def as_cam_network(network: nn.Module) -> CamNetwork | None:
    """Wrap MONAI's DenseNet layout (``features``, ``class_layers`` = relu, pool, flatten, out) or None."""
    class_layers = getattr(network, "class_layers", None)
    features = getattr(network, "features", None)
    if features is None or class_layers is None:
        return None
    names = [name for name, _ in class_layers.named_children()]
    if names != ["relu", "pool", "flatten", "out"] or not hasattr(class_layers.out, "weight"):
        return None
    return CamNetwork(features, class_layers.out)


def class_activation_maps(
    feature_map: np.ndarray, head_weight: np.ndarray, outputs: list[int], weight_magnitude: bool = False
) -> np.ndarray:
    """CAMs of ``outputs`` (B x len(outputs) x h x w) from a feature map (B x C x h x w) and the linear
    layer's weights (K x C), each scaled so that its maximum is 1 (all 0 if the map is empty).

    With ``weight_magnitude``, the map of the weights' magnitudes, ``sum_c |w_kc| F_c``: where the features that
    output ``k`` reads are active, whichever way they push it. A regression's CAM is negative wherever the image
    reads below the output's bias (a young hand, for a bone age), so it is empty for many images; this map is
    empty only where no feature the output reads is active."""
    weights = np.abs(head_weight[outputs]) if weight_magnitude else head_weight[outputs]
    # einsum, not tensordot: BLAS would wake its thread pool, which then spins beside the runtime's threads
    maps = np.maximum(np.einsum("bchw,kc->bkhw", feature_map, weights), 0.0).astype(np.float32)
    peak = maps.max(axis=(2, 3), keepdims=True)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def autograd_grad_cam(network: nn.Module, x: torch.Tensor, output: int, target_layer: str) -> torch.Tensor:
    """Grad-CAM by backpropagation (MONAI's implementation) at ``target_layer``, at feature resolution,
    scaled to a maximum of 1: the reference, and the fallback for heads that are not GAP + linear."""
    from monai.visualize import GradCAM

    with torch.enable_grad():
        raw = GradCAM(nn_module=network, target_layers=target_layer).compute_map(x, class_idx=output)
    raw = torch.relu(raw)
    peak = raw.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, raw / peak.clamp_min(1e-12), torch.zeros_like(raw))
