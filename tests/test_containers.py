"""The container stacks for real: the images built from scratch by ``make containers``, then the demo stack (node,
Orthanc, MLflow) and the cluster stack (PostgreSQL, ingest nodes, inference workers, outputs worker, web, Orthanc,
MLflow) started with their host-network overrides. Phantom X-rays are uploaded to the Orthanc container and sent to
the node by Orthanc's REST API; their Secondary Captures and structured reports must come back to Orthanc.

Skipped, with the reason, where no Docker daemon answers: ``make test`` installs Debian's docker.io and starts
one on these machines (scripts/start-docker.sh). It runs as its own step of ``make test`` (README "Containers").
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import psycopg
import pytest
from pydicom.uid import Comprehensive3DSRStorage, ParametricMapStorage, SecondaryCaptureImageStorage

from tests.orthanc import OrthancClient, OrthancHTTPError
from tests.serve_process import DICOM_NODE, REPO
from tests.test_cluster import engine_query

T = TypeVar("T")

# The loopback ports of docker-compose.hostnet.yml and docker-compose.cluster.hostnet.yml.
NODE_WEB = "http://127.0.0.1:28000"
CLUSTER_HEALTH_PORTS = {"ingest-a": 28001, "ingest-b": 28002, "worker-a": 28003, "worker-b": 28004, "outputs": 28005}
ORTHANC = OrthancClient(http_url="http://127.0.0.1:28042", dicom_port=24242, ae_title="ORTHANC")
MLFLOW = "http://127.0.0.1:25000"
CLUSTER_DATABASE = "postgresql://dicomnode:dicomnode@127.0.0.1:25432/dicomnode"
NODE_MODALITY = "ainode"  # the node, as docker/orthanc/orthanc.hostnet.json names it
NODE_UID = 10001  # the Dockerfile's user

# What the node writes for each phantom: a Secondary Capture and a Parametric Map per model (the foot model; the
# two bone-age models) and one structured report of all the image's results.
IMAGES_PER_RESULT_KIND = {"foot": 1, "hand": 2}
OUTPUT_CLASSES = {SecondaryCaptureImageStorage, ParametricMapStorage, Comprehensive3DSRStorage}


def _why_no_docker() -> str | None:
    for program in ("docker", "docker-compose"):
        if shutil.which(program) is None:
            return f"{program} is not installed (`make test` installs it as root: scripts/install-system-packages.sh)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "the Docker daemon does not answer `docker info` within 20 s"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"no Docker daemon answers (`make test` starts one as root: scripts/start-docker.sh): {reason}"
    return None


_NO_DOCKER = _why_no_docker()
if _NO_DOCKER is not None and os.environ.get("REQUIRE_CONTAINER_TESTS") == "1":  # .ci/run: never skipped there
    raise RuntimeError(f"the container tests cannot run: {_NO_DOCKER}")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # the build, from scratch, comes with the first test
    pytest.mark.skipif(_NO_DOCKER is not None, reason=str(_NO_DOCKER)),
]


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    """Call ``predicate`` until it returns something truthy (errors count as not yet); TimeoutError after."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
            last = result
        except (httpx.HTTPError, OrthancHTTPError, psycopg.Error, OSError, KeyError) as error:
            last = error
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:g} s (last: {last!r})")


def docker(*arguments: str) -> str:
    """What ``docker ARGUMENTS`` prints; CalledProcessError where it fails."""
    return subprocess.run(["docker", *arguments], capture_output=True, text=True, check=True).stdout


# --- building --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildSecrets:
    """A CA bundle and a pip configuration for the builds, each with a marker that must not reach any image."""

    ca_bundle: Path
    pip_conf: Path
    markers: tuple[bytes, ...]


def _host_ca_bundle() -> str:
    """The CA bundle pip uses on this machine (the builds reach PyPI through it), or none."""
    configured = subprocess.run(
        [DICOM_NODE.parent / "python", "-m", "pip", "config", "get", "global.cert"], capture_output=True, text=True
    ).stdout.strip()
    for candidate in (os.environ.get("PIP_CERT"), configured, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text()
    return ""


@pytest.fixture(scope="module")
def build_secrets(tmp_path_factory: pytest.TempPathFactory) -> BuildSecrets:
    directory = tmp_path_factory.mktemp("build-secrets")
    marker = f"dicom-node build marker {uuid.uuid4().hex}"
    certificate = directory / "marker.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={marker}"]
        + ["-keyout", str(directory / "marker.key"), "-out", str(certificate)],
        check=True,
        capture_output=True,
    )
    # a line of the certificate's base64 body: found only where the bundle was copied
    certificate_line = certificate.read_text().splitlines()[5].encode()
    ca_bundle = directory / "ca-bundle.pem"
    ca_bundle.write_text(_host_ca_bundle() + certificate.read_text())
    pip_conf = directory / "pip.conf"
    pip_conf.write_text(f"# {marker}\n[global]\ntimeout = 120\n")
    return BuildSecrets(ca_bundle, pip_conf, (marker.encode(), certificate_line))


@pytest.fixture(scope="module")
def images(build_secrets: BuildSecrets) -> list[str]:
    """``make containers`` from scratch (no build cache), with the marked CA bundle and pip configuration."""
    environment = os.environ | {
        "NO_CACHE": "1",
        "CA_BUNDLE": str(build_secrets.ca_bundle),
        "PIP_CONF": str(build_secrets.pip_conf),
    }
    built = subprocess.run(
        ["make", "containers"], cwd=REPO, env=environment, capture_output=True, text=True, timeout=1500
    )
    assert built.returncode == 0, f"make containers failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    return ["dicom-node:local", "dicom-node-orthanc:local", "dicom-node-mlflow:local", "dicom-node-postgres:local"]


def files_holding(image: str, needles: tuple[bytes, ...]) -> list[str]:
    """The files of ``image`` that contain any of ``needles``: every file of every layer (one that a later layer
    deletes included) and the image's configuration and history, read from ``docker save``."""
    found = []
    saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
    assert saved.stdout is not None
    with tarfile.open(fileobj=saved.stdout, mode="r|") as archive:
        for entry in archive:
            reader = archive.extractfile(entry) if entry.isfile() else None
            if reader is None:
                continue
            if entry.name.endswith(".tar"):  # a layer
                with tarfile.open(fileobj=reader, mode="r|") as layer:
                    for member in layer:
                        content = layer.extractfile(member) if member.isfile() else None
                        if content is not None and any(needle in content.read() for needle in needles):
                            found.append(f"{entry.name}:{member.name}")
            elif any(needle in reader.read() for needle in needles):
                found.append(entry.name)
    assert saved.wait() == 0, f"docker save {image} failed"
    return found


def test_no_image_keeps_the_builds_ca_bundle_or_pip_settings(images: list[str], build_secrets: BuildSecrets) -> None:
    for image in images:
        # the layers, and the configuration with the history of every build step
        assert files_holding(image, build_secrets.markers) == [], f"{image} holds the build's CA bundle or pip.conf"
        environment = docker("image", "inspect", "--format", "{{json .Config.Env}}", image)
        assert "PIP_CERT" not in environment and "PIP_CONFIG_FILE" not in environment, f"{image}: {environment}"


# --- running a stack -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """A compose project of the repository's files, under a name of this test run's own."""

    project: str
    files: tuple[str, ...]

    def compose(self, *arguments: str, timeout: float = 300, check: bool = True) -> str:
        files = [argument for name in self.files for argument in ("-f", name)]
        result = subprocess.run(
            ["docker-compose", "-p", self.project, *files, *arguments],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0 or not check, f"docker-compose {' '.join(arguments)}:\n{result.stderr[-3000:]}"
        return result.stdout

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()

    def inspect(self, service: str, template: str) -> str:
        return docker("inspect", "--format", template, self.container(service)).strip()


@contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    """The stack started; on the way out its logs where the test failed, then its containers and volumes gone
    (also after a start that failed half-way, so that none holds the fixed ports for the next test)."""
    try:
        stack.compose("up", "-d")
        yield stack
    except BaseException:
        print(stack.compose("logs", "--no-color", "--tail", "60", check=False))
        raise
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", check=False)


def get_json(url: str) -> Any:
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return response.json()


def node_health(web: str = NODE_WEB) -> dict:
    """The node's ``/health`` once it answers 200."""
    return wait_for(lambda: httpx.get(f"{web}/health", timeout=10).raise_for_status().json(), 180, f"{web}/health")


def mlflow_runs() -> list[dict]:
    """Every run of every experiment of the MLflow container."""
    experiments = httpx.post(f"{MLFLOW}/api/2.0/mlflow/experiments/search", json={"max_results": 100}, timeout=30)
    ids = [experiment["experiment_id"] for experiment in experiments.raise_for_status().json()["experiments"]]
    runs = httpx.post(f"{MLFLOW}/api/2.0/mlflow/runs/search", json={"experiment_ids": ids}, timeout=30)
    return runs.raise_for_status().json().get("runs", [])


def write_phantoms(directory: Path, count: int, seed: int) -> dict[Path, str]:
    """``count`` phantoms, hands and feet in turn: {file: "hand" or "foot"}."""
    subprocess.run(
        [DICOM_NODE, "phantoms", "--out", str(directory), "--n", str(count), "--seed", str(seed), "--task", "both"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    with (directory / "labels.csv").open() as labels:
        return {directory / row["file"]: row["task"] for row in csv.DictReader(labels)}


def send_through_orthanc(phantoms: dict[Path, str]) -> dict[str, str]:
    """Upload each phantom to Orthanc and have Orthanc send them all to the node: {StudyInstanceUID: kind}."""
    uploaded = {ORTHANC.upload(path): kind for path, kind in phantoms.items()}
    ORTHANC.post(f"/modalities/{NODE_MODALITY}/store", {"Resources": list(uploaded), "Synchronous": False})
    return {ORTHANC.get(f"/instances/{ID}/simplified-tags")["StudyInstanceUID"]: kind for ID, kind in uploaded.items()}


def health_once_done(images: int) -> dict | None:
    """The node's ``/health`` once both jobs of every image (inference, outputs) are done."""
    health = node_health()
    return health if health["jobs"] == {"done": 2 * images} else None


def runs_once_logged(images: int) -> list[dict] | None:
    """The MLflow runs once there is a finished one for each image."""
    runs = mlflow_runs()
    finished = len(runs) == images and all(run["info"]["status"] == "FINISHED" for run in runs)
    return runs if finished else None


def sop_classes_by_study(studies: dict[str, str]) -> dict[str, Counter]:
    """How many instances of each SOP class Orthanc holds in each study."""
    return {study: Counter(i["SOPClassUID"] for i in ORTHANC.instances_of_study(study)) for study in studies}


def results_in_orthanc(studies: dict[str, str]) -> dict[str, Counter]:
    """Once every study holds its source, its Secondary Captures, its maps and its report: the SOP classes of each
    study."""

    def complete() -> dict[str, Counter] | None:
        held = sop_classes_by_study(studies)
        for study, kind in studies.items():
            if (
                min(held[study][SecondaryCaptureImageStorage], held[study][ParametricMapStorage])
                < (IMAGES_PER_RESULT_KIND[kind])
            ):
                return None
            if held[study][Comprehensive3DSRStorage] < 1:
                return None
        return held

    return wait_for(complete, 300, "the results of every study in Orthanc", interval=2)


def check_each_result_once(held: dict[str, Counter], studies: dict[str, str]) -> None:
    for study, kind in studies.items():
        sources = sum(count for sop_class, count in held[study].items() if sop_class not in OUTPUT_CLASSES)
        outputs = [held[study][sop_class] for sop_class in (SecondaryCaptureImageStorage, ParametricMapStorage)]
        assert (sources, *outputs, held[study][Comprehensive3DSRStorage]) == (
            1,
            IMAGES_PER_RESULT_KIND[kind],
            IMAGES_PER_RESULT_KIND[kind],
            1,
        ), f"study of a {kind}: {dict(held[study])}"


def process_uid(stack: Stack, service: str) -> int:
    """The user the container's main process runs as, read from the host's /proc."""
    pid = stack.inspect(service, "{{.State.Pid}}")
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))


# --- the demo stack --------------------------------------------------------------------------------------------


def test_the_demo_stack_returns_results_to_orthanc_and_keeps_everything_across_a_restart(
    images: list[str], tmp_path: Path
) -> None:
    phantoms = write_phantoms(tmp_path / "phantoms", 2, seed=7)  # a hand and a foot
    with running(Stack(f"dicomnodedemo{os.getpid()}", ("docker-compose.yml", "docker-compose.hostnet.yml"))) as stack:
        node_health()
        wait_for(lambda: ORTHANC.get("/system"), 60, "Orthanc's REST API")
        studies = send_through_orthanc(phantoms)
        held = results_in_orthanc(studies)
        check_each_result_once(held, studies)

        health = wait_for(lambda: health_once_done(len(phantoms)), 60, "every job done")
        assert set(health["deliveries"]) == {"sent"}, health
        runs = wait_for(lambda: runs_once_logged(len(phantoms)), 120, "an MLflow run of each image")

        assert stack.inspect("node", "{{.Config.User}}") == f"{NODE_UID}:{NODE_UID}"
        assert process_uid(stack, "node") == NODE_UID
        wait_for(lambda: stack.inspect("node", "{{.State.Health.Status}}") == "healthy", 120, "Docker's health check")

        patients = get_json(f"{NODE_WEB}/api/patients")["items"]
        stack.compose("down")  # the containers go; the volumes stay
        stack.compose("up", "-d")

        node_health()
        wait_for(lambda: ORTHANC.get("/system"), 60, "Orthanc's REST API")
        wait_for(mlflow_runs, 60, "MLflow's runs")
        assert get_json(f"{NODE_WEB}/api/patients")["items"] == patients, "the index is kept in its volume"
        for patient in patients:
            for study in get_json(f"{NODE_WEB}/api/patients/{quote(patient['patient_id'])}")["studies"]:
                for series in study["series"]:
                    for instance in series["instances"]:
                        if instance["sop_class_uid"] in OUTPUT_CLASSES:
                            continue
                        uid = instance["sop_instance_uid"]
                        detail = get_json(f"{NODE_WEB}/api/instances/{uid}")
                        assert detail["results"] and detail["mlflow_url"], uid
                        image = httpx.get(f"{NODE_WEB}/api/instances/{uid}/image.png", timeout=30)
                        assert image.status_code == 200, f"{uid}: the received file is kept in its volume"
        assert sorted(run["info"]["run_id"] for run in mlflow_runs()) == sorted(run["info"]["run_id"] for run in runs)
        assert {
            study: Counter(i["SOPClassUID"] for i in ORTHANC.instances_of_study(study)) for study in studies
        } == held


# --- the cluster stack -----------------------------------------------------------------------------------------


def cluster_query(sql: str, *parameters: object) -> list[tuple]:
    """A query on the cluster's PostgreSQL (docker-compose.cluster.hostnet.yml)."""
    return engine_query(CLUSTER_DATABASE, sql, *parameters)


def both_workers_hold_jobs() -> bool:
    held = cluster_query(
        "SELECT DISTINCT worker_id FROM procrastinate_jobs WHERE status = 'doing' AND task_name = %s", "inference"
    )
    return len(held) >= 2


def stalled_workers() -> set[int]:
    """Workers whose last heartbeat is more than two beats old (workers.heartbeat_interval: 5 s)."""
    stalled = cluster_query("SELECT id FROM procrastinate_workers WHERE last_heartbeat < now() - interval '11 s'")
    return {worker for (worker,) in stalled}


def kill_worker_holding_jobs(stack: Stack) -> set[int]:
    """``docker kill`` worker-a while both inference workers run jobs; the jobs it held when it died.

    A dead worker's jobs keep its id and stay 'doing' until a keeper rescues them, ``workers.stalled_after`` (30 s)
    after its last heartbeat: the worker whose heartbeat stopped is worker-a, and what it holds then is exactly
    what it held at the kill. Where that is nothing (it was between two jobs), worker-a starts again and is
    killed again.
    """
    dead_before = stalled_workers()
    for _ in range(3):
        wait_for(both_workers_hold_jobs, 180, "both inference workers running jobs", interval=0.05)
        docker("kill", stack.container("worker-a"))
        dead = wait_for(lambda known=frozenset(dead_before): stalled_workers() - known, 20, "a stopped heartbeat")
        held = cluster_query(
            "SELECT id FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = ANY(%s)", list(dead)
        )
        if held:
            return {job for (job,) in held}
        dead_before |= dead
        stack.compose("start", "worker-a")
        node_health(f"http://127.0.0.1:{CLUSTER_HEALTH_PORTS['worker-a']}")
    raise AssertionError("worker-a held no job at any of three kills")


def test_the_cluster_stack_loses_nothing_when_a_worker_container_is_killed(images: list[str], tmp_path: Path) -> None:
    phantoms = write_phantoms(tmp_path / "phantoms", 16, seed=8)
    files = ("docker-compose.cluster.yml", "docker-compose.cluster.hostnet.yml")
    with running(Stack(f"dicomnodecluster{os.getpid()}", files)) as stack:
        node_health()
        for service, port in CLUSTER_HEALTH_PORTS.items():
            assert node_health(f"http://127.0.0.1:{port}")["status"] == "ok", service
        wait_for(lambda: ORTHANC.get("/system"), 60, "Orthanc's REST API")

        studies = send_through_orthanc(phantoms)
        held = kill_worker_holding_jobs(stack)

        in_orthanc = results_in_orthanc(studies)
        check_each_result_once(in_orthanc, studies)
        health = wait_for(lambda: health_once_done(len(phantoms)), 120, "every job done")
        assert set(health["deliveries"]) == {"sent"}, health
        assert stack.inspect("worker-a", "{{.State.Status}}") == "exited"
        # what the killed worker held went back to the queue and was run again, to the end
        rerun = cluster_query("SELECT state, attempts FROM jobs WHERE id = ANY(%s)", list(held))
        assert len(rerun) == len(held) and all(state == "done" and attempts >= 2 for state, attempts in rerun), rerun
        wait_for(lambda: runs_once_logged(len(phantoms)), 120, "an MLflow run of each image")
