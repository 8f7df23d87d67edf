"""The containers' health check (``python -m dicom_node.probe``): exit 0 only on a 200 from the node's /health."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dicom_node.probe import main
from tests.dicom_peers import free_port


@contextmanager
def health_endpoint(status: int) -> Iterator[int]:
    """An HTTP server on a free loopback port whose every GET answers ``status``; its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def config_for(tmp_path: Path, port: int, host: str = "0.0.0.0") -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"web:\n  host: {host}\n  port: {port}\nstorage:\n  root: {tmp_path / 'storage'}\n")
    return config


@pytest.mark.parametrize(("status", "exit_status"), [(200, 0), (503, 1)])
def test_the_probe_passes_only_on_a_200(tmp_path: Path, status: int, exit_status: int) -> None:
    with health_endpoint(status) as port:
        assert main(["--config", str(config_for(tmp_path, port))]) == exit_status


def test_a_node_that_does_not_answer_is_unhealthy_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    assert main(["--config", str(config_for(tmp_path, port, host="127.0.0.1"))]) == 1
    assert f"http://127.0.0.1:{port}/health" in capsys.readouterr().err


def test_a_bad_config_is_one_line_and_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("web:\n  port: not-a-port\n")
    assert main(["--config", str(config)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
