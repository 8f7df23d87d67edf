"""``dicom-node serve`` run as an administrator runs it, as a subprocess on free loopback ports, for tests."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from dicom_node.config import InferenceSettings
from dicom_node.inference_jobs import InferenceModels
from tests.dicom_peers import free_port

REPO = Path(__file__).resolve().parents[1]
DICOM_NODE = Path(sys.executable).parent / "dicom-node"
SHIPPED_CONFIG = REPO / "config.yaml"
DEMO_CARDS = {
    "tasks": {
        "hallux_valgus": {"card": REPO / "models" / "hallux-valgus-demo.yaml"},
        "bone_age": {"card": REPO / "models" / "bone-age-demo.yaml"},
    },
}
ANATOMY_CARD = REPO / "models" / "anatomy-demo.yaml"


@functools.cache
def config_without_the_anatomy_check() -> Path:
    """The shipped config.yaml without its anatomy check, written once per process into a directory of its own:
    for tests that send smooth noise (:func:`dicom_node.synthetic.synthetic_dx`) tagged as a hand or a foot, which
    the check rightly routes to no task."""
    settings = yaml.safe_load(SHIPPED_CONFIG.read_text())
    del settings["inference"]["tasks"]["anatomy"]
    path = Path(tempfile.mkdtemp(prefix="dicom-node-config-")) / "config-without-anatomy-check.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def onnx_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models' ONNX graphs, exported once for the session (a minute on a small machine), for
    :func:`with_onnx_graphs`."""
    directory = tmp_path_factory.mktemp("onnx")
    InferenceModels.load(InferenceSettings(**DEMO_CARDS), directory)
    return directory


def with_onnx_graphs(storage: Path, graphs: Path) -> Path:
    """``storage`` with the exported graphs in its cache, so that a node started on it need not export them."""
    shutil.copytree(graphs, storage / "cache" / "onnx")
    return storage


class ServeProcess:
    """A started ``dicom-node serve`` (or ``command``: ``serve --role web``, ``worker --queues ...``) with the
    committed config.yaml and demo model cards, the anatomy check only with ``anatomy_check`` (see
    :func:`config_without_the_anatomy_check`); ``environment`` overrides settings. Its output goes to an anonymous
    file, so that a long, talkative run never blocks on a full pipe."""

    def __init__(
        self,
        storage: Path,
        dicom_port: int | None = None,
        cwd: Path | None = None,
        environment: dict[str, str] | None = None,
        command: Sequence[str] = ("serve",),
        web_port: int | None = None,
        anatomy_check: bool = False,
    ) -> None:
        self.dicom_port = dicom_port or free_port()
        self.web_port = web_port or free_port()
        self.storage = storage
        environment = (
            os.environ
            | {
                "DICOM_NODE_DICOM__HOST": "127.0.0.1",
                "DICOM_NODE_DICOM__PORT": str(self.dicom_port),
                "DICOM_NODE_WEB__PORT": str(self.web_port),
                "DICOM_NODE_STORAGE__ROOT": str(storage),
            }
            | {
                f"DICOM_NODE_INFERENCE__TASKS__{task.upper()}__CARD": str(section["card"])
                for task, section in DEMO_CARDS["tasks"].items()
            }
            | ({"DICOM_NODE_INFERENCE__TASKS__ANATOMY__CARD": str(ANATOMY_CARD)} if anatomy_check else {})
            | (environment or {})
        )
        config = SHIPPED_CONFIG if anatomy_check else config_without_the_anatomy_check()
        self._output = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [DICOM_NODE, *command, "--config", config],
            env=environment,
            cwd=cwd or storage.parent,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def output(self) -> str:
        """Everything the process wrote so far."""
        self._output.seek(0)
        return self._output.read()

    def wait_until_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited early:\n{self.output()}"
            try:
                if self.health()[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the node did not become ready")

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/health", timeout=5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def jobs_when_finished(self, count: int, timeout: float = 90) -> dict[str, int]:
        """The jobs by state once ``count`` jobs exist and none is pending or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.health()[1]["jobs"]
            if sum(jobs.values()) == count and not {"pending", "running"} & set(jobs):
                return jobs
            time.sleep(0.2)
        raise TimeoutError(f"jobs not finished: {self.health()[1]['jobs']}")

    def peak_rss_bytes(self) -> int:
        """The process's peak resident set size so far (VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/<pid>/status")

    def wait_for_exit(self, timeout: float = 60) -> tuple[int, str]:
        """The exit status and the output once the process has exited by itself."""
        self.process.wait(timeout)
        return self.process.returncode, self.output()

    def stop(self, signal_number: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        self.process.send_signal(signal_number)
        return self.wait_for_exit(timeout)

    def ensure_stopped(self) -> None:
        """Kill the process if it still runs (the end of a test that failed midway)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._output.close()
