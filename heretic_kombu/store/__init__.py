"""The job store: the ``heretic_jobs`` table and every statement run against it.

Inside: :mod:`.tables` (the table definitions), :mod:`.rows` (row types and their
columns), :mod:`.engine` (connections and driver errors), :mod:`.statements` (the
statements built ahead of use), :mod:`.schema` (creation, upgrade, DDL), :mod:`.jobstore`
(the operations), :mod:`.history` (search and operator commands) and :mod:`.beatstore`
(periodic tasks).
"""

from __future__ import annotations

from .beatstore import BeatStore, EntrySpec, EntryState, Firing
from .engine import ConnectionLost, RowError, UniqueViolation
from .jobstore import JobStore
from .rows import (
    REVOKE_REQUESTED,
    Attempt,
    AttemptResult,
    Job,
    NewJob,
    NextSteps,
    ReadRows,
    Unreadable,
    log_line,
    utcnow,
)
from .schema import SCHEMA_VERSION, render_postgresql_ddl
from .tables import jobs

__all__ = [
    "REVOKE_REQUESTED",
    "SCHEMA_VERSION",
    "Attempt",
    "AttemptResult",
    "BeatStore",
    "ConnectionLost",
    "EntrySpec",
    "EntryState",
    "Firing",
    "Job",
    "JobStore",
    "NewJob",
    "NextSteps",
    "ReadRows",
    "RowError",
    "UniqueViolation",
    "Unreadable",
    "jobs",
    "log_line",
    "render_postgresql_ddl",
    "utcnow",
]
