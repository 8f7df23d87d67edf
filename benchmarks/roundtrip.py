"""Round-trip benchmark: from a PACS pushing an X-ray to the node's structured report being in the PACS.

A real Orthanc plays the PACS (``tests.orthanc``: Debian's ``orthanc`` on free loopback ports) and knows the
node as modality ``ainode``; the node runs in this process with its default configuration (the committed demo
model cards; one worker and a delivery sender, each polling every 0.5 s when idle and woken when work is queued
for it) except for its ports, its DICOM listener on loopback, a temporary storage root, and Orthanc as its
destination and default destination.
The models are loaded (the ONNX graphs exported) before anything is timed, and one extra study goes round
first, uncounted, so that no lazy initialisation is measured.

The phantom X-rays (hands and feet alternating; each phantom is one image in a study of its own) are uploaded
into Orthanc first, untimed. Then, one study at a time: t0 is taken just before ``POST
/modalities/ainode/store`` (synchronous: Orthanc answers once its C-STORE to the node is done); Orthanc is then
polled every ``--poll`` seconds until that study holds the node's Comprehensive 3D SR, which the node sends
after its Secondary Captures: t1. The latency is t1 - t0. The next study is pushed only after the previous
study's report arrived, so this is the latency of one study on an otherwise idle node, not under load.

Printed: latency p50/p95/max; how long the synchronous push itself took; for each study its X-ray, the
Secondary Captures in it when its report arrived and its latency; and where the time goes, for hands and feet
apart, from the node's index: the median seconds after t0 at which the X-ray was received (indexed), its
results were recorded (inference done), its report's delivery was queued (Secondary Captures and report
written) and Orthanc acknowledged the report; from there to t1 is the poll. This is a benchmark, not a test:
it exits 0 and prints PASS or MISS for the target.

    .venv/bin/python benchmarks/roundtrip.py [--count 20] [--poll 0.02]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import func, select

REPO = Path(__file__).resolve().parents[1]
# Before the project's imports: the repository root ahead of benchmarks/, whose inference.py would
# otherwise shadow the inference package; and tests.orthanc, the end-to-end tests' PACS, importable.
sys.path.insert(0, str(REPO))

from benchmarks.verdicts import print_verdicts  # noqa: E402
from dicom_node.config import InferenceSettings, Settings  # noqa: E402
from dicom_node.inference_jobs import InferenceModels  # noqa: E402
from dicom_node.models import Delivery, InferenceResult, Instance  # noqa: E402
from dicom_node.node import Node  # noqa: E402
from dicom_node.phantoms import generate_phantoms  # noqa: E402
from tests.dicom_peers import free_port  # noqa: E402
from tests.orthanc import Orthanc, orthanc  # noqa: E402

TARGETS = {"latency p95, s": ("<=", 2.0)}
SR_TIMEOUT_S = 60.0
# The node's milestones of one study, in the order they happen, as read from its index: the X-ray indexed,
# its last result recorded, the delivery of its SR queued (outputs written), the SR acknowledged by Orthanc.
MILESTONES = ("received", "results", "SR queued", "SR acked")


@dataclass
class RoundTrip:
    """One study's trip: its X-ray (hand or foot), seconds from t0 to the push's answer and to the report in
    Orthanc, the Secondary Captures then in the study, and the node's milestones in seconds after t0."""

    kind: str
    push_s: float
    latency_s: float
    captures: int
    milestones: dict[str, float]


@dataclass
class Study:
    """A phantom uploaded into Orthanc: its X-ray (hand or foot), Orthanc instance ID and DICOM UIDs."""

    kind: str
    orthanc_id: str
    study_uid: str
    sop_uid: str


def node_settings(storage: Path, node_port: int, pacs: Orthanc) -> Settings:
    """The node's defaults, with its own loopback port and storage root and ``pacs`` as its destination."""
    defaults = InferenceSettings()
    return Settings(
        dicom={"host": "127.0.0.1", "port": node_port},
        storage={"root": storage},
        # the default cards, found from any working directory
        inference={"tasks": {name: {"card": REPO / task.card} for name, task in defaults.tasks.items()}},
        destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}],
        delivery={"default_destination": "pacs"},
    )


def start_node(settings: Settings) -> Node:
    """Load the models as ``dicom-node serve`` does (exporting the ONNX graphs under the storage root), start."""
    models = InferenceModels.load(settings.inference, settings.storage.root / "cache" / "onnx")
    node = Node(settings, models=models)
    node.start()
    return node


def report_in(pacs: Orthanc, study_uid: str) -> bool:
    """Whether the study holds a Comprehensive 3D SR: one ``/tools/find`` (Modality is a series tag that
    Orthanc indexes), then the SOP class of any SR found."""
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}})
    return any(
        pacs.get(f"/instances/{orthanc_id}/metadata/SopClassUid") == Comprehensive3DSRStorage for orthanc_id in found
    )


def round_trip(pacs: Orthanc, node: Node, study: Study, poll: float) -> RoundTrip:
    """Push one study to the node and wait for its report in Orthanc."""
    wall_t0, t0 = time.time(), time.perf_counter()
    pacs.send_to_modality("ainode", [study.orthanc_id])
    push_s = time.perf_counter() - t0
    while not report_in(pacs, study.study_uid):
        if time.perf_counter() - t0 > SR_TIMEOUT_S:
            raise TimeoutError(f"no report of study {study.study_uid} in Orthanc after {SR_TIMEOUT_S:g} s")
        time.sleep(poll)
    latency_s = time.perf_counter() - t0
    classes = [instance["SOPClassUID"] for instance in pacs.instances_of_study(study.study_uid)]
    milestones = {name: moment - wall_t0 for name, moment in node_milestones(node, study.sop_uid).items()}
    return RoundTrip(study.kind, push_s, latency_s, classes.count(SecondaryCaptureImageStorage), milestones)


def node_milestones(node: Node, sop_uid: str) -> dict[str, float]:
    """When (Unix seconds) the node indexed the X-ray, recorded its last result, queued its report's delivery
    and had the report acknowledged by the destination."""
    with node.sessions() as session:
        source = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
        results = session.scalar(
            select(func.max(InferenceResult.created_at)).where(InferenceResult.instance_pk == source.id)
        )
        delivery = session.execute(
            select(Delivery.created_at, Delivery.sent_at)
            .join(Instance, Delivery.instance_pk == Instance.id)
            .where(Instance.source_instance_pk == source.id, Instance.sop_class_uid == Comprehensive3DSRStorage)
        ).one()
        moments = (source.received_at, results, delivery.created_at, delivery.sent_at)
    return {name: _unix(moment) for name, moment in zip(MILESTONES, moments, strict=True)}


def _unix(moment: dt.datetime) -> float:
    """Seconds since the epoch of an index timestamp (UTC; SQLite hands it back without its zone)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def upload(pacs: Orthanc, path: Path, kind: str) -> Study:
    """Store the phantom at ``path`` in Orthanc (untimed)."""
    header = dcmread(path, stop_before_pixels=True)
    return Study(kind, pacs.upload(path), header.StudyInstanceUID, header.SOPInstanceUID)


def run(work: Path, count: int, poll: float) -> list[RoundTrip]:
    """Start Orthanc and the node, upload ``count`` + 1 phantoms, send them round one by one; the first is the
    warm-up and is dropped."""
    labels = generate_phantoms(work / "phantoms", count + 1, seed=4000, task="both", workers=2)
    node_port = free_port()
    with orthanc(work / "orthanc", modalities={"ainode": ("AINODE", "127.0.0.1", node_port)}) as pacs:
        node = start_node(node_settings(work / "storage", node_port, pacs))
        try:
            studies = [upload(pacs, work / "phantoms" / label.file, label.task) for label in labels]
            return [round_trip(pacs, node, study, poll) for study in studies][1:]
        finally:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="studies timed, hands and feet alternating")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between two looks into Orthanc")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-roundtrip-") as temporary:
        trips = run(Path(temporary), args.count, args.poll)

    latencies = [trip.latency_s for trip in trips]
    pushes = [trip.push_s for trip in trips]
    print(f"{len(trips)} phantom studies (one X-ray each), pushed one at a time from Orthanc to the node")
    print(f"{'':40} {'p50 s':>7} {'p95 s':>7} {'max s':>7}")
    for name, values in (("push to SR in Orthanc", latencies), ("synchronous push (C-STORE to node)", pushes)):
        p50, p95 = np.quantile(values, [0.5, 0.95])
        print(f"{name:40} {p50:7.2f} {p95:7.2f} {max(values):7.2f}")
    print("each study, in order:")
    print("  X-ray                      " + " ".join(f"{trip.kind:>5}" for trip in trips))
    print("  Secondary Captures with SR " + " ".join(f"{trip.captures:5d}" for trip in trips))
    print("  push to SR in Orthanc, s   " + " ".join(f"{trip.latency_s:5.2f}" for trip in trips))
    print("median seconds after t0, from the node's index (SR seen: this benchmark's poll of Orthanc):")
    print(f"{'':8}" + "".join(f"{name:>11}" for name in (*MILESTONES, "SR seen")))
    for kind, plural in (("hand", "hands"), ("foot", "feet")):
        of_kind = [trip for trip in trips if trip.kind == kind]
        medians = [statistics.median(trip.milestones[name] for trip in of_kind) for name in MILESTONES]
        medians.append(statistics.median(trip.latency_s for trip in of_kind))
        print(f"  {plural:6}" + "".join(f"{seconds:11.2f}" for seconds in medians))

    measured = {"latency p95, s": float(np.quantile(latencies, 0.95))}
    print_verdicts(measured, TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
