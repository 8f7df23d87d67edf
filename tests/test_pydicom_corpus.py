"""Every storage-class file among pydicom's bundled test files, sent to the node as it is on disk."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from dicom_node.models import Instance
from dicom_node.node import Node
from dicom_node.part10 import encoded_dataset
from dicom_node.status import StoreStatus
from tests.dicom_peers import send_files
from tests.pydicom_corpus import CorpusFile, storage_files

# Files pydicom ships as deliberately broken, with what the node must say about them.
KNOWN_BROKEN = {
    "MR_truncated.dcm": (StoreStatus.CANNOT_UNDERSTAND, "dataset is truncated"),
    "rtplan_truncated.dcm": (StoreStatus.CANNOT_UNDERSTAND, "dataset is truncated"),
}

CORPUS = storage_files()


def expected_status(item: CorpusFile) -> StoreStatus:
    if item.name in KNOWN_BROKEN:
        return KNOWN_BROKEN[item.name][0]
    if not item.has_identifiers:
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if "Image Storage" in item.sop_class_uid.name and not item.has_pixel_data:
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    return StoreStatus.SUCCESS


def test_corpus_covers_every_kind_of_case() -> None:
    statuses = {expected_status(item) for item in CORPUS}
    assert statuses == {
        StoreStatus.SUCCESS,
        StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        StoreStatus.CANNOT_UNDERSTAND,
    }
    assert len({item.transfer_syntax_uid for item in CORPUS if expected_status(item) == StoreStatus.SUCCESS}) >= 10


def first_sent_with_uid() -> dict[str, CorpusFile]:
    """The corpus holds one image in several encodings under one SOP Instance UID: the first one sent is kept."""
    first: dict[str, CorpusFile] = {}
    for item in CORPUS:
        if expected_status(item) == StoreStatus.SUCCESS:
            first.setdefault(item.sop_instance_uid, item)
    return first


@pytest.fixture(scope="module")
def corpus_node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    from tests.conftest import node_settings

    node = Node(node_settings(tmp_path_factory.mktemp("corpus") / "storage", accept_all_storage=True))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def responses(corpus_node: Node) -> dict[str, object]:
    """Send the whole corpus, in associations of at most 40 files (the 128-context limit)."""
    answers = {}
    for start in range(0, len(CORPUS), 40):
        batch = CORPUS[start : start + 40]
        for item, response in zip(
            batch, send_files(corpus_node.settings.dicom.port, [i.path for i in batch]), strict=True
        ):
            answers[item.name] = response
    return answers


@pytest.mark.parametrize("item", CORPUS, ids=lambda item: item.name)
def test_corpus_file_is_stored_byte_for_byte_or_refused(
    item: CorpusFile, corpus_node: Node, responses: dict[str, object]
) -> None:
    response = responses[item.name]
    assert response is not None, f"no presentation context accepted for {item.transfer_syntax_uid.name}"
    expected = expected_status(item)
    assert response.Status == expected, response.get("ErrorComment")

    with corpus_node.sessions() as session:
        row = session.scalar(select(Instance).where(Instance.sop_instance_uid == item.sop_instance_uid))
        if expected != StoreStatus.SUCCESS:
            assert response.ErrorComment
            if item.name in KNOWN_BROKEN:
                assert KNOWN_BROKEN[item.name][1] in response.ErrorComment
            if item.sop_instance_uid not in first_sent_with_uid():
                assert row is None, "a refused instance was indexed"
            return
        assert row is not None
        kept = first_sent_with_uid()[item.sop_instance_uid]
        assert row.transfer_syntax_uid == kept.transfer_syntax_uid
        assert row.sop_class_uid == kept.sop_class_uid
        assert row.series.study.patient.patient_id == kept.patient_id
        assert encoded_dataset(corpus_node.store.absolute(row.path)) == encoded_dataset(kept.path)
