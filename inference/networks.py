"""The networks a model card describes: built from MONAI, loaded from the card's weights and checked.

:mod:`inference.model_card` holds what a card says; this module is where torch and MONAI come in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch
from monai.networks.nets import DenseNet, DenseNet121

from inference.model_card import ModelCard, ModelLoadError, ModelMissingError, sha256_of


def densenet121(in_channels: int, out_channels: int, feature_stride: Literal[16, 32] = 32) -> DenseNet121:
    """MONAI's DenseNet121 (2D). With ``feature_stride`` 16 the last transition layer does not pool, so the
    last feature map, and with it the heatmap, has twice the resolution from the same weights (the "last
    stride" change of weakly supervised localisation; the pooling layer has no parameters)."""
    network = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=out_channels)
    if feature_stride == 16:
        network.features.transition3.pool = torch.nn.Identity()
    return network


def build_network(card: ModelCard) -> torch.nn.Module:
    """The untrained network a card describes."""
    if card.layout is None:
        return densenet121(card.in_channels, len(card.outputs), card.feature_stride)
    return DenseNet(
        spatial_dims=2,
        in_channels=card.in_channels,
        out_channels=len(card.outputs),
        init_features=card.layout.init_features,
        growth_rate=card.layout.growth_rate,
        block_config=card.layout.block_config,
    )


def state_dict_digest(network: torch.nn.Module) -> str:
    """SHA-256 over a network's parameters and buffers, by name: what identifies weights without a file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_network(card: ModelCard, card_path: Path) -> torch.nn.Module:
    """The card's network in eval mode, its weights verified and its outputs counted."""
    network = _load_weights(card, Path(card_path))
    _check_outputs(network, card, card_path)
    return network


def _load_weights(card: ModelCard, card_path: Path) -> torch.nn.Module:
    if card.weights.format == "mlflow":
        import mlflow.pytorch

        try:
            return mlflow.pytorch.load_model(card.weights.uri, map_location="cpu").eval()
        except Exception as error:  # MLflow raises many kinds; all mean "not loadable"
            raise ModelLoadError(f"{card_path}: cannot load {card.weights.uri}: {type(error).__name__}") from None
    weights_path = card_path.parent / card.weights.path
    if not weights_path.is_file():
        raise ModelMissingError(f"{card_path}: weights file {weights_path} is missing")
    actual = sha256_of(weights_path)
    if actual != card.weights.sha256.lower():
        raise ModelLoadError(
            f"{card_path}: weights {weights_path.name} have sha256 {actual}, the card says {card.weights.sha256}"
        )
    try:
        if card.weights.format == "torchscript":
            return torch.jit.load(weights_path, map_location="cpu").eval()
        loaded = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file, a TorchScript archive given as a state dict, a pickled module
        raise ModelLoadError(
            f"{card_path}: {weights_path.name} is not a {card.weights.format}: {type(error).__name__}"
        ) from None
    state = _unwrap_state_dict(loaded)
    if state is None:
        raise ModelLoadError(f"{card_path}: {weights_path.name} holds no state dict")
    network = build_network(card)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ModelLoadError(
            f"{card_path}: weights do not fit {card.architecture} with in_channels={card.in_channels} and "
            f"{len(card.outputs)} outputs: {detail}"
        ) from None
    return network.eval()


def _check_outputs(network: torch.nn.Module, card: ModelCard, card_path: Path) -> None:
    """One forward pass on a blank input: a network that does not take the card's input or does not give
    its outputs is refused now, not at the first X-ray."""
    probe = torch.zeros(1, card.in_channels, card.input_size, card.input_size)
    try:
        with torch.no_grad():
            outputs = network(probe)
    except Exception as error:
        raise ModelLoadError(
            f"{card_path}: the network does not take a {tuple(probe.shape)} input: {type(error).__name__}"
        ) from None
    if outputs.ndim != 2 or outputs.shape[1] != len(card.outputs):
        raise ModelLoadError(
            f"{card_path}: the network gives {tuple(outputs.shape)} outputs, the card lists {len(card.outputs)}"
        )


def _unwrap_state_dict(loaded: object) -> dict[str, torch.Tensor] | None:
    """Accept a bare state dict, one saved inside a training checkpoint, or one of a DataParallel model."""
    if isinstance(loaded, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        return None
    return {key.removeprefix("module."): value for key, value in loaded.items()}
