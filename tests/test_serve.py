"""``dicom-node serve`` as an administrator runs it: one process, real DCMTK peers, clean stop on signals."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.synthetic import write_synthetic_dx
from tests.dicom_peers import NODE_AE, dcmtk
from tests.serve_process import REPO, ServeProcess


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path / "storage")
    yield process
    process.ensure_stopped()


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_serve_receives_from_dcmtk_and_stops_cleanly(serve: ServeProcess, tmp_path: Path, signal_number: int) -> None:
    serve.wait_until_ready()
    assert dcmtk("echoscu", "-aec", NODE_AE, "127.0.0.1", serve.dicom_port).returncode == 0
    files = write_synthetic_dx(tmp_path / "in", 3, side=256)
    sent = dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", serve.dicom_port, *files)
    assert sent.returncode == 0, sent.stderr

    status, health = serve.health()
    assert status == 200
    assert health["status"] == "ok"
    assert health["dicom_listener"]["ok"] and health["database"]["ok"] and health["storage"]["ok"]
    assert serve.jobs_when_finished(6) == {"done": 6}, "the served node runs inference and outputs on each image"
    # each hand: the received image, a Secondary Capture and a Parametric Map per sex model, a structured report
    assert len(list((serve.storage / "patients").rglob("*.dcm"))) == 3 * 6

    returncode, output = serve.stop(signal_number)
    assert returncode == 0, output
    assert "stopped" in output
    assert "Traceback" not in output


def test_restart_keeps_the_index_and_sweeps_partial_writes(serve: ServeProcess, tmp_path: Path) -> None:
    serve.wait_until_ready()
    files = write_synthetic_dx(tmp_path / "in", 2, side=128)
    assert dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", serve.dicom_port, *files).returncode == 0
    serve.process.kill()  # no chance to clean up
    serve.process.wait()
    partial = serve.storage / "incoming" / "tmpcrash.part"
    partial.write_bytes(b"half an image")

    again = ServeProcess(serve.storage)
    try:
        again.wait_until_ready()
        assert again.jobs_when_finished(4) == {"done": 4}, "jobs interrupted by the kill resume and finish"
        assert not partial.exists()
        resent = dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", again.dicom_port, *files)
        assert resent.returncode == 0
        assert again.health()[1]["jobs"] == {"done": 4}, "a resend after restart is still idempotent"
    finally:
        returncode, output = again.stop()
    assert returncode == 0, output


def test_serve_on_a_busy_port_exits_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        busy = ServeProcess(tmp_path / "storage", dicom_port=occupant.getsockname()[1])
        returncode, output = busy.wait_for_exit()
    assert returncode == 1
    assert f"cannot listen on 127.0.0.1:{busy.dicom_port}" in output
    assert "Traceback" not in output


def test_sigterm_with_an_open_association_exits_within_the_grace_period(serve: ServeProcess) -> None:
    serve.wait_until_ready()
    ae = AE(ae_title="LINGER")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", serve.dicom_port, ae_title=NODE_AE)
    assert association.is_established
    started = time.monotonic()
    returncode, output = serve.stop(signal.SIGTERM, timeout=40)
    assert returncode == 0, output
    assert time.monotonic() - started < 30
    assert "stopped" in output


def test_an_unusable_storage_root_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the storage root should be")
    process = ServeProcess(blocker / "storage", cwd=tmp_path)
    returncode, output = process.wait_for_exit()
    assert returncode == 1
    assert "cannot use storage root" in output
    assert "Traceback" not in output


def test_a_model_card_that_fails_its_checks_stops_start_up_with_one_line(tmp_path: Path) -> None:
    card = (REPO / "models" / "hallux-valgus-demo.yaml").read_text()
    bad = tmp_path / "foot.yaml"
    bad.write_text(card.replace("sha256: ", "sha256: 0000", 1))
    (tmp_path / "hallux-valgus-demo.pt").symlink_to(REPO / "models" / "hallux-valgus-demo.pt")
    process = ServeProcess(tmp_path / "storage", environment={"DICOM_NODE_INFERENCE__HALLUX_VALGUS_CARD": str(bad)})
    returncode, output = process.wait_for_exit()
    assert returncode == 1
    [line] = output.strip().splitlines()
    assert line.startswith(f"dicom-node: {bad}: weights hallux-valgus-demo.pt have sha256 ")
    with socket.socket() as probe:  # nothing listens: the node did not start without its model
        assert probe.connect_ex(("127.0.0.1", process.dicom_port)) != 0
