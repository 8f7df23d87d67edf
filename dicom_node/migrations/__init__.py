"""Alembic's script directory for the index: ``env.py``, the revisions under ``versions/``, and the frozen
schema of the baseline (:mod:`dicom_node.migrations.baseline`). Run through :mod:`dicom_node.index_schema`.

Every revision runs inside the one transaction of its change, which holds the write lock: a revision never
commits on its own (no ``COMMIT``, no ``autocommit_block``, no ``CREATE INDEX CONCURRENTLY``), or a failure
after it could no longer be rolled back."""
