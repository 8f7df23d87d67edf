"""Indexes made before the node had migrations: no ``alembic_version`` table, the tables that
``create_all`` made at start. Such an index is compared with the baseline schema
(:mod:`dicom_node.migrations.baseline`); what earlier versions of the node lacked is added, and the index can
then be stamped at the baseline and upgraded like any other. Any other difference is refused, before anything
is changed, with the first difference named.
"""

from __future__ import annotations

from dataclasses import dataclass

from alembic.autogenerate import compare_metadata
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Connection, ForeignKey, ForeignKeyConstraint, Index, Table, inspect
from sqlalchemy.schema import CreateTable, DefaultClause

from dicom_node.migrations import baseline

# What the index gained before migrations existed (the commit that added each): an older index lacks some of
# these and nothing else. The tables too, though create_all made them at start: a node that was updated but
# never started again has not.
ADDED_TABLES = {"results", "deliveries", "tracking"}  # d2d7987, f0b86c2, 9c13f8e
# (table, column): the SQL literal that rows which existed before the column take (None: NULL)
ADDED_COLUMNS: dict[tuple[str, str], str | None] = {
    ("jobs", "note"): None,  # d2d7987
    ("jobs", "generation"): "0",  # fcb0694
    ("instances", "source_instance_pk"): None,  # f0b86c2
}


class LegacyIndexMismatch(Exception):
    """The index differs from every schema the node ever made; the message names the first difference."""


@dataclass(frozen=True)
class Completion:
    """What an index from before migrations lacks of the baseline."""

    tables: list[Table]
    columns: list[tuple[str, Column]]
    indexes: list[Index]


def plan_completion(connection: Connection) -> Completion:
    """Compare the index on ``connection`` with the baseline; what to add to reach it.

    Raises:
        LegacyIndexMismatch: a difference that no earlier version of the node explains.
    """
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    differences = _flattened(compare_metadata(context, baseline.metadata))
    added_tables = {d[1].name for d in differences if d[0] == "add_table"} & ADDED_TABLES
    added_columns = {(d[2], d[3].name) for d in differences if d[0] == "add_column"} & ADDED_COLUMNS.keys()

    def explained(difference: tuple) -> bool:
        """A table or column being added, or an index or foreign key of one (made with it, or after it)."""
        match difference[0]:
            case "add_table":
                return difference[1].name in added_tables
            case "add_column":
                return (difference[2], difference[3].name) in added_columns
            case "add_index" | "add_fk":
                table_name, columns = difference[1].table.name, difference[1].columns
                return table_name in added_tables or any((table_name, c.name) in added_columns for c in columns)
        return False

    for difference in differences:
        if not explained(difference):
            raise LegacyIndexMismatch(f"the index differs from every schema of the node: {_describe(difference)}")
    return Completion(
        tables=[baseline.metadata.tables[name] for name in sorted(added_tables)],  # with their indexes
        columns=[(d[2], d[3]) for d in differences if d[0] == "add_column"],
        indexes=[d[1] for d in differences if d[0] == "add_index" and d[1].table.name not in added_tables],
    )


def complete(connection: Connection, completion: Completion) -> None:
    """Add what :func:`plan_completion` found missing, so that the index equals the baseline."""
    for table in completion.tables:
        table.create(connection)
    rebuilt: set[str] = set()
    if connection.dialect.name == "sqlite":
        rebuilt = {table_name for table_name, _ in completion.columns}
        for table_name in sorted(rebuilt):
            _rebuild_sqlite_table(connection, baseline.metadata.tables[table_name])
    else:
        operations = Operations(MigrationContext.configure(connection))
        for table_name, column in completion.columns:
            _add_column(operations, table_name, column)
    for index in completion.indexes:
        if index.table.name not in rebuilt:
            index.create(connection)


def _add_column(operations: Operations, table_name: str, column: Column) -> None:
    fill = ADDED_COLUMNS[(table_name, column.name)]
    added = Column(  # its index is made with the others
        column.name,
        column.type,
        *(ForeignKey(key.target_fullname) for key in column.foreign_keys),
        nullable=column.nullable,
        server_default=None if fill is None else DefaultClause(fill),
    )
    operations.add_column(table_name, added)
    if fill is not None:  # the value was for the rows already there; the node sets it on new rows
        operations.alter_column(table_name, column.name, server_default=None)


def _rebuild_sqlite_table(connection: Connection, table: Table) -> None:
    """SQLite's own procedure for a change that ALTER TABLE cannot make (a column with its foreign key, a
    NOT NULL column without a default): a new table as the baseline has it, the rows copied into it with the
    added columns filled, the old table dropped, the new one renamed, its indexes made."""
    quote = connection.dialect.identifier_preparer.quote
    present = {column["name"] for column in inspect(connection).get_columns(table.name)}
    values = ", ".join(
        quote(column.name) if column.name in present else ADDED_COLUMNS[(table.name, column.name)] or "NULL"
        for column in table.columns
    )
    new_name = f"_new_{table.name}"
    create = str(CreateTable(table).compile(dialect=connection.dialect))
    # the statement as the baseline makes it, under a free name: a copy of the Table object would lose the
    # foreign key that refers to its own table
    connection.exec_driver_sql(create.replace(f"CREATE TABLE {table.name} ", f"CREATE TABLE {new_name} ", 1))
    connection.exec_driver_sql(f"INSERT INTO {new_name} SELECT {values} FROM {table.name}")
    connection.exec_driver_sql(f"DROP TABLE {table.name}")
    connection.exec_driver_sql(f"ALTER TABLE {new_name} RENAME TO {table.name}")
    for index in table.indexes:
        index.create(connection)


def _flattened(differences: list) -> list[tuple]:
    """Alembic lists a column's modifications as a nested list; one tuple per difference."""
    flat: list[tuple] = []
    for difference in differences:
        flat.extend(difference if isinstance(difference, list) else [difference])
    return flat


def _describe(difference: tuple) -> str:
    kind = difference[0]
    match kind:
        case "add_table":
            return f"table {difference[1].name} is missing"
        case "remove_table":
            return f"table {difference[1].name} is not one of the node's"
        case "add_column":
            return f"column {difference[2]}.{difference[3].name} is missing"
        case "remove_column":
            return f"column {difference[2]}.{difference[3].name} is not one of the node's"
        case "modify_type":
            return f"column {difference[2]}.{difference[3]} is {difference[5]}, not {difference[6]}"
        case "modify_nullable":
            allowed = "allows" if difference[5] else "does not allow"
            return f"column {difference[2]}.{difference[3]} {allowed} NULL, unlike the node's"
    if kind.startswith("modify_"):
        return f"column {difference[2]}.{difference[3]} differs in its {kind.removeprefix('modify_')}"
    item = difference[1]
    table = item.table.name if getattr(item, "table", None) is not None else "?"
    what = "foreign key" if isinstance(item, ForeignKeyConstraint) else type(item).__name__.lower()
    state = "is missing" if kind.startswith("add") else "is not one of the node's"
    named = f"{what} {item.name}" if item.name else what
    return f"{named} on table {table} ({', '.join(c.name for c in item.columns)}) {state}"
