"""The job store: the ``heretic_jobs`` table and every statement run against it."""

from __future__ import annotations

from .beatstore import BeatStore, EntrySpec, EntryState, Firing
from .jobstore import (
    Attempt,
    AttemptResult,
    Job,
    JobStore,
    NewJob,
    NextSteps,
    log_line,
    render_postgresql_ddl,
    utcnow,
)
from .tables import SCHEMA_VERSION, jobs

__all__ = [
    "SCHEMA_VERSION",
    "Attempt",
    "AttemptResult",
    "BeatStore",
    "EntrySpec",
    "EntryState",
    "Firing",
    "Job",
    "JobStore",
    "NewJob",
    "NextSteps",
    "jobs",
    "log_line",
    "render_postgresql_ddl",
    "utcnow",
]
