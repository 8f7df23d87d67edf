"""No patient data in the node's log at INFO, over the whole pipeline as an administrator runs it: `dicom-node
serve` receives an X-ray from DCMTK, runs inference, writes its Secondary Captures and report, delivers them to
a real Orthanc and tracks the run in MLflow; the log it printed never names the patient."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dicom_node.phantoms.generator import render_phantom
from tests.dicom_peers import NODE_AE, dcmtk
from tests.orthanc import orthanc
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.slow

PATIENT_ID = "PHI-7781-SECRET"
FAMILY_NAME, GIVEN_NAME = "Zzyzxfamily", "Quolliegiven"
BIRTH_DATE = "20110304"
ACCESSION = "ACC-PHI-4242"


def patient_hand(path: Path) -> Path:
    ds, _ = render_phantom(31, 0, "hand")
    ds.PatientID = PATIENT_ID
    ds.PatientName = f"{FAMILY_NAME}^{GIVEN_NAME}"
    ds.PatientBirthDate = BIRTH_DATE
    ds.AccessionNumber = ACCESSION
    ds.save_as(path, enforce_file_format=True)
    return path


def wait_until_delivered(node: ServeProcess, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliveries = node.health()[1]["deliveries"]
        if deliveries.get("sent", 0) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"deliveries not done: {node.health()[1]['deliveries']}")


def test_the_served_pipeline_logs_no_patient_data_at_info(tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc") as pacs:
        destination = {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
        node = ServeProcess(
            tmp_path / "storage",
            environment={
                "DICOM_NODE_LOGGING__LEVEL": "INFO",
                "DICOM_NODE_DESTINATIONS": json.dumps([destination]),
                "DICOM_NODE_DELIVERY__DEFAULT_DESTINATION": "pacs",
                "DICOM_NODE_DELIVERY__POLL_INTERVAL": "0.1",
                "DICOM_NODE_MLFLOW__POLL_INTERVAL": "0.2",
            },
        )
        try:
            node.wait_until_ready(timeout=180)
            sent = dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", node.dicom_port, patient_hand(tmp_path / "a.dcm"))
            assert sent.returncode == 0, sent.stderr
            # a hand: a Secondary Capture per sex model and the structured report
            wait_until_delivered(node, 3)
        finally:
            returncode, output = node.stop()
    assert returncode == 0, output

    assert "stored" in output and "sent to pacs" in output, "the log does describe what happened:\n" + output
    assert "highdicom" not in output, "highdicom's lines (one per module copied, per object) are for DEBUG"
    for secret in (PATIENT_ID, FAMILY_NAME, GIVEN_NAME, BIRTH_DATE, ACCESSION):
        assert secret not in output, f"{secret} in the log:\n{output}"
