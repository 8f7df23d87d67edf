"""The UIDs of the objects the node writes (PS3.5 Section 9).

Each is derived from what it identifies (a source instance, a task, a result) and from a secret of the
installation: the same parts give the same UID within one installation, so a job run again after a crash rewrites
the same objects, and different UIDs in another installation (another node, or this one after its storage was
reset), whatever its AE title. The secret is 32 random bytes made at the first start and kept under the storage
root, which every process of a cluster shares.

Under the organisation's root where ``dicom.uid_root`` names one; without it, in the ``2.25.`` form of a
name-based UUID (PS3.5 Annex B.2), which needs no registration.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.secret_file import kept_secret

INSTALLATION_SECRET_FILE = "installation.key"
MAX_UID_LENGTH = 64  # PS3.5 9.1
MAX_UID_ROOT_LENGTH = 32  # leaves at least 31 digits of each derived UID to tell objects apart
_PART_SEPARATOR = "\x1f"  # so that ("ab", "c") and ("a", "bc") name different things


def check_uid_root(root: str) -> str:
    """An organisation's UID root (PS3.5 9.1): digits and dots, no component led by 0, and not in 2.25, which
    holds UUIDs only (PS3.5 B.2). ValueError with the reason otherwise."""
    if len(root) > MAX_UID_ROOT_LENGTH:
        raise ValueError(f"a UID root has at most {MAX_UID_ROOT_LENGTH} characters, {root!r} has {len(root)}")
    if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", root):
        raise ValueError(f"a UID root is digits and dots with no component led by 0, as 1.2.840.99999: {root!r}")
    if root == "2.25" or root.startswith("2.25."):
        raise ValueError(f"2.25 holds UUIDs only (PS3.5 B.2), not an organisation's UIDs: {root!r}")
    return root


@dataclass(frozen=True)
class InstallationUids:
    """UIDs that one installation derives from names; see the module's description."""

    secret: bytes = field(repr=False)
    root: str | None = None

    def __post_init__(self) -> None:
        if self.root is not None:
            check_uid_root(self.root)

    @classmethod
    def of_installation(cls, storage_root: Path, uid_root: str | None = None) -> InstallationUids:
        """The UIDs of the installation whose storage root is ``storage_root`` (its secret made there if new)."""
        return cls(kept_secret(storage_root / INSTALLATION_SECRET_FILE), uid_root)

    def derived(self, *parts: object) -> str:
        """The UID of the thing ``parts`` name, in this installation."""
        name = _PART_SEPARATOR.join(str(part) for part in parts)
        if self.root is None:
            namespace = uuid.UUID(bytes=hashlib.sha256(self.secret).digest()[:16])
            return f"2.25.{uuid.uuid5(namespace, name).int}"
        digest = hashlib.sha512(self.secret + name.encode("utf-8")).digest()
        return f"{self.root}.{int.from_bytes(digest, 'big')}"[:MAX_UID_LENGTH]

    @property
    def device_uid(self) -> str:
        """The node as a device (Device UID, Device Observer UID): one per installation, on every run."""
        return self.derived("device")
