"""Creating and upgrading the job store's schema, and rendering it as PostgreSQL DDL.

The tables themselves are defined in :mod:`.tables`, with :data:`SCHEMA_VERSION` (the
version they make) and :data:`RETIRED_INDEXES` (indexes of earlier versions), kept there
beside the definitions they describe so that a change to a table bumps the version in
the same place; they are re-exported here as part of the upgrade's vocabulary.

An upgrade only adds: new tables, new nullable columns, new indexes (and it drops the
retired ones). Several processes may run it at once: on PostgreSQL an advisory lock
serialises them, on SQLite the write lock does. A database upgraded by a newer release
is left as it is.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex, CreateTable

from .engine import Connections
from .rows import utcnow
from .tables import (
    RETIRED_INDEXES,
    SCHEMA_VERSION,
    jobs,
    metadata,
    schema_version,
    updated_at_trigger,
)

__all__ = [
    "INIT_LOCK_KEY",
    "RETIRED_INDEXES",
    "SCHEMA_VERSION",
    "create_schema",
    "lock_for_init",
    "render_postgresql_ddl",
    "schema_is_current",
]

# Any number; PostgreSQL advisory lock that serialises concurrent `db init`s.
INIT_LOCK_KEY = 0x68657265  # "here"


def lock_for_init(conn: Connection) -> None:
    """Take the schema's lock for the rest of ``conn``'s transaction: PostgreSQL's
    advisory lock; on SQLite the write transaction (``BEGIN IMMEDIATE``) is the lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(INIT_LOCK_KEY)))


def _current_version(conn: Connection) -> int | None:
    """The newest version recorded in ``heretic_schema_version``, or ``None``."""
    found = conn.execute(sa.select(sa.func.max(schema_version.c.version).label("version")))
    version: int | None = found.one().version
    return version


def schema_is_current(connections: Connections) -> bool:
    """Whether this version's schema (or a newer release's) is in place, read without
    taking a write lock (on SQLite, another connection may hold it: a caller's open
    transaction)."""
    with connections.read() as conn:
        if not sa.inspect(conn).has_table(schema_version.name):
            return False
        version = _current_version(conn)
    return version is not None and version >= SCHEMA_VERSION


def create_schema(connections: Connections) -> bool:
    """Create the tables, indexes, trigger and version row if missing, or upgrade an
    older schema (new tables, new nullable columns) to this version.

    Idempotent, and safe when several processes run it at once. Returns ``True`` if
    anything was created or changed.
    """
    if schema_is_current(connections):
        return False
    with connections.write() as conn:
        lock_for_init(conn)
        inspector = sa.inspect(conn)
        existing = {t.name for t in metadata.sorted_tables if inspector.has_table(t.name)}
        current = None
        if schema_version.name in existing:
            current = _current_version(conn)
        if current is not None and current >= SCHEMA_VERSION:
            # A newer release may have upgraded it: it only adds to the schema.
            return False
        metadata.create_all(conn)  # only what is missing
        for table in metadata.sorted_tables:
            if table.name not in existing:
                continue
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have:  # added in a later schema: nullable
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.exec_driver_sql(
                        f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"
                    )
            indexes = {i["name"] for i in inspector.get_indexes(table.name)}
            for retired in RETIRED_INDEXES:
                if retired in indexes:
                    conn.exec_driver_sql(f"DROP INDEX {retired}")
            for index in table.indexes:
                if index.name not in indexes:
                    index.create(conn, checkfirst=True)
        conn.execute(sa.insert(schema_version).values(version=SCHEMA_VERSION, applied_at=utcnow()))
    return True


def render_postgresql_ddl() -> str:
    """Render the schema as PostgreSQL DDL statements, in creation order."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    parts: list[str] = []
    for table in metadata.sorted_tables:
        parts.append(str(CreateTable(table).compile(dialect=dialect)).strip() + ";")
        for index in sorted(table.indexes, key=lambda i: i.name or ""):
            parts.append(str(CreateIndex(index).compile(dialect=dialect)).strip() + ";")
        if table is jobs:
            parts.extend(ddl.statement.strip() + ";" for ddl in updated_at_trigger)
    parts.append(f"INSERT INTO {schema_version.name} (version) VALUES ({SCHEMA_VERSION});")
    header = (
        "-- heretic_kombu schema, rendered from heretic_kombu/store/tables.py"
        " (`heretic db sql`).\n-- Schema version "
        f"{SCHEMA_VERSION}. Do not edit by hand: change tables.py and re-render.\n"
    )
    return header + "\n\n".join(parts) + "\n"
