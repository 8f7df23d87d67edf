"""A real Orthanc (Debian's ``orthanc`` package) on free loopback ports, to play the PACS in tests.

:func:`orthanc` starts a throw-away server with its own storage and index under the test's ``tmp_path``
and the given DICOM modalities; :class:`OrthancClient` wraps the parts of its REST API that tests use (of that
server, or of one in a container).
Written against Orthanc 1.10.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.dicom_peers import free_port
from tests.servers import stop

T = TypeVar("T")

ORTHANC = "/usr/sbin/Orthanc"
STARTUP_TIMEOUT = 30.0


class OrthancHTTPError(RuntimeError):
    """An HTTP error status from Orthanc's REST API; ``body`` is its JSON error description when it sent one."""

    def __init__(self, method: str, url: str, status_code: int, body: Any) -> None:
        super().__init__(f"{method} {url} -> HTTP {status_code}: {body}")
        self.status_code = status_code
        self.body = body


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None where it is not installed."""
    return shutil.which("Orthanc") or (ORTHANC if Path(ORTHANC).exists() else None)


def _decoded(response: httpx.Response) -> Any:
    """The JSON of a response, or its text where it is not JSON (or None where it is empty)."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


@dataclass
class OrthancClient:
    """An Orthanc's REST API, wherever it runs: helpers over the parts that tests use."""

    http_url: str
    dicom_port: int
    ae_title: str

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self.http_url + "/" + path.lstrip("/")
        # Long timeout: synchronous C-STOREs answer only once the transfer is over (or has failed).
        response = httpx.request(method, url, timeout=120, **kwargs)
        if response.is_error:
            raise OrthancHTTPError(method, url, response.status_code, _decoded(response))
        return response

    def get(self, path: str) -> Any:
        """GET ``path`` and return its JSON; raises :class:`OrthancHTTPError` on an HTTP error."""
        return _decoded(self._request("GET", path))

    def post(self, path: str, body: Any) -> Any:
        """POST ``body`` (JSON for dicts and lists, raw ``application/dicom`` for bytes, text for str).

        Returns the JSON answer; raises :class:`OrthancHTTPError` on an HTTP error.
        """
        if isinstance(body, bytes):
            response = self._request("POST", path, content=body, headers={"Content-Type": "application/dicom"})
        elif isinstance(body, str):
            response = self._request("POST", path, content=body.encode(), headers={"Content-Type": "text/plain"})
        else:
            response = self._request("POST", path, json=body)
        return _decoded(response)

    def upload(self, path_or_bytes: Path | bytes) -> str:
        """Store a DICOM file (a path or its bytes) through ``POST /instances``; its Orthanc instance ID."""
        data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        return self.post("/instances", data)["ID"]

    def send_to_modality(self, modality: str, resources: list[str], asynchronous: bool = False) -> Any:
        """C-STORE Orthanc resources (any level) to a configured modality.

        Synchronous: returns the job's summary once done (``InstancesCount``, ``FailedInstancesCount``, ...);
        a failed association or transfer raises :class:`OrthancHTTPError` (HTTP 500). Asynchronous: returns
        ``{"ID": job, "Path": "/jobs/<job>"}`` at once.
        """
        body = {"Resources": resources, "Synchronous": not asynchronous}
        return self.post(f"/modalities/{modality}/store", body)

    def studies_by_uid(self, study_instance_uid: str) -> list[str]:
        """The Orthanc IDs of the studies with this StudyInstanceUID (none or one)."""
        found = self.post("/tools/lookup", study_instance_uid)
        return [item["ID"] for item in found if item["Type"] == "Study"]

    def instances_of_study(self, study_instance_uid: str) -> list[dict]:
        """Every instance of a study: its ``simplified-tags`` plus ``ID`` (the Orthanc instance ID).

        Each has at least SOPClassUID, SOPInstanceUID, SeriesInstanceUID and Modality. ``/tools/find`` in
        1.10 has no ``RequestedTags`` and SOPClassUID is not a main DICOM tag, so the instances are read
        one by one.
        """
        instances = []
        for study in self.studies_by_uid(study_instance_uid):
            for instance in self.get(f"/studies/{study}/instances"):
                tags = self.get(f"/instances/{instance['ID']}/simplified-tags")
                instances.append({**tags, "ID": instance["ID"]})
        return instances

    def instance_file(self, orthanc_id: str) -> bytes:
        """The DICOM file of an instance, as Orthanc stored it."""
        return self._request("GET", f"/instances/{orthanc_id}/file").content

    def wait_for(self, predicate: Callable[[], T], timeout: float = 60, interval: float = 0.2) -> T:
        """Call ``predicate`` until it returns something truthy and return that; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() >= deadline:
                name = getattr(predicate, "__qualname__", repr(predicate))
                raise TimeoutError(f"{name} stayed false for {timeout:g} s (last result: {result!r})")
            time.sleep(interval)


@dataclass
class Orthanc(OrthancClient):
    """An Orthanc process of the tests' own, with its storage and log."""

    storage: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    log: Path = field(repr=False)


def _configuration(
    tmp_path: Path, http_port: int, dicom_port: int, ae_title: str, modalities: Mapping[str, tuple[str, str, int]]
) -> dict[str, Any]:
    """An Orthanc configuration for loopback tests: no authentication, any calling AE, nothing kept after."""
    return {
        "Name": f"test-{ae_title}",
        "StorageDirectory": str(tmp_path / "storage"),
        "IndexDirectory": str(tmp_path / "index"),
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "DicomServerEnabled": True,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        # Orthanc 1.10 has no bind address: both servers listen on every interface. RemoteAccessAllowed
        # false makes the REST API refuse every client but localhost; the DICOM port, however, accepts
        # C-ECHO and C-STORE from anyone (synthetic data only, for the length of a test).
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {name: list(modality) for name, modality in modalities.items()},
        "DicomModalitiesInDatabase": False,
        "Plugins": [],  # our own file replaces /etc/orthanc, so no plugin is loaded unless listed here
        "StableAge": 1,
        "SaveJobs": False,
        "HttpDescribeErrors": True,
    }


def _log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def _wait_until_ready(server: Orthanc) -> None:
    """Poll ``GET /system`` until it answers; RuntimeError with the log's tail if Orthanc exits or hangs."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with status {server.process.returncode} while starting:\n{_log_tail(server.log)}"
            )
        try:
            server.get("/system")
            return
        except (httpx.TransportError, OrthancHTTPError):
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"Orthanc did not answer GET /system within {STARTUP_TIMEOUT:g} s:\n{_log_tail(server.log)}"
                ) from None
            time.sleep(0.1)


@contextmanager
def orthanc(
    tmp_path: Path,
    modalities: Mapping[str, tuple[str, str, int]] = {},
    ae_title: str = "ORTHANC",
    dicom_port: int | None = None,
) -> Iterator[Orthanc]:
    """Start a real Orthanc on free loopback ports (HTTP and DICOM) with its own storage under tmp_path and
    the given DICOM modalities {name: (ae_title, host, port)}; stop it (terminate, then kill) on exit."""
    binary = orthanc_binary()
    assert binary is not None, "Orthanc is not installed (apt-get install orthanc)"
    tmp_path.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), dicom_port or free_port()
    config = tmp_path / "orthanc.json"
    config.write_text(json.dumps(_configuration(tmp_path, http_port, dicom_port, ae_title, modalities), indent=2))
    log = tmp_path / "orthanc.log"
    with log.open("wb") as output:
        process = subprocess.Popen([binary, str(config)], stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path)
    server = Orthanc(
        http_url=f"http://127.0.0.1:{http_port}",
        dicom_port=dicom_port,
        ae_title=ae_title,
        storage=tmp_path / "storage",
        process=process,
        log=log,
    )
    try:
        _wait_until_ready(server)
        yield server
    finally:
        stop(process)
