"""Alembic's environment for the index.

The node runs it through :mod:`dicom_node.index_schema` with the connection it holds (inside the upgrade's
transaction and lock), passed as ``config.attributes["connection"]``. A developer who writes a revision runs
``alembic revision --autogenerate -m "..."`` with the repository's ``alembic.ini``, which names a scratch
database.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool

from dicom_node.migrations.task_engine import comparison_options
from dicom_node.models import Base


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters most things only by copying the table; batch mode does that
        compare_type=True,
        **comparison_options(connection.dialect.name),
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("the index's migrations run against a database, not as SQL scripts")
given = context.config.attributes.get("connection")
if given is not None:
    run_migrations(given)
else:
    section = context.config.get_section(context.config.config_ini_section, {})
    engine = engine_from_config(section, poolclass=pool.NullPool)
    with engine.connect() as connection:
        run_migrations(connection)
