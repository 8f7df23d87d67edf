"""Helpers that play the PACS side in tests: a pynetdicom SCU, DCMTK's command-line tools, free ports."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, Association, _config
from pynetdicom.sop_class import Verification

NODE_AE = "AINODE"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def send_files(
    port: int, paths: Sequence[Path], *, calling_aet: str = "TESTSCU", called_aet: str = NODE_AE
) -> list[Dataset | None]:
    """C-STORE each file's encoded dataset as it is on disk, in one association.

    Returns one response status dataset per file, or None where no presentation context was accepted
    for the file's SOP class and transfer syntax.
    """
    ae = AE(ae_title=calling_aet)
    ae.maximum_pdu_size = 0
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=called_aet)
    assert association.is_established, "association was not established"
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        responses = []
        for path in paths:
            try:
                responses.append(association.send_c_store(path))
            except ValueError:  # no accepted presentation context for this SOP class / transfer syntax
                responses.append(None)
        return responses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        association.release()


def send_datasets(port: int, datasets: Sequence[Dataset], *, calling_aet: str = "TESTSCU") -> list[Dataset]:
    """C-STORE in-memory datasets (encoded by pynetdicom) in one association."""
    ae = AE(ae_title=calling_aet)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert association.is_established, "association was not established"
    try:
        return [association.send_c_store(ds) for ds in datasets]
    finally:
        association.release()


def associate(port: int, *, calling_aet: str = "TESTSCU", bind_address: str = "127.0.0.1") -> Association:
    """Request a Verification association from ``bind_address``; released at once if the node accepted it."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title=NODE_AE, bind_address=(bind_address, 0))
    if association.is_established:
        association.release()
    return association


def rejection(association: Association) -> tuple[str, str, str]:
    """The result, source and reason of the A-ASSOCIATE-RJ the node answered (PS3.8 Table 9-21), in words."""
    assert association.is_rejected, "the association was not rejected"
    answer = association.acceptor.primitive
    return answer.result_str, answer.source_str, answer.reason_str


def dcmtk(tool: str, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool (echoscu, storescu, ...) and return its completed process."""
    return subprocess.run([tool, *map(str, args)], capture_output=True, text=True, timeout=timeout)
