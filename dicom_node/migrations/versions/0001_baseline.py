"""Baseline: the index as the node created it before it had migrations.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

from dicom_node.migrations import baseline

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    baseline.metadata.create_all(op.get_bind())


def downgrade() -> None:
    raise NotImplementedError("the baseline is the oldest schema: going below it would drop every table of the index")
