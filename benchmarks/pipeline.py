"""Pipeline benchmark: images in by C-STORE to results acknowledged by the PACS, against the networks alone.

``--count`` phantom X-rays (hands and feet) are pushed by one DCMTK ``storescu`` association into a node started by
its own CLI (``dicom-node serve``) with the committed config.yaml (SQLite, MLflow on in its local store), a
temporary storage root and a real Orthanc (``tests.orthanc``) as its default destination. The ONNX graphs are
exported before, untimed, as after a node's first start. From t0, just before the push:

- images/s until every structured report is acknowledged by Orthanc (end to end), and until every output is
  written (the outputs jobs done), read from the node's index;
- the model-bound limit, measured in this run: the networks alone on the same images, each image on the model
  it is routed to, in batches of ``inference.batch_size``, their inputs prepared beforehand (untimed);
- where the inference jobs' time went, from the node's own timings (reading and decoding, each model, writing
  the heatmaps and recording), and the node's peak RSS;
- the node's CPU time per image from t0 until every report was acknowledged (``/proc``), the images/s that this
  cost allows on the machine's cores however well the work were spread over them, and each stage's CPU time per
  image, sampled by py-spy (:mod:`benchmarks.stages`);
- then, once the node is idle again, ``POST /predict`` back to back: ``--uploads`` other phantoms as the DICOM
  files they are, and the same as 512-pixel PNG pictures, as the seeds' clients send them; latency p50 / p95.

This is a benchmark, not a test: it exits 0 and prints PASS or MISS for each target.

    .venv/bin/python benchmarks/pipeline.py [--count 100]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pydicom
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before benchmarks/, whose inference.py would shadow the package; tests importable

from benchmarks.stages import StageProfile, process_cpu_seconds  # noqa: E402
from benchmarks.verdicts import print_verdicts  # noqa: E402
from dicom_node.config import InferenceSettings  # noqa: E402
from dicom_node.inference_jobs import InferenceModels  # noqa: E402
from dicom_node.phantoms import generate_phantoms  # noqa: E402
from dicom_node.routing import route  # noqa: E402
from inference.pixels import DEFAULT_PICTURE_SIZE, radiograph_pixels  # noqa: E402
from inference.predict import ModelInputs, predict_bone_age, predict_hallux_valgus  # noqa: E402
from inference.preprocess import as_picture  # noqa: E402
from tests.orthanc import orthanc  # noqa: E402
from tests.serve_process import DEMO_CARDS, ServeProcess, with_onnx_graphs  # noqa: E402

TARGETS = {
    "end to end, images/s": (">=", 10.0),
    "end to end / model-bound limit": (">=", 0.60),
    "POST /predict DICOM p95, ms": ("<=", 200.0),
    "POST /predict 512 px PNG p95, ms": ("<=", 120.0),
    "peak RSS of the node, MB": ("<=", 1536.0),
}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR, the node's structured report


def model_bound_limit(files: list[Path], graphs: Path) -> float:
    """Images per second of the networks alone on ``files``, each on the model(s) it is routed to."""
    settings = InferenceSettings(**DEMO_CARDS)
    models = InferenceModels.load(settings, graphs)
    routed: dict[str, list[ModelInputs]] = defaultdict(list)
    for path in files:
        ds = pydicom.dcmread(path)
        picture = as_picture(radiograph_pixels(ds, reduce_to=DEFAULT_PICTURE_SIZE))  # as the node prepares it
        for task in route(ds, settings).tasks:
            routed[task].append(models.of(task).inputs([picture], [(ds.Rows, ds.Columns)]))
    predict = {
        "hallux_valgus": lambda inputs: predict_hallux_valgus(models.of("hallux_valgus"), inputs),
        "bone_age": lambda inputs: predict_bone_age(models.of("bone_age"), inputs),
    }
    for task, inputs in routed.items():  # warm-up, untimed
        predict[task](inputs[0])
    started = time.perf_counter()
    for task, inputs in routed.items():
        for first in range(0, len(inputs), settings.batch_size):
            predict[task](ModelInputs.concatenate(inputs[first : first + settings.batch_size]))
    return len(files) / (time.perf_counter() - started)


def index_counts(database: Path) -> tuple[int, int]:
    """(outputs jobs done, structured reports acknowledged) in the node's index, read beside the node."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
        outputs = connection.execute("SELECT count(*) FROM jobs WHERE kind = 'outputs' AND state = 'done'").fetchone()
        reports = connection.execute(
            "SELECT count(*) FROM deliveries JOIN instances ON deliveries.instance_pk = instances.id "
            "WHERE deliveries.state = 'sent' AND instances.sop_class_uid = ?",
            (SR_CLASS,),
        ).fetchone()
    return outputs[0], reports[0]


def inference_stages(database: Path) -> dict[str, float]:
    """Milliseconds per image in each stage of the inference jobs, from the timings the node records."""
    totals: dict[str, float] = defaultdict(float)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT timings_ms FROM results WHERE id IN (SELECT min(id) FROM results GROUP BY instance_pk)"
        ).fetchall()
    for (timings,) in rows:
        for stage, milliseconds in json.loads(timings).items():
            totals[stage] += milliseconds
    return {stage: total / len(rows) for stage, total in totals.items()}


def png_picture(path: Path, side: int = 512) -> bytes:
    """The radiograph of the DICOM file at ``path`` as a PNG of at most ``side`` pixels, as a photo of it."""
    picture = Image.fromarray(np.rint(radiograph_pixels(pydicom.dcmread(path)) * 255).astype(np.uint8))
    picture.thumbnail((side, side))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def predict_latencies(port: int, uploads: list[tuple[str, bytes]]) -> list[float]:
    """Milliseconds of each ``POST /predict`` of ``uploads`` (file name, content), one after the other."""
    latencies = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for name, content in uploads:
            started = time.perf_counter()
            response = client.post("/predict", files={"image": (name, content)})
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
    return latencies


def wait_until_idle(node: ServeProcess, timeout: float = 300) -> None:
    """Until no job waits or runs (the outputs of what came before are written)."""
    deadline = time.monotonic() + timeout
    while {"pending", "running"} & set(node.health()[1]["jobs"]):
        if time.monotonic() > deadline:
            raise TimeoutError("the node did not become idle")
        time.sleep(0.2)


def run(work: Path, count: int, uploads: int) -> dict[str, float]:
    generate_phantoms(work / "phantoms", count, seed=6000, task="both", workers=2)
    files = sorted((work / "phantoms").glob("*.dcm"))
    generate_phantoms(work / "uploads", uploads, seed=7000, task="both", workers=2)
    dicom_uploads = [(path.name, path.read_bytes()) for path in sorted((work / "uploads").glob("*.dcm"))]
    png_uploads = [(f"{path.stem}.png", png_picture(path)) for path in sorted((work / "uploads").glob("*.dcm"))]
    graphs = work / "onnx"
    limit = model_bound_limit(files, graphs)
    with orthanc(work / "orthanc") as pacs:
        destination = {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
        environment = {
            "DICOM_NODE_DESTINATIONS": json.dumps([destination]),
            "DICOM_NODE_DELIVERY__DEFAULT_DESTINATION": "pacs",
        }
        storage = with_onnx_graphs(work / "storage", graphs)
        node = ServeProcess(storage, environment=environment, anatomy_check=True)  # as config.yaml ships
        try:
            node.wait_until_ready(300)
            database = storage / "index.sqlite3"
            profile = StageProfile(node.process.pid, work / "profile.txt")
            profile.start()
            started, cpu_at_start = time.perf_counter(), process_cpu_seconds(node.process.pid)
            subprocess.run(
                ["storescu", "-aet", "MODALITY", "-aec", "AINODE", "127.0.0.1", str(node.dicom_port), *map(str, files)],
                check=True,
                capture_output=True,
                timeout=600,
            )
            pushed = time.perf_counter() - started
            written_at = reported_at = None
            while reported_at is None:
                outputs, reports = index_counts(database)
                now = time.perf_counter() - started
                if written_at is None and outputs == count:
                    written_at = now
                if reports == count:
                    reported_at, cpu = now, process_cpu_seconds(node.process.pid) - cpu_at_start
                if now > 900:
                    raise TimeoutError(f"after 900 s: {outputs} outputs written, {reports} reports acknowledged")
                time.sleep(0.05)
            profile.stop()
            stages = inference_stages(database)
            wait_until_idle(node)
            predict_latencies(node.web_port, dicom_uploads[:1])  # warm-up
            dicom_ms = predict_latencies(node.web_port, dicom_uploads[1:])
            wait_until_idle(node)
            png_ms = predict_latencies(node.web_port, png_uploads[1:])
            rss = node.peak_rss_bytes() / 2**20
        finally:
            node.stop()
            node.ensure_stopped()
    print(f"{count} phantom X-rays (hands and feet) by one storescu association, node with its default config")
    print(f"   push (storescu done)                        {pushed:8.2f} s")
    print(f"   every output written                        {written_at:8.2f} s   {count / written_at:6.2f} images/s")
    print(f"   every report acknowledged by Orthanc        {reported_at:8.2f} s   {count / reported_at:6.2f} images/s")
    print(f"   model-bound limit (networks alone)                     {limit:6.2f} images/s")
    print(
        "   inference job stages, ms per image (the node's timings): "
        + ", ".join(f"{stage} {milliseconds:.1f}" for stage, milliseconds in sorted(stages.items()))
    )
    size = statistics.mean(len(content) for _, content in dicom_uploads) / 2**20
    print(
        f"   POST /predict back to back, p50 / p95 / max ms: {len(dicom_ms)} DICOM files ({size:.1f} MB) "
        + " / ".join(f"{value:.0f}" for value in (*np.quantile(dicom_ms, [0.5, 0.95]), max(dicom_ms)))
    )
    print(
        f"   POST /predict back to back, p50 / p95 / max ms: {len(png_ms)} 512 px PNGs "
        + " / ".join(f"{value:.0f}" for value in (*np.quantile(png_ms, [0.5, 0.95]), max(png_ms)))
    )
    print(f"   peak RSS of the node                        {rss:8.0f} MB")
    cores = os.cpu_count() or 1
    per_image = cpu / count * 1000
    print(f"   node CPU, push to every report acknowledged {cpu:8.2f} s   {per_image:6.0f} ms per image")
    print(f"   at that CPU per image, {cores} cores allow at most             {cores * 1000 / per_image:6.2f} images/s")
    print("   node CPU by stage, push to every report acknowledged (share of py-spy's samples), ms per image:")
    samples = profile.sampled_seconds()
    for stage, seconds in samples.items():
        share = seconds / sum(samples.values())
        print(f"      {stage:45s} {share:6.1%} {share * per_image:6.0f}")
    if profile.missing:
        print(f"      not measured: {profile.missing}")
    end_to_end = count / reported_at
    return {
        "end to end, images/s": end_to_end,
        "end to end / model-bound limit": end_to_end / limit,
        "POST /predict DICOM p95, ms": float(np.quantile(dicom_ms, 0.95)),
        "POST /predict 512 px PNG p95, ms": float(np.quantile(png_ms, 0.95)),
        "peak RSS of the node, MB": rss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="phantom X-rays pushed")
    parser.add_argument("--uploads", type=int, default=41, help="uploads to POST /predict of each kind (one warms up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as temporary:
        measured = run(Path(temporary), args.count, args.uploads)
    print_verdicts(measured, TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
