"""Secrets the node keeps under its storage root: made once, at random, then read on every start."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_BYTES = 32


def kept_secret(path: Path) -> bytes:
    """The secret in ``path``: 32 random bytes, made the first time (readable by the node's user only), then read.

    Two processes or threads that start together get the same secret: the first file linked into place wins.
    OSError where the file holds anything but 32 bytes (a damaged copy must not pass for a secret).
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(secrets.token_bytes(SECRET_BYTES))
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)  # never replaces a secret made first by another thread or process
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
        _sync_directory(path.parent)
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise OSError(f"{path} holds {len(secret)} bytes, not a secret of {SECRET_BYTES}: restore it or remove it")
    return secret


def _sync_directory(directory: Path) -> None:
    """The new name made durable: a secret once used must survive a power cut."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
