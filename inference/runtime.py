"""Where a network runs: PyTorch, or ONNX Runtime on a graph exported from the same weights.

Both runners take a batch of model inputs and return the outputs and the post-ReLU last feature map of one
forward pass (:class:`inference.cam.CamNetwork`), so a heatmap costs one small product either way. The ONNX
graph is exported once per weights digest and input size and kept in a cache directory, so later starts
only load it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from inference.cam import CamNetwork

RuntimeName = Literal["torch", "onnxruntime"]
log = logging.getLogger(__name__)


class Runner(Protocol):
    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outputs (B x K) and feature map (B x C x h x w) of a float32 batch (B x channels x S x S)."""
        ...


class TorchRunner:
    """The reference: PyTorch eager, no autograd."""

    def __init__(self, network: CamNetwork, threads: int = 0) -> None:
        self.network = network.eval()
        if threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs, feature_map = self.network(torch.from_numpy(batch))
        return outputs.numpy(), feature_map.numpy()


class OnnxRunner:
    """ONNX Runtime (CPU) on the exported graph of the same network."""

    def __init__(self, network: CamNetwork, channels: int, size: int, graph: Path, threads: int = 0) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Each session has its own thread pool, which by default spins after a run; the node runs two sessions
        # one after the other beside threads that read and record images, and a spinning pool takes a core
        # from whichever comes next (benchmarks/inference.py shows it in the latency of an image alone).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not graph.is_file():
            export_onnx(network, channels, size, graph)
        try:
            self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception:  # a cached graph this onnxruntime cannot read (damaged, or of another version)
            log.warning("cached graph %s unusable; exporting it again", graph.name)
            export_onnx(network, channels, size, graph)
            self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs, feature_map = self.session.run(None, {"image": np.ascontiguousarray(batch, np.float32)})
        return outputs, feature_map


def export_onnx(network: CamNetwork, channels: int, size: int, path: Path) -> None:
    """Write the network's graph (input ``image``, outputs ``outputs`` and ``feature_map``, any batch size)
    to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".onnx.part")
    os.close(descriptor)
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and 10x faster to export here
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network.eval(),
                (torch.zeros(1, channels, size, size),),
                temporary,
                input_names=["image"],
                output_names=["outputs", "feature_map"],
                dynamic_axes={name: {0: "batch"} for name in ("image", "outputs", "feature_map")},
                dynamo=False,
            )
        with open(temporary, "rb") as file:  # durable before it is published under its final name
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    log.info("exported %s", path.name)
