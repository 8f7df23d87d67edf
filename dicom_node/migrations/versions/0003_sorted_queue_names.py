"""Inference queues named by their tasks sorted: ``infer.<a>+<b>`` with a before b.

The queue of an image routed to several tasks was named in the order of a fixed list of the node's two tasks.
Tasks are now installed and configured (:mod:`dicom_node.ai_tasks.registry`), so the name sorts them, and every
role of a site names a queue alike. Jobs in a queue of the old order move to the sorted name, where the workers
now look. PostgreSQL only: SQLite keeps its jobs in a table without queues.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    _order_queue_names("ASC")


def downgrade() -> None:
    """The older node had two tasks, and named their queue in reverse alphabetical order."""
    _order_queue_names("DESC")


def _order_queue_names(direction: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    ordered = (
        f"'infer.' || (SELECT string_agg(part, '+' ORDER BY part {direction}) "
        "FROM unnest(string_to_array(substr(queue_name, 7), '+')) AS part)"
    )
    op.execute(f"UPDATE procrastinate_jobs SET queue_name = {ordered} WHERE queue_name LIKE 'infer.%+%'")
