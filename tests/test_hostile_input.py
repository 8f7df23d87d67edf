"""Hostile input: mutated DICOM files through the C-STORE and upload paths (hypothesis, derandomized so CI
sees the same examples every run), garbage and truncated PDUs on the DICOM port, decompression bombs and
oversized images.

The properties: the node keeps answering; every refusal is a named failure status with an Error Comment
(PS3.4 B.2.3) or an HTTP 4xx with a reason; nothing is written outside the storage root or left in
``incoming/`` or the temporary directory; an accepted mutant is stored byte for byte and reads back.
"""

from __future__ import annotations

import io
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, Association, _config
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from sqlalchemy import select

from dicom_node.audit.trail import KEY_FILE as AUDIT_KEY_FILE
from dicom_node.config import InferenceSettings, Settings
from dicom_node.inference_jobs import InferenceJobs, InferenceModels
from dicom_node.ingest import INFERENCE_JOB
from dicom_node.models import Instance, Job, JobState
from dicom_node.node import Node
from dicom_node.outputs.uids import INSTALLATION_SECRET_FILE
from dicom_node.part10 import encoded_dataset
from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.status import EchoStatus, StoreStatus
from dicom_node.synthetic import synthetic_dx
from tests.conftest import NodeFactory, files_under_patients, node_settings, started_nodes, stored_instances
from tests.dicom_peers import NODE_AE, send_datasets, send_files
from tests.pydicom_corpus import TEST_FILES
from web.app import SESSION_KEY_FILE, create_app
from web.dependencies import WebContext

# The statuses a dataset's own faults may earn (PS3.4 Table B.2-1); 0xA700 and 0x0110 would be the node's.
REFUSALS = {StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, StoreStatus.CANNOT_UNDERSTAND}
NETWORK_TIMEOUT = 3.0  # the node's timeouts in the raw-socket tests, seconds
FUZZ = settings(
    max_examples=80,  # about 30 s for the C-STORE path on a 2-core machine
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The top-level entries a node may write under its storage root.
ROOT_ENTRIES = {
    "patients",
    "incoming",
    "results",
    "cache",
    "index.sqlite3",
    "index.sqlite3-wal",
    "index.sqlite3-shm",
    INSTALLATION_SECRET_FILE,
    SESSION_KEY_FILE,
    AUDIT_KEY_FILE,
}
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED_LENGTH = 0xFFFFFFFF


# --- seeds: valid small files as the node receives them -----------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """A valid instance split as a sender holds it: its file meta and its encoded dataset."""

    name: str
    file_meta: FileMetaDataset
    dataset: bytes

    def part10(self, transfer_syntax: str | None = None, dataset: bytes | None = None) -> bytes:
        """The Part 10 file (PS3.10 7.1), its dataset and transfer syntax optionally replaced."""
        meta = FileMetaDataset(self.file_meta)
        meta.TransferSyntaxUID = transfer_syntax or meta.TransferSyntaxUID
        buffer = DicomBytesIO()
        write_file_meta_info(buffer, meta, enforce_standard=True)
        return b"\x00" * 128 + b"DICM" + buffer.getvalue() + (self.dataset if dataset is None else dataset)


def seed_of(name: str, data: bytes) -> Seed:
    """The seed of a Part 10 file's bytes."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    offset = 128 + 4 + 12 + ds.file_meta.FileMetaInformationGroupLength  # PS3.10 7.1: preamble, DICM, group
    return Seed(name, ds.file_meta, data[offset:])


def synthetic_seed(transfer_syntax: str) -> Seed:
    """A synthetic 12-bit hand, 64 x 64 (JPEG 2000's default of 6 resolutions needs 64), in ``transfer_syntax``."""
    ds = synthetic_dx(f"FUZZ-{uid.UID(transfer_syntax).keyword}", side=64)
    if uid.UID(transfer_syntax).is_encapsulated:
        ds.compress(transfer_syntax)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return seed_of(f"synthetic {uid.UID(transfer_syntax).name}", buffer.getvalue())


CORPUS = (
    "SC_rgb_small_odd.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "SC_rgb_rle.dcm",
    "JPEG2000.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "dicomdirtests/77654033/CR1/6154",
)
SYNTHETIC_SEEDS = [
    synthetic_seed(transfer_syntax)
    for transfer_syntax in (
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
    )
]
SEEDS = SYNTHETIC_SEEDS + [seed_of(name, (TEST_FILES / name).read_bytes()) for name in CORPUS]
# Uploads the node's routing sends to a model: a colour or derived image is refused before it is ingested.
UPLOAD_SEEDS = SYNTHETIC_SEEDS + [seed for seed in SEEDS if seed.name == "dicomdirtests/77654033/CR1/6154"]


# --- mutations ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    """Where a top-level data element lies in an encoded dataset (PS3.5 7.1)."""

    start: int
    vr_at: int | None  # None in implicit VR
    length_at: int
    length_size: int
    end: int


def elements(data: bytes, implicit: bool, little: bool) -> list[Element]:
    """The top-level elements of ``data``, up to the first of undefined length (its end is not known here)."""
    order = "<" if little else ">"
    found, at = [], 0
    while at + 8 <= len(data):
        vr = None if implicit else data[at + 4 : at + 6]
        if vr is None or vr in _LONG_LENGTH_VRS:
            length_at, length_size = at + (4 if implicit else 8), 4
        else:
            length_at, length_size = at + 6, 2
        if length_at + length_size > len(data):
            break
        [length] = struct.unpack(order + ("L" if length_size == 4 else "H"), data[length_at : length_at + length_size])
        end = length_at + length_size + length
        found.append(Element(at, None if implicit else at + 4, length_at, length_size, min(end, len(data))))
        if length == _UNDEFINED_LENGTH or end > len(data):
            break
        at = end
    return found


@dataclass(frozen=True)
class Mutation:
    """One change to an encoded dataset; ``at`` and ``other`` are taken modulo what they index."""

    kind: str
    at: int
    other: int = 0
    payload: bytes = b""

    def __call__(self, data: bytes, implicit: bool, little: bool) -> bytes:
        if not data:
            return data
        if self.kind in _BYTE_MUTATIONS:
            return _BYTE_MUTATIONS[self.kind](data, self.at % len(data), self)
        found = elements(data, implicit, little)
        if not found:
            return data
        element = found[self.at % len(found)]
        return _ELEMENT_MUTATIONS[self.kind](data, element, found[self.other % len(found)], self, little)


def _flip(data: bytes, at: int, mutation: Mutation) -> bytes:
    return data[:at] + bytes([data[at] ^ (mutation.other % 255 + 1)]) + data[at + 1 :]


def _truncate(data: bytes, at: int, mutation: Mutation) -> bytes:
    return data[:at]


def _insert(data: bytes, at: int, mutation: Mutation) -> bytes:
    return data[:at] + mutation.payload + data[at:]


def _huge_length(data: bytes, element: Element, other: Element, mutation: Mutation, little: bool) -> bytes:
    size = element.length_size
    value = (_UNDEFINED_LENGTH, 0xFFFFFFFE, 0x7FFFFFFF, 0x10000001, 0xFFFF)[mutation.other % 5] & (2 ** (8 * size) - 1)
    encoded = value.to_bytes(size, "little" if little else "big")
    return data[: element.length_at] + encoded + data[element.length_at + size :]


def _duplicate(data: bytes, element: Element, other: Element, mutation: Mutation, little: bool) -> bytes:
    """The element again before ``other``: a repeated tag, or tags out of ascending order."""
    return data[: other.start] + data[element.start : element.end] + data[other.start :]


def _odd_vr(data: bytes, element: Element, other: Element, mutation: Mutation, little: bool) -> bytes:
    if element.vr_at is None:
        return data
    vr = (b"SQ", b"UN", b"OB", b"UT", b"US", b"XX", b"\x00\x00", b"DS", b"AT")[mutation.other % 9]
    return data[: element.vr_at] + vr + data[element.vr_at + 2 :]


def _drop(data: bytes, element: Element, other: Element, mutation: Mutation, little: bool) -> bytes:
    return data[: element.start] + data[element.end :]


_BYTE_MUTATIONS: dict[str, Callable[[bytes, int, Mutation], bytes]] = {
    "flip": _flip,
    "truncate": _truncate,
    "insert": _insert,
}
_ELEMENT_MUTATIONS = {"huge-length": _huge_length, "duplicate": _duplicate, "odd-vr": _odd_vr, "drop": _drop}


def mutations_of(kinds: Iterable[str]) -> st.SearchStrategy[Mutation]:
    """Mutations of ``kinds``, at any byte or element of a dataset of up to 1 MiB."""
    return st.builds(
        Mutation,
        kind=st.sampled_from(sorted(kinds)),
        at=st.integers(0, 2**20),
        other=st.integers(0, 2**10),
        payload=st.binary(min_size=1, max_size=64),
    )


mutations = mutations_of(_BYTE_MUTATIONS.keys() | _ELEMENT_MUTATIONS.keys())
byte_mutations = mutations_of(_BYTE_MUTATIONS)


@dataclass(frozen=True)
class Mutant:
    """A seed's dataset after ``changes``, sent under ``transfer_syntax`` (its own, or a mismatched one)."""

    seed: Seed
    changes: tuple[Mutation, ...]
    transfer_syntax: str

    @property
    def dataset(self) -> bytes:
        encoding = uid.UID(self.seed.file_meta.TransferSyntaxUID)
        data = self.seed.dataset
        for change in self.changes:
            data = change(data, encoding.is_implicit_VR, encoding.is_little_endian)
        return data

    def __repr__(self) -> str:  # hypothesis prints the falsifying example with it
        return f"Mutant({self.seed.name!r}, {list(self.changes)!r}, {uid.UID(self.transfer_syntax).name!r})"


@st.composite
def mutants(draw: st.DrawFn, seeds: list[Seed] = SEEDS) -> Mutant:
    """One to three mutations of one of ``seeds``; one in four sent under another transfer syntax."""
    seed = draw(st.sampled_from(seeds))
    mismatched = draw(st.integers(0, 3)) == 0
    transfer_syntax = (
        draw(st.sampled_from(ACCEPTED_TRANSFER_SYNTAXES)) if mismatched else seed.file_meta.TransferSyntaxUID
    )
    return Mutant(seed, tuple(draw(st.lists(mutations, min_size=1, max_size=3))), transfer_syntax)


# --- the node under attack ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The process's temporary directory (:mod:`tempfile`), empty, so that anything left in it shows."""
    directory = tmp_path_factory.mktemp("tempdir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(directory))
        yield directory


@pytest.fixture(scope="module")
def fuzzed_node(tmp_path_factory: pytest.TempPathFactory, scratch_tempdir: Path) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("fuzzed")
    with started_nodes(lambda **dicom: node_settings(root / "storage", **dicom)) as start:
        yield start(accept_all_storage=True)


@pytest.fixture(scope="module")
def sender_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the fuzzing sender writes its files, outside the node's storage root and temporary directory."""
    return tmp_path_factory.mktemp("sender")


@dataclass(frozen=True)
class Snapshot:
    files: frozenset[PurePosixPath]  # under the storage root, but the index's own
    instances: int


def snapshot(node: Node) -> Snapshot:
    root = node.store.root
    files = frozenset(
        PurePosixPath(path.relative_to(root).as_posix())
        for path in root.rglob("*")
        if path.is_file() and not path.name.startswith("index.sqlite3")
    )
    return Snapshot(files, len(stored_instances(node)))


def assert_storage_clean(node: Node, tempdir: Path) -> None:
    """Nothing in ``incoming/`` or the temporary directory, nothing at the root but the node's own entries, and
    every stored instance at its place: patients/<key>/<study>/<series>/<sop>.dcm."""
    assert not list(node.store.incoming.iterdir()), "a refusal left a temporary file"
    assert not list(tempdir.iterdir()), "something was written to the temporary directory"
    assert {path.name for path in node.store.root.iterdir()} <= ROOT_ENTRIES
    for path in files_under_patients(node):
        relative = path.relative_to(node.store.root / "patients")
        assert len(relative.parts) == 4 and path.suffix == ".dcm", relative


def assert_unchanged_or_readable(node: Node, before: Snapshot, accepted: bool, sent: bytes | None) -> None:
    """A refusal changed nothing; an accepted instance is indexed and reads back (byte for byte if ``sent``)."""
    after = snapshot(node)
    if not accepted:
        assert after == before, "a refused instance changed the storage or the index"
        return
    for added in (path for path in after.files - before.files if path.parts[0] == "patients"):
        stored = node.store.absolute(added)
        ds = pydicom.dcmread(stored)
        if sent is not None:
            assert encoded_dataset(stored) == sent
        with node.sessions() as session:
            assert session.scalar(select(Instance.path).where(Instance.sop_instance_uid == ds.SOPInstanceUID)) == str(
                added
            )


# --- 1a. the C-STORE path -----------------------------------------------------------------------------------


@contextmanager
def fuzzing_association(port: int, sop_class: str, transfer_syntax: str) -> Iterator[Association]:
    """An association proposing ``sop_class`` in ``transfer_syntax``, DX storage and Verification; the SCU gives up
    after 10 s of silence."""
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(sop_class, transfer_syntax)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, uid.ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert association.is_established, "the node no longer accepts associations"
    try:
        yield association
    finally:
        association.release()


def c_store_raw(association: Association, path: Path) -> Dataset:
    """C-STORE the dataset of the file at ``path`` exactly as encoded there: pynetdicom sends a file's bytes
    without decoding them when told to send it in chunks."""
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return association.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def assert_proper_answer(response: Dataset) -> bool:
    """Success, or a refusal for the dataset's fault with an Error Comment; True for Success."""
    assert "Status" in response, "no C-STORE response: the association hung or was aborted"
    if response.Status == StoreStatus.SUCCESS:
        return True
    assert response.Status in REFUSALS, f"0x{response.Status:04X} {response.get('ErrorComment')}"
    assert response.get("ErrorComment"), "a refusal carries its reason"
    return False


def assert_still_serves(association: Association) -> None:
    """The association answers C-ECHO and stores a valid instance."""
    assert association.send_c_echo().Status == EchoStatus.SUCCESS
    valid = synthetic_dx("STILL-STORES", side=32)
    assert association.send_c_store(valid).Status == StoreStatus.SUCCESS


@pytest.mark.timeout(300)
@FUZZ
@given(mutant=mutants())
def test_mutated_datasets_over_c_store_get_a_named_status_and_leave_no_trace(
    fuzzed_node: Node, scratch_tempdir: Path, sender_directory: Path, mutant: Mutant
) -> None:
    path = sender_directory / "mutant.dcm"
    dataset = mutant.dataset
    path.write_bytes(mutant.seed.part10(mutant.transfer_syntax, dataset))
    before = snapshot(fuzzed_node)
    sop_class = mutant.seed.file_meta.MediaStorageSOPClassUID
    with fuzzing_association(fuzzed_node.settings.dicom.port, sop_class, mutant.transfer_syntax) as association:
        response = c_store_raw(association, path)
        accepted = assert_proper_answer(response)
        event(f"0x{response.Status:04X} {response.get('ErrorComment', '')}")  # --hypothesis-show-statistics
        assert_unchanged_or_readable(fuzzed_node, before, accepted, dataset)
        assert_storage_clean(fuzzed_node, scratch_tempdir)
        assert_still_serves(association)


# --- 1b. the upload path ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upload_node(tmp_path_factory: pytest.TempPathFactory, scratch_tempdir: Path) -> Iterator[Node]:
    settings = Settings(storage={"root": tmp_path_factory.mktemp("uploads") / "storage"}, workers={"count": 0})
    node = Node(settings, models=InferenceModels.load(InferenceSettings(runtime="torch")))  # the demo cards
    yield node
    node.engine.dispose()


def client_of(node: Node, **web: object) -> TestClient:
    settings = node.settings.model_copy(
        update={"web": type(node.settings.web).model_validate(node.settings.web.model_dump() | web)}
    )
    return TestClient(create_app(WebContext(settings, node.sessions, lambda: True, node=node)))


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A mutant's whole Part 10 file, then perhaps bytes changed anywhere in it (the file meta too); of seeds the
    node's routing sends to a model, so that most mutants reach the ingest."""
    mutant = draw(mutants(UPLOAD_SEEDS))
    data = mutant.seed.part10(mutant.transfer_syntax, mutant.dataset)
    for change in draw(st.lists(byte_mutations, max_size=2)):
        data = change(data, False, True)
    return data


def assert_proper_http_answer(response: Response) -> bool:
    """200, or a 4xx with a reason in words; True for 200."""
    if response.status_code == 200:
        return True
    assert 400 <= response.status_code < 500, f"{response.status_code} {response.text}"
    assert isinstance(response.json()["detail"], str) and response.json()["detail"], "a refusal has a reason"
    return False


@pytest.fixture(scope="module")
def upload_client(upload_node: Node) -> TestClient:
    return client_of(upload_node)


@pytest.mark.timeout(300)
@FUZZ
@given(data=mutated_files())
def test_mutated_dicom_uploads_get_200_or_a_4xx_with_a_reason_and_leave_no_trace(
    upload_node: Node, upload_client: TestClient, scratch_tempdir: Path, data: bytes
) -> None:
    before = snapshot(upload_node)
    response = upload_client.post("/predict", files={"image": ("mutant.dcm", data, "application/dicom")})
    accepted = assert_proper_http_answer(response)
    event(f"{response.status_code} {'' if accepted else response.json()['detail']}"[:80])
    # an upload refused after it was stored (inference found nothing to run) keeps what was stored
    stored = snapshot(upload_node).instances > before.instances
    assert_unchanged_or_readable(upload_node, before, accepted or stored, None)
    assert_storage_clean(upload_node, scratch_tempdir)


def test_an_upload_over_max_upload_mb_is_413_with_a_reason_and_changes_nothing(
    upload_node: Node, scratch_tempdir: Path
) -> None:
    client = client_of(upload_node, max_upload_mb=1)
    ds = synthetic_dx("UPLOAD-TOO-BIG", side=800)  # 1.2 MiB of pixels: a valid DICOM file, just too large
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    before = snapshot(upload_node)

    response = client.post("/predict", files={"image": ("big.dcm", buffer.getvalue())})
    assert response.status_code == 413
    assert "upload limit of 1 MiB" in response.json()["detail"]
    assert snapshot(upload_node) == before
    assert_storage_clean(upload_node, scratch_tempdir)


# --- 2. garbage and truncated PDUs on the DICOM port --------------------------------------------------------


def associate_rq(calling_ae: str = "RAWPEER") -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing DX storage in explicit VR little endian."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title, primitive.called_ae_title = calling_ae, NODE_AE
    context = build_context(DigitalXRayImageStorageForPresentation, uid.ExplicitVRLittleEndian)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    maximum.maximum_length_received = 16382
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def p_data_cut_mid_pdv() -> bytes:
    """A P-DATA-TF PDU (PS3.8 9.3.5) announcing 1000 bytes, whose one PDV item stops after 40 of them."""
    return struct.pack(">BBL", 0x04, 0, 1000) + struct.pack(">LBB", 994, 1, 0x01) + b"\x08\x00" * 20


@dataclass(frozen=True)
class Attack:
    """Bytes sent to the node on a raw connection, then the connection closed or left open (half-open)."""

    name: str
    chunks: tuple[bytes, ...]
    close: bool
    await_accept: bool = False  # read the A-ASSOCIATE-AC after the first chunk


ATTACKS = (
    Attack("random bytes", (np.random.default_rng(7).bytes(4096),), close=True),
    Attack("A-ASSOCIATE-RQ announcing 4 GiB, then closed", (b"\x01\x00\xff\xff\xff\xff" + b"\x00\x01",), close=True),
    Attack("A-ASSOCIATE-RQ announcing 4 GiB, then silent", (b"\x01\x00\xff\xff\xff\xff" + b"\x00\x01",), close=False),
    Attack("A-ASSOCIATE-RQ cut short, then silent", (associate_rq()[:30],), close=False),
    Attack("P-DATA cut mid-PDV, then closed", (associate_rq(), p_data_cut_mid_pdv()), close=True, await_accept=True),
    Attack("P-DATA cut mid-PDV, then silent", (associate_rq(), p_data_cut_mid_pdv()), close=False, await_accept=True),
    Attack("associated, then silent", (associate_rq(),), close=False, await_accept=True),
)


def attack(port: int, how: Attack) -> float:
    """Send ``how``'s bytes; return the seconds until the node closed the connection (read to end of stream)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5 * NETWORK_TIMEOUT) as connection:
        first, *rest = how.chunks
        connection.sendall(first)
        if how.await_accept:
            assert connection.recv(1) == b"\x02", "A-ASSOCIATE-AC expected"
        for chunk in rest:
            connection.sendall(chunk)
        if how.close:
            connection.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        while connection.recv(65536):  # whatever the node answers (A-ABORT, A-ASSOCIATE-RJ), then its close
            pass
        return time.monotonic() - started


class SteadySender:
    """A valid association storing an instance every 50 ms in a thread, for as long as the test runs."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="STEADY")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, uid.ExplicitVRLittleEndian)
        self.association = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        assert self.association.is_established
        self.statuses: list[int | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        number = 0
        while not self._stop.wait(0.05):
            response = self.association.send_c_store(synthetic_dx(f"STEADY-{number}", side=32, seed=number))
            self.statuses.append(response.get("Status"))
            number += 1

    def __enter__(self) -> SteadySender:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.association.release()


@pytest.mark.timeout(120)
def test_garbage_and_truncated_pdus_close_their_connection_and_spare_a_concurrent_association(
    start_node: NodeFactory,
) -> None:
    node = start_node(acse_timeout=NETWORK_TIMEOUT, dimse_timeout=NETWORK_TIMEOUT, network_timeout=NETWORK_TIMEOUT)
    port = node.settings.dicom.port
    with SteadySender(port) as steady:
        closed_after = {}
        threads = [
            threading.Thread(target=lambda how=how: closed_after.__setitem__(how.name, attack(port, how)))
            for how in ATTACKS
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5 * NETWORK_TIMEOUT)
        time.sleep(0.5)  # the steady sender stores on after the attacks
        assert steady.association.is_established
    assert set(closed_after) == {how.name for how in ATTACKS}, "the node left a connection open"
    assert max(closed_after.values()) < 3 * NETWORK_TIMEOUT, closed_after
    assert len(steady.statuses) >= 10 and set(steady.statuses) == {StoreStatus.SUCCESS}
    assert not list(node.store.incoming.iterdir())
    [later] = send_datasets(port, [synthetic_dx("AFTER-ATTACKS", side=32)])
    assert later.Status == StoreStatus.SUCCESS


# --- 3. decompression bombs and oversized images ------------------------------------------------------------


def encapsulated(transfer_syntax: str, rows: int, columns: int, frames: int = 1) -> Dataset:
    """An 8-bit DX whose header claims ``rows`` x ``columns`` x ``frames`` over a tiny codestream of 64 x 64."""
    ds = synthetic_dx(f"BOMB-{uid.UID(transfer_syntax).keyword}", side=64)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.full((64, 64), 128, np.uint8).tobytes()
    if transfer_syntax == uid.JPEGBaseline8Bit:  # pydicom has no JPEG baseline encoder: Pillow's codestream
        buffer = io.BytesIO()
        Image.fromarray(np.full((64, 64), 128, np.uint8)).save(buffer, format="JPEG")
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    else:
        ds.compress(transfer_syntax)
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


@pytest.mark.parametrize("transfer_syntax", [uid.JPEGBaseline8Bit, uid.JPEGLSLossless, uid.JPEG2000Lossless])
def test_a_compressed_image_claiming_65535_x_65535_is_refused_without_retry(
    node: Node, transfer_syntax: str, tmp_path: Path
) -> None:
    ds = encapsulated(transfer_syntax, 65535, 65535)
    path = tmp_path / "claims.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 10_000
    [response] = send_files(node.settings.dicom.port, [path])

    assert response.Status == StoreStatus.CANNOT_UNDERSTAND
    assert "4294836225 pixels exceed dicom.max_image_pixels" in response.ErrorComment
    assert stored_instances(node) == [] and files_under_patients(node) == []
    assert not list(node.store.incoming.iterdir())


def test_rows_columns_frames_beyond_max_image_pixels_are_refused(start_node: NodeFactory, tmp_path: Path) -> None:
    node = start_node(max_image_pixels=64 * 64 * 3)
    three_frames = encapsulated(uid.RLELossless, 64, 64, frames=3)
    four_frames = encapsulated(uid.RLELossless, 64, 64, frames=4)
    paths = []
    for name, ds in (("three", three_frames), ("four", four_frames)):
        paths.append(tmp_path / f"{name}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    within, beyond = send_files(node.settings.dicom.port, paths)

    assert within.Status == StoreStatus.SUCCESS, "at the limit: accepted (not decoded at ingest)"
    assert beyond.Status == StoreStatus.CANNOT_UNDERSTAND
    assert beyond.ErrorComment == "16384 pixels exceed dicom.max_image_pixels"
    assert [instance.sop_instance_uid for instance in stored_instances(node)] == [three_frames.SOPInstanceUID]


def test_a_dicom_upload_beyond_max_image_pixels_is_413_and_not_stored(
    upload_node: Node, upload_client: TestClient
) -> None:
    ds = encapsulated(uid.JPEGLSLossless, 65535, 65535)
    ds.BodyPartExamined = "HAND"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    before = snapshot(upload_node)

    response = upload_client.post("/predict", files={"image": ("claims.dcm", buffer.getvalue())})
    assert response.status_code == 413, response.text
    assert "max_image_pixels" in response.json()["detail"]
    assert snapshot(upload_node) == before


def inference_job_of(ds: Dataset, root: Path, max_image_pixels: int) -> Job:
    """Ingest ``ds``, run its inference job once with pixel decoding replaced by a failure, return the job."""
    node = Node(Settings(storage={"root": root / "storage"}, workers={"count": 0}))
    path = root / "stored.dcm"
    ds.save_as(path, enforce_file_format=True)
    node.ingestor.ingest(pydicom.filereader.read_file_meta_info(path), [encoded_dataset(path)], "MODALITY")
    models = InferenceModels(dict.fromkeys(node.settings.inference.tasks, object()))  # never reached: refused before
    node.workers.handlers[INFERENCE_JOB] = InferenceJobs(
        node.settings.inference, models, node.store, node.sessions, max_image_pixels=max_image_pixels
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Dataset, "pixel_array", property(lambda ds: pytest.fail("the image was decoded")))
        assert node.workers.run_once()
    with node.sessions() as session:
        job = session.scalars(select(Job)).one()
    node.engine.dispose()
    return job


def test_an_upload_whose_pixel_data_is_shorter_than_its_header_says_is_422_and_not_retried(
    upload_node: Node, upload_client: TestClient
) -> None:
    # found by the upload fuzz: pydicom's ValueError was taken for a passing fault, the job retried, the answer 503
    ds = synthetic_dx("SHORT-PIXELS", side=64)
    ds.Columns = 128  # a PixelData of 64 x 64 values
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)

    response = upload_client.post("/predict", files={"image": ("short.dcm", buffer.getvalue())})
    assert response.status_code == 422, response.text
    assert "the pixels cannot be decoded" in response.json()["detail"]
    with upload_node.sessions() as session:
        job = session.scalar(
            select(Job)
            .join(Instance, Job.instance_pk == Instance.id)
            .where(Instance.sop_instance_uid == ds.SOPInstanceUID)
        )
        assert (job.state, job.attempts) == (JobState.FAILED, 1), "no retry reads it"


def test_the_worker_fails_an_image_beyond_max_image_pixels_without_decoding_it(tmp_path: Path) -> None:
    # stored before dicom.max_image_pixels was lowered
    job = inference_job_of(synthetic_dx("PAT-LOWERED", side=128), tmp_path, max_image_pixels=100 * 100)
    assert (job.state, job.attempts) == (JobState.FAILED, 1), "failed at once: no retry reads it"
    assert job.last_error == "ImageTooLarge: 16384 pixels exceed dicom.max_image_pixels"


def claiming_65535_x_65535(frame: bytes, transfer_syntax: str) -> bytes:
    """``frame`` with its codestream header's dimensions set to 65535 x 65535: the JPEG and JPEG-LS frame header
    (ISO/IEC 10918-1 B.2.2), the JPEG 2000 SIZ segment (ISO/IEC 15444-1 A.5.1)."""
    if uid.UID(transfer_syntax).name.startswith("JPEG 2000"):
        return frame[:8] + struct.pack(">4L", 65535, 65535, 0, 0) + frame[24:]
    sof = frame.index(b"\xff\xf7" if transfer_syntax == uid.JPEGLSLossless else b"\xff\xc0")
    return frame[: sof + 5] + struct.pack(">HH", 65535, 65535) + frame[sof + 9 :]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transfer_syntax", [uid.JPEGBaseline8Bit, uid.JPEGLSLossless, uid.JPEG2000Lossless])
def test_a_codestream_claiming_more_than_rows_and_columns_is_not_decoded(tmp_path: Path, transfer_syntax: str) -> None:
    # pylibjpeg spends minutes and gigabytes on a 65535 x 65535 JPEG frame header over a 64 x 64 image
    ds = encapsulated(transfer_syntax, 64, 64)
    [frame] = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([claiming_65535_x_65535(frame, transfer_syntax)])

    job = inference_job_of(ds, tmp_path, max_image_pixels=10**8)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    assert "codestream declares 65535 x 65535 pixels, Rows x Columns 64 x 64" in job.last_error
