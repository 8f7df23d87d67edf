"""Alembic's script directory for the index: ``env.py``, the revisions under ``versions/``, and the frozen
schema of the baseline (:mod:`dicom_node.migrations.baseline`). Run through :mod:`dicom_node.index_schema`."""
