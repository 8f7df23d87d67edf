"""Durable files under the storage root, in a layout keyed by patient.

Received instances live at ``patients/<patient key>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
No received attribute becomes a path unchecked: the patient key is derived from the PatientID so that it can
neither leave the root nor collide with another patient's, and UIDs must have the form PS3.5 section 9.1
gives them (digits and dots), which cannot name another directory.

Files are written atomically: a temporary file under ``incoming/`` is written and fsynced, then renamed into
place, and the directory entries are fsynced, so a file under ``patients/`` is always complete.

Each store writes its temporary files in a directory of its own, ``incoming/<host>.<pid>.<token>``, and holds an
exclusive lock on ``incoming/<host>.<pid>.<token>.lock`` while it lives. Processes that share the root (a
cluster's roles, on a shared file system) so tell the leftovers of a dead one, whose lock the system released,
from the files another writes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_MAX_UID_LENGTH = 64
_NOT_PORTABLE = re.compile(r"[^A-Za-z0-9]+")
_READABLE_PREFIX_LENGTH = 32
_LOCK_SUFFIX = ".lock"


class InvalidIdentifier(ValueError):
    """A received identifier that must not become part of a path."""


def patient_key(patient_id: str) -> str:
    """The directory name for a patient: a readable prefix and a digest of the exact PatientID.

    The prefix keeps letters and digits only (so no ``/``, ``..`` or control characters reach the file
    system); the digest keeps two IDs that share a prefix, such as ``A/B`` and ``A_B``, apart.
    """
    if not patient_id:
        raise InvalidIdentifier("PatientID is empty")
    readable = _NOT_PORTABLE.sub("_", patient_id).strip("_")[:_READABLE_PREFIX_LENGTH] or "patient"
    digest = hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:24]
    return f"{readable}-{digest}"


def check_uid(name: str, value: str) -> str:
    """Return ``value`` if it is a valid UID (PS3.5 section 9.1), else raise :class:`InvalidIdentifier`."""
    if not value:
        raise InvalidIdentifier(f"{name} is missing")
    if len(value) > _MAX_UID_LENGTH or not _UID.fullmatch(value):
        raise InvalidIdentifier(f"{name} is not a valid UID")
    return value


class InstanceStore:
    """The files of received and produced instances under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.incoming = self.root / "incoming" / f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        self.incoming.mkdir(parents=True)
        # held, and so locked, while the store lives; the system releases it when the process ends
        self._lock = open(self.incoming.with_name(self.incoming.name + _LOCK_SUFFIX), "wb")  # noqa: SIM115
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @staticmethod
    def relative_path(patient_id: str, study_uid: str, series_uid: str, sop_uid: str) -> PurePosixPath:
        """Where an instance is kept, relative to the root; validates every component."""
        return PurePosixPath(
            "patients",
            patient_key(patient_id),
            check_uid("StudyInstanceUID", study_uid),
            check_uid("SeriesInstanceUID", series_uid),
            check_uid("SOPInstanceUID", sop_uid) + ".dcm",
        )

    def absolute(self, relative: PurePosixPath | str) -> Path:
        """The absolute path of a stored file; refuses anything that leads outside the root.

        The check is lexical, not through symbolic links: an administrator may link ``patients/`` to
        another disk.
        """
        path = Path(os.path.normpath(self.root / relative))
        if not path.is_relative_to(self.root):
            raise InvalidIdentifier(f"{relative} is outside the storage root")
        return path

    def write_temporary(self, chunks: Iterable[bytes | memoryview]) -> Path:
        """Write ``chunks`` to a new file under ``incoming/`` and fsync it. The caller publishes or discards it."""
        descriptor, name = tempfile.mkstemp(dir=self.incoming, suffix=".part")
        try:
            with os.fdopen(descriptor, "wb") as file:
                for chunk in chunks:
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def publish(self, temporary: Path, relative: PurePosixPath) -> Path:
        """Atomically move a temporary file to its place and make the rename durable."""
        destination = self.absolute(relative)
        _make_directories_durably(destination.parent, stop_at=self.root)
        os.replace(temporary, destination)
        _fsync_directory(destination.parent)
        return destination

    def set_aside(self, relative: PurePosixPath) -> Path | None:
        """Rename a stored file out of the way before it is replaced; None if it does not exist."""
        path = self.absolute(relative)
        if not path.exists():
            return None
        aside = path.with_name(path.name + ".replaced")
        os.replace(path, aside)
        return aside

    def restore(self, aside: Path, relative: PurePosixPath) -> None:
        """Put a file set aside back in its place (the replacement failed)."""
        os.replace(aside, self.absolute(relative))
        _fsync_directory(aside.parent)

    @staticmethod
    def discard(path: Path) -> None:
        path.unlink(missing_ok=True)

    def sweep_incoming(self) -> int:
        """At start: remove the temporary files of interrupted writes (none of them was acknowledged): those of the
        stores whose lock nobody holds (their processes are gone, on any host), and any that a node of an older
        layout left directly under ``incoming/``. Returns how many."""
        removed = 0
        for entry in self.incoming.parent.iterdir():
            if entry.is_file() and entry.suffix == ".part":
                entry.unlink(missing_ok=True)
                removed += 1
            elif entry.is_file() and entry.suffix == _LOCK_SUFFIX:
                removed += _remove_if_abandoned(entry)
        return removed


def _remove_if_abandoned(lock_file: Path) -> int:
    """Remove the temporary directory of a store whose lock nobody holds, and the lock; the files it held."""
    try:
        lock = open(lock_file, "rb")  # noqa: SIM115
    except FileNotFoundError:  # removed by another sweep meanwhile
        return 0
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its store is alive
            return 0
        directory = lock_file.with_suffix("")
        leftovers = list(directory.glob("*.part"))
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        lock_file.unlink(missing_ok=True)
    return len(leftovers)


def _make_directories_durably(directory: Path, stop_at: Path) -> None:
    """``mkdir -p`` that also fsyncs each parent whose entries changed, so new directories survive a crash."""
    missing = []
    while not directory.exists() and directory != stop_at:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
