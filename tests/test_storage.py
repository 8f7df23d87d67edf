"""Patient-keyed paths that cannot escape the root, and atomic durable writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from dicom_node.storage import InstanceStore, InvalidIdentifier, check_uid, patient_key


@pytest.mark.parametrize("patient_id", ["../../etc", "..", ".", "/abs", "A/B", "a\x00b", "C:\\x", "Émile", " "])
def test_patient_key_is_a_single_safe_path_component(patient_id: str) -> None:
    key = patient_key(patient_id)
    assert "/" not in key and "\\" not in key and "\x00" not in key
    assert key not in {".", ".."} and not key.startswith(".")
    assert len(key) <= 64


def test_patient_key_is_stable_and_distinguishes_ids_that_sanitise_alike() -> None:
    ids = ["A/B", "A_B", "A?B", "A B", "a/b"]
    keys = [patient_key(patient_id) for patient_id in ids]
    assert len(set(keys)) == len(ids)
    assert patient_key("A/B") == patient_key("A/B")
    assert patient_key("PAT-0001").startswith("PAT_0001-")


def test_empty_patient_id_has_no_key() -> None:
    with pytest.raises(InvalidIdentifier):
        patient_key("")


@pytest.mark.parametrize("value", ["", "1.2.3/4", "../1", "1.2.", ".1", "1..2", "1.2.abc", "1" * 65])
def test_invalid_uids_are_refused(value: str) -> None:
    with pytest.raises(InvalidIdentifier):
        check_uid("StudyInstanceUID", value)


def test_valid_uid_is_accepted() -> None:
    assert check_uid("SOPInstanceUID", "1.2.840.10008.5.1.4.1.1.1.1") == "1.2.840.10008.5.1.4.1.1.1.1"


def test_relative_path_follows_the_layout() -> None:
    path = InstanceStore.relative_path("P1", "1.2", "1.2.3", "1.2.3.4")
    assert path == PurePosixPath("patients", patient_key("P1"), "1.2", "1.2.3", "1.2.3.4.dcm")


def test_publish_moves_a_complete_file_into_place(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    temporary = store.write_temporary([b"abc", memoryview(b"def")])
    assert temporary.parent == store.incoming and temporary.read_bytes() == b"abcdef"

    final = store.publish(temporary, PurePosixPath("patients/k/1/2/3.dcm"))

    assert final == tmp_path.resolve() / "patients/k/1/2/3.dcm"
    assert final.read_bytes() == b"abcdef"
    assert not temporary.exists()


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)

    def chunks():
        yield b"partial"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.write_temporary(chunks())
    assert list(store.incoming.iterdir()) == []


def test_sweep_removes_what_interrupted_writes_left_and_nothing_another_process_is_writing(tmp_path: Path) -> None:
    """Processes that share the storage root (a cluster's roles) each write under a directory of their own, locked
    while they live."""
    dead = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from dicom_node.storage import InstanceStore; s = InstanceStore({str(tmp_path)!r}); "
            "(s.incoming / 'tmp1.part').write_bytes(b'half')",
        ],
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert dead.returncode == 0
    [left] = [path for path in (tmp_path / "incoming").iterdir() if path.is_dir()]
    living = InstanceStore(tmp_path)
    (living.incoming / "tmp2.part").write_bytes(b"being written")
    (tmp_path / "incoming" / "tmp3.part").write_bytes(b"left by a node of the older layout")

    store = InstanceStore(tmp_path)
    assert store.sweep_incoming() == 2
    assert not left.exists() and not left.with_name(left.name + ".lock").exists()
    assert not (tmp_path / "incoming" / "tmp3.part").exists()
    assert (living.incoming / "tmp2.part").exists(), "a store alive, in this process or another, keeps its files"


def test_absolute_refuses_paths_outside_the_root(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "root")
    with pytest.raises(InvalidIdentifier):
        store.absolute("../outside.dcm")


def test_patients_may_be_a_symbolic_link_to_another_disk(tmp_path: Path) -> None:
    other_disk = tmp_path / "other-disk"
    other_disk.mkdir()
    store = InstanceStore(tmp_path / "root")
    (store.root / "patients").symlink_to(other_disk)
    final = store.publish(store.write_temporary([b"x"]), PurePosixPath("patients/k/1/2/3.dcm"))
    assert (other_disk / "k/1/2/3.dcm").read_bytes() == b"x"
    assert final == store.root / "patients/k/1/2/3.dcm"
