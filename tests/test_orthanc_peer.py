"""The Orthanc test peer (tests/orthanc.py) against the real server: DCMTK in and out, REST, shutdown.

Tests 1-3 share one server (stopping Orthanc takes ~3 s); the last starts and stops its own.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import FileDataset

from dicom_node.synthetic import synthetic_dx
from tests.dicom_peers import dcmtk, free_port
from tests.orthanc import Orthanc, OrthancHTTPError, orthanc, orthanc_binary
from tests.servers import stop

pytestmark = pytest.mark.skipif(
    orthanc_binary() is None or shutil.which("storescp") is None, reason="Orthanc or DCMTK is not installed"
)

RECEIVER_AE = "STORESCP"


@contextmanager
def storescp(port: int, directory: Path, ae_title: str = RECEIVER_AE) -> Iterator[Path]:
    """A DCMTK ``storescp`` on ``port`` writing what it receives into ``directory``; stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory.parent / f"storescp-{port}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["storescp", "-aet", ae_title, "-od", str(directory), str(port)], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        for _ in range(100):
            if dcmtk("echoscu", "-aec", ae_title, "127.0.0.1", port, timeout=5).returncode == 0:
                break
            assert process.poll() is None, f"storescp exited: {log.read_text(errors='replace')}"
        else:
            raise RuntimeError(f"storescp did not answer C-ECHO on port {port}")
        yield directory
    finally:
        stop(process)


def small_dx(tmp_path: Path, name: str) -> tuple[FileDataset, Path]:
    ds = synthetic_dx(f"ORTHANC-{name}", side=64)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path


@pytest.fixture(scope="module")
def receiver_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, receiver_port: int) -> Iterator[Orthanc]:
    modalities = {
        "receiver": (RECEIVER_AE, "127.0.0.1", receiver_port),
        "down": ("DOWN", "127.0.0.1", free_port()),  # nothing listens there
    }
    with orthanc(tmp_path_factory.mktemp("orthanc"), modalities) as server:
        yield server


def test_echoscu_gets_c_echo_success(pacs: Orthanc) -> None:
    result = dcmtk("echoscu", "-aet", "ANYONE", "-aec", pacs.ae_title, "127.0.0.1", pacs.dicom_port)
    assert result.returncode == 0, result.stderr
    assert pacs.get("/system")["DicomPort"] == pacs.dicom_port


def test_storescu_instance_is_found_and_returned_intact(pacs: Orthanc, tmp_path: Path) -> None:
    ds, path = small_dx(tmp_path, "stored")
    result = dcmtk("storescu", "-aet", "MODALITY1", "-aec", pacs.ae_title, "127.0.0.1", pacs.dicom_port, path)
    assert result.returncode == 0, result.stderr

    instances = pacs.wait_for(lambda: pacs.instances_of_study(ds.StudyInstanceUID), timeout=10)
    assert len(instances) == 1
    (found,) = instances
    assert found["SOPClassUID"] == ds.SOPClassUID
    assert found["SOPInstanceUID"] == ds.SOPInstanceUID
    assert found["SeriesInstanceUID"] == ds.SeriesInstanceUID
    assert found["Modality"] == "DX"
    assert len(pacs.studies_by_uid(ds.StudyInstanceUID)) == 1

    returned = pydicom.dcmread(io.BytesIO(pacs.instance_file(found["ID"])))
    assert returned.SOPInstanceUID == ds.SOPInstanceUID
    assert returned.PixelData == ds.PixelData


def test_send_to_modality_c_stores_to_storescp(pacs: Orthanc, receiver_port: int, tmp_path: Path) -> None:
    ds, path = small_dx(tmp_path, "forwarded")
    instance = pacs.upload(path)
    with storescp(receiver_port, tmp_path / "received") as received:
        summary = pacs.send_to_modality("receiver", [instance])
        assert summary["RemoteAet"] == RECEIVER_AE
        assert (summary["InstancesCount"], summary["FailedInstancesCount"]) == (1, 0)
        (arrived,) = pacs.wait_for(lambda: list(received.iterdir()), timeout=10)
    assert pydicom.dcmread(arrived).SOPInstanceUID == ds.SOPInstanceUID


def test_send_to_a_modality_that_is_down_fails_fast_with_http_500(pacs: Orthanc, tmp_path: Path) -> None:
    _, path = small_dx(tmp_path, "undeliverable")
    instance = pacs.upload(path)
    with pytest.raises(OrthancHTTPError) as failure:
        pacs.send_to_modality("down", [instance])
    assert failure.value.status_code == 500
    assert failure.value.body["OrthancStatus"] == 9  # "Error in the network protocol"
    assert "Connection refused" in failure.value.body["Details"]

    # Asynchronously the job fails instead, and its Content still counts no failed instance.
    job = pacs.send_to_modality("down", [instance], asynchronous=True)
    done = pacs.wait_for(lambda: (state := pacs.get(job["Path"]))["State"] in ("Success", "Failure") and state)
    assert (done["State"], done["ErrorCode"]) == ("Failure", 9)


def test_process_is_gone_after_the_context_exits(tmp_path: Path) -> None:
    with orthanc(tmp_path, ae_title="GONE") as server:
        assert server.get("/system")["DicomAet"] == "GONE"
        pid = server.process.pid
    assert server.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(httpx.TransportError):
        httpx.get(server.http_url + "/system", timeout=2)
