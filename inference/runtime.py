"""Where a network runs: PyTorch, or ONNX Runtime on a graph exported from the same weights.

Both runners take a batch of model inputs and return the outputs and the post-ReLU last feature map of one
forward pass (:class:`inference.cam.CamNetwork`), so a heatmap costs one small product either way. The ONNX
graph is exported once per weights digest and input size and kept in a cache directory, so later starts
only load it.

ONNX Runtime computes a batch image by image, one run per image on one thread, as many side by side as there
are cores: DenseNet121 is some 400 small operators, and a run that splits every operator across the cores waits
at a barrier after each, while side-by-side runs never wait for one another (and one image's activations stay
closer to its core than a batch's). All the runners of a process share one pool of those threads, so that two
models running at once (:mod:`dicom_node.inference_jobs` runs the two tasks side by side) still run one image
per core.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
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
    """ONNX Runtime (CPU) on the exported graph of the same network, a batch run image by image, up to ``threads``
    (0: one per core) side by side, each on one thread."""

    def __init__(self, network: CamNetwork, channels: int, size: int, graph: Path, threads: int = 0) -> None:
        import onnxruntime

        self._pool = _image_runners(threads or os.cpu_count() or 1)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # the calling thread computes the run: no pool of the session's own
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not graph.is_file():
            export_onnx(network, channels, size, graph)
        try:
            self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception:  # a cached graph this onnxruntime cannot read (damaged, or of another version)
            log.warning("cached graph %s unusable; exporting it again", graph.name)
            export_onnx(network, channels, size, graph)
            self.session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(batch, np.float32)[:, None]
        runs = list(self._pool.map(lambda image: self.session.run(None, {"image": image}), images))
        return np.concatenate([run[0] for run in runs]), np.concatenate([run[1] for run in runs])


@functools.cache
def _image_runners(threads: int) -> ThreadPoolExecutor:
    """The threads that run the images of every ONNX Runtime batch of this process (ONNX Runtime's ``run`` may be
    called from several threads at once)."""
    return ThreadPoolExecutor(threads, "onnxruntime")


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
