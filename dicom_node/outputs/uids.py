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
import uuid
from dataclasses import dataclass
from pathlib import Path

from dicom_node.secret_file import kept_secret

INSTALLATION_SECRET_FILE = "installation.key"
MAX_UID_LENGTH = 64  # PS3.5 9.1
_PART_SEPARATOR = "\x1f"  # so that ("ab", "c") and ("a", "bc") name different things


@dataclass(frozen=True)
class InstallationUids:
    """UIDs that one installation derives from names; see the module's description."""

    secret: bytes
    root: str | None = None

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
