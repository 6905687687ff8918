"""The ``heretic_jobs`` table, defined once in SQLAlchemy Core.

Everything else is derived from this module: ``heretic db init`` creates from it,
``heretic db sql`` and ``sql/schema.sql`` are its rendered PostgreSQL DDL (a test checks
they agree on a real PostgreSQL). The original heretic columns keep their names and
meaning; the rest serve Celery parity and search.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

SCHEMA_VERSION = 3

metadata = MetaData()


class _EmptyList(FunctionElement[Any]):
    """Server default for ``attempt_logs``: ``'{}'`` (text[]) on PostgreSQL, ``'[]'`` elsewhere."""

    inherit_cache = True


@compiles(_EmptyList)
def _empty_list_default(element: _EmptyList, compiler: Any, **kw: Any) -> str:
    return "'[]'"


@compiles(_EmptyList, "postgresql")
def _empty_list_pg(element: _EmptyList, compiler: Any, **kw: Any) -> str:
    return "'{}'::text[]"


_json = JSON().with_variant(JSONB(), "postgresql")
_text_list = JSON().with_variant(ARRAY(Text()), "postgresql")
_now = text("CURRENT_TIMESTAMP")
# bigserial on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
_id_type = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "heretic_jobs",
    metadata,
    # -- the original heretic columns
    Column("id", _id_type, primary_key=True, autoincrement=True),
    Column("queue_name", Text, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("payload", _json),
    Column("attempt_logs", _text_list, nullable=False, server_default=_EmptyList()),
    Column("max_attempts", Integer, nullable=False, server_default=text("1")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("last_attempted_at", DateTime(timezone=True)),
    # -- Celery parity and search
    Column("task_id", Uuid(as_uuid=False), nullable=False, unique=True),
    Column("task_name", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("eta", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),
    Column("priority", Integer),
    Column("result", _json),
    Column("error", Text),
    Column("traceback", Text),
    Column("parent_id", Uuid(as_uuid=False)),
    Column("root_id", Uuid(as_uuid=False)),
    Column("group_id", Uuid(as_uuid=False)),
    Column("worker", Text),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    # -- canvas (schema 2): what runs after this job, in Celery's message terms:
    # {"callbacks": [...], "errbacks": [...], "chain": [...], "chord": {...}}
    Column("workflow", _json),
)

# Search pages are newest first by (created_at, id): each filter's index ends with those
# columns, so the first page of any one filter is a short index range scan.
Index("heretic_jobs_created_idx", jobs.c.created_at, jobs.c.id)
Index("heretic_jobs_status_created_idx", jobs.c.status, jobs.c.created_at, jobs.c.id)
Index("heretic_jobs_queue_created_idx", jobs.c.queue_name, jobs.c.created_at, jobs.c.id)
Index("heretic_jobs_task_created_idx", jobs.c.task_name, jobs.c.created_at, jobs.c.id)
# Only rows with an error (a small part of the table) for --error-contains.
Index(
    "heretic_jobs_errors_idx",
    jobs.c.created_at,
    jobs.c.id,
    postgresql_where=text("error IS NOT NULL"),
    sqlite_where=text("error IS NOT NULL"),
)
Index("heretic_jobs_root_id_idx", jobs.c.root_id)
# Most jobs have no parent and no group (schema 3): only the rows that have one are in
# these indexes, so the others' writes skip them. Every status change of a row writes a
# new entry in each index that holds it (none of these updates is HOT: status is
# indexed), and a lookup by value (``group_id = …``) still finds its rows here.
Index(
    "heretic_jobs_parent_idx",
    jobs.c.parent_id,
    postgresql_where=text("parent_id IS NOT NULL"),
    sqlite_where=text("parent_id IS NOT NULL"),
)
Index(
    "heretic_jobs_group_idx",
    jobs.c.group_id,
    postgresql_where=text("group_id IS NOT NULL"),
    sqlite_where=text("group_id IS NOT NULL"),
)
Index(
    "heretic_jobs_payload_idx",
    jobs.c.payload,
    postgresql_using="gin",
    postgresql_ops={"payload": "jsonb_path_ops"},
).ddl_if(dialect="postgresql")
# What the scheduler scans: jobs waiting for their eta.
Index(
    "heretic_jobs_due_idx",
    jobs.c.eta,
    postgresql_where=text("status IN ('scheduled', 'retrying')"),
    sqlite_where=text("status IN ('scheduled', 'retrying')"),
)

# A chord's counter: the header jobs still to finish. Each header job that ends
# decrements it in the same transaction that records its outcome; the one that takes it
# to zero writes the body job, so the body is written exactly once however many
# workers race (a failed header sets it to -1 and fails the body instead).
chords = Table(
    "heretic_chords",
    metadata,
    Column("group_id", Uuid(as_uuid=False), primary_key=True),
    Column("remaining", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("body", _json, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
)

# Beat's state, one row per beat_schedule entry name: when it last fired and how often.
# Every firing itself is a heretic_jobs row. Entries removed from the config keep their
# row (they are no longer fired); created_at anchors an entry that has never fired.
beat_entries = Table(
    "heretic_beat_entries",
    metadata,
    Column("name", Text, primary_key=True),
    Column("task_name", Text, nullable=False),
    Column("schedule", Text, nullable=False),  # its description, to notice a change
    Column("last_run_at", DateTime(timezone=True)),
    Column("total_run_count", Integer, nullable=False, server_default=text("0")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=_now),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=_now),
)

#: Indexes of earlier schemas that an upgrade drops (replaced by the ones above).
RETIRED_INDEXES = (
    "heretic_jobs_status_idx",
    "heretic_jobs_queue_name_idx",
    "heretic_jobs_task_name_idx",
    "heretic_jobs_created_at_idx",
    "heretic_jobs_parent_id_idx",  # whole-column until schema 3
    "heretic_jobs_group_id_idx",
)

schema_version = Table(
    "heretic_schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=_now),
)

# The original heretic kept updated_at current with a trigger; so do we (PostgreSQL).
updated_at_trigger = (
    DDL(  # type: ignore[no-untyped-call]
        "CREATE OR REPLACE FUNCTION heretic_updated_at_timestamp() RETURNS TRIGGER AS $$\n"
        "BEGIN\n"
        "  NEW.updated_at = now();\n"
        "  RETURN NEW;\n"
        "END;\n"
        "$$ LANGUAGE plpgsql"
    ),
    DDL(  # type: ignore[no-untyped-call]
        "CREATE TRIGGER update_heretic_jobs_updated_at\n"
        "  BEFORE UPDATE ON heretic_jobs\n"
        "  FOR EACH ROW EXECUTE PROCEDURE heretic_updated_at_timestamp()"
    ),
)
for _ddl in updated_at_trigger:
    event.listen(jobs, "after_create", _ddl.execute_if(dialect="postgresql"))
