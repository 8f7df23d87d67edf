"""Inference benchmark: the seed projects' way against the node's inference path, on the same X-rays.

The same phantom X-rays (hands and feet), and on every one of them all three models, so the work is the same:

(a) the seed projects' way: for one image at a time, decode and the pixel path, then for each of the three
    models (the foot model, a male and a female bone-age model; the node's bone-age network has the two sexes
    as two heads, so the seeds' two networks are that network run twice) a PyTorch eager forward pass for the
    prediction and autograd Grad-CAM (monai.visualize.GradCAM) for its heatmap.
(b) the node: the files are ingested into a node's storage and index first (not timed); then the node's
    inference job handler takes the queued jobs as its workers do and, per batch, decodes, runs the anatomy check
    on every image, then both networks once for all three outputs and their heatmaps (CAM from the same pass),
    and records results and heatmap files. One rule routes every image to both tasks and the check's policy
    trusts the tags, so every image runs both tasks (and the check, which the seeds do not have).

Printed: images per second (b: batches of ``--batch-size``), latency p50/p95 per image (b: batches of one, an X-ray
arriving alone), the anatomy check's model time per image (from the node's own timings), peak RSS of each part (each
runs in its own child process of this run), the ratio of throughputs, the model compute of (b) as a fraction of this
machine's fp32 matmul peak (numpy 2048 x 2048, measured in the same run; model FLOPs counted by
torch.utils.flop_counter, over the wall time during which at least one network's runner runs: the two models may run
at once), and the share of (b)'s time spent outside the networks (reading, decoding, letterboxing, CAM, recording).
Both parts are warmed up on one image first; the ONNX graphs are exported before (b) starts, as after a node's first
start. This is a benchmark, not a test: it exits 0 and prints PASS or MISS for each target.

    .venv/bin/python benchmarks/inference.py [--count 50] [--batch-size 8] [--runtime onnxruntime]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.verdicts import print_verdicts  # noqa: E402

TARGETS = {
    "throughput ratio (b)/(a)": (">=", 5.0),
    "model compute / matmul peak": (">=", 0.70),
    "time outside the models (b)": ("<", 0.30),
    "latency p95 (b), ms": ("<=", 200.0),
    "peak RSS (b), MB": ("<=", 1536.0),
    "anatomy check per image (b), ms": ("<=", 10.0),
}


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = (np.random.default_rng(seed).random((n, n), dtype=np.float32) for seed in (0, 1))
    a @ b  # warm up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node_tasks(cards: tuple[Path, Path, Path]) -> dict:
    """The inference settings of (b): the check, then every image to both tasks (see the module's docstring)."""
    return {
        "tasks": {
            "anatomy": {"card": cards[2], "policy": "trust_tags"},
            "hallux_valgus": {"card": cards[0]},
            "bone_age": {"card": cards[1]},
        },
        "rules": [{"pattern": "HAND|FOOT", "tasks": ["hallux_valgus", "bone_age"]}],
    }


def seed_way(files: list[Path], cards: tuple[Path, Path, Path]) -> dict:
    """(a): one image at a time, three models, eager forward + autograd Grad-CAM each."""
    import pydicom
    import torch

    from inference.cam import autograd_grad_cam
    from inference.pixels import radiograph_pixels
    from inference.predict import Model

    foot, hand = (Model.load(card, "torch") for card in cards[:2])
    # (model, output whose heatmap is shown): the foot model's predicted class, each sex's mean
    passes = [
        (foot, None),
        (hand, hand.card.outputs.index("male_mean")),
        (hand, hand.card.outputs.index("female_mean")),
    ]

    def one_image(path: Path) -> None:
        image = radiograph_pixels(pydicom.dcmread(path))
        for model, output in passes:
            batch, _ = model.inputs([image])
            x = torch.from_numpy(batch)
            with torch.no_grad():
                outputs = model.network(x)
            target = int(outputs[0, :4].argmax()) if output is None else output
            autograd_grad_cam(model.network, x, target, "class_layers.relu")

    one_image(files[0])  # warm up, as (b) is: the first image pays for lazy initialisation
    latencies = []
    started = time.perf_counter()
    for path in files:
        latencies.append(_timed(lambda path=path: one_image(path)))
    total = time.perf_counter() - started
    return {"images_per_s": len(files) / total, "latencies": latencies, "peak_rss_mb": _peak_rss_mb()}


def node_way(files: list[Path], cards: tuple[Path, Path, Path], batch_size: int, runtime: str, work: Path) -> dict:
    """(b): the node's inference job handler over ingested instances, batched, then one at a time."""
    import pydicom
    import torch
    from sqlalchemy import update
    from torch.utils.flop_counter import FlopCounterMode

    from dicom_node.config import Settings
    from dicom_node.inference_jobs import InferenceModels
    from dicom_node.ingest import INFERENCE_JOB
    from dicom_node.models import InferenceResult, Job, JobState
    from dicom_node.node import Node
    from dicom_node.part10 import encoded_dataset

    settings = Settings(
        storage={"root": work / "storage"}, workers={"count": 0}, inference=node_tasks(cards) | {"runtime": runtime}
    )
    models = InferenceModels.load(settings.inference, work / "onnx")  # graphs exported by warm_cache
    clock = NetworkClock()
    for model in models.loaded().values():
        model.runner = TimedRunner(model.runner, clock)
    node = Node(settings, models=models)
    for path in files:
        node.ingestor.ingest(pydicom.filereader.read_file_meta_info(path), [encoded_dataset(path)])
    handler = node.workers.handlers[INFERENCE_JOB]

    def drain(size: int) -> tuple[float, list[float]]:
        """Run every queued job as a worker does, ``size`` at a time: total seconds, seconds of each batch
        from its claim to its jobs marked done."""
        batch_times, started = [], time.perf_counter()
        while True:
            batch_started = time.perf_counter()
            jobs = node.queue.claim_batch([INFERENCE_JOB], size)
            if not jobs:
                return time.perf_counter() - started, batch_times
            failures = handler(jobs)
            assert not failures, failures
            for job in jobs:
                node.queue.complete(job)
            batch_times.append(time.perf_counter() - batch_started)

    drain(1)  # warm up: the first images pay for lazy initialisation
    with node.sessions.begin() as session:
        session.execute(update(Job).values(state=JobState.PENDING, attempts=0))
    clock.seconds = 0.0
    total, _ = drain(batch_size)
    model_seconds = clock.seconds

    with node.sessions.begin() as session:
        session.execute(update(Job).values(state=JobState.PENDING, attempts=0))
    _, latencies = drain(1)
    with node.sessions() as session:  # of the batches of one: an X-ray arriving alone
        checks = [row.timings_ms["anatomy_model"] for row in session.query(InferenceResult).filter_by(task="anatomy")]

    flops = 0
    for model in models.loaded().values():
        size = model.card.input_size
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.cam_network(torch.zeros(1, model.card.in_channels, size, size))
        flops += counter.get_total_flops()
    node.engine.dispose()
    return {
        "images_per_s": len(files) / total,
        "latencies": latencies,
        "peak_rss_mb": _peak_rss_mb(),
        "model_share": model_seconds / total,
        "model_gflops_per_s": flops * len(files) / model_seconds / 1e9,
        "gflop_per_image": flops / 1e9,
        "anatomy_ms": float(np.mean(checks)),
    }


class NetworkClock:
    """Adds up the wall time during which at least one network runs."""

    def __init__(self) -> None:
        self.seconds, self._running, self._since = 0.0, 0, 0.0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if not self._running:
                self._since = time.perf_counter()
            self._running += 1

    def leave(self) -> None:
        with self._lock:
            self._running -= 1
            if not self._running:
                self.seconds += time.perf_counter() - self._since


class TimedRunner:
    """A model's runner (the network alone: ONNX Runtime or PyTorch) that tells a clock when it runs."""

    def __init__(self, runner, clock: NetworkClock) -> None:
        self.runner, self.clock = runner, clock

    def __call__(self, batch):
        self.clock.enter()
        try:
            return self.runner(batch)
        finally:
            self.clock.leave()


def warm_cache(cards: tuple[Path, Path, Path], runtime: str, work: Path) -> None:
    """Export the ONNX graphs once, so that the measured node only loads them, as a node does after its
    first start."""
    from dicom_node.config import InferenceSettings
    from dicom_node.inference_jobs import InferenceModels

    InferenceModels.load(InferenceSettings(**node_tasks(cards), runtime=runtime), work / "onnx")


def in_child(function, *args):
    """Run ``function`` in a fresh process of its own, so that its peak RSS is its own."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="phantom X-rays, hands and feet alternating")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runtime", choices=["onnxruntime", "torch"], default="onnxruntime")
    parser.add_argument("--foot-card", type=Path, default=REPO / "models" / "hallux-valgus-demo.yaml")
    parser.add_argument("--hand-card", type=Path, default=REPO / "models" / "bone-age-demo.yaml")
    parser.add_argument("--anatomy-card", type=Path, default=REPO / "models" / "anatomy-demo.yaml")
    args = parser.parse_args()

    from dicom_node.phantoms import generate_phantoms

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as temporary:
        work = Path(temporary)
        labels = generate_phantoms(work / "phantoms", args.count, seed=3000, task="both", workers=2)
        files = [work / "phantoms" / label.file for label in labels]
        cards = (args.foot_card.resolve(), args.hand_card.resolve(), args.anatomy_card.resolve())
        peak = matmul_peak_gflops()
        in_child(warm_cache, cards, args.runtime, work)
        seed = in_child(seed_way, files, cards)
        node = in_child(node_way, files, cards, args.batch_size, args.runtime, work)

    def ms(values: list[float], q: float) -> float:
        return float(np.quantile(values, q)) * 1000

    print(f"{args.count} phantom X-rays, all three seed models on each; fp32 matmul peak {peak:.0f} GFLOP/s")
    print(f"(b) the anatomy check's model: {node['anatomy_ms']:.2f} ms per image arriving alone")
    print(f"{'':44} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'peak RSS MB':>12}")
    for name, part in (("(a) seeds: eager + autograd Grad-CAM, 1 by 1", seed), (f"(b) node: {args.runtime}", node)):
        print(
            f"{name:44} {part['images_per_s']:9.2f} {ms(part['latencies'], 0.5):8.0f} "
            f"{ms(part['latencies'], 0.95):8.0f} {part['peak_rss_mb']:12.0f}"
        )
    print(
        f"(b) model compute: {node['gflop_per_image']:.2f} GFLOP per image (the three networks), "
        f"{node['model_gflops_per_s']:.0f} GFLOP/s inside the networks, {node['model_share']:.0%} of (b)'s time; "
        f"batch size {args.batch_size}"
    )
    measured = {
        "throughput ratio (b)/(a)": node["images_per_s"] / seed["images_per_s"],
        "model compute / matmul peak": node["model_gflops_per_s"] / peak,
        "time outside the models (b)": 1 - node["model_share"],
        "latency p95 (b), ms": ms(node["latencies"], 0.95),
        "peak RSS (b), MB": node["peak_rss_mb"],
        "anatomy check per image (b), ms": node["anatomy_ms"],
    }
    print_verdicts(measured, TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
