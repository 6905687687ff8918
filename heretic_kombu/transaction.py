"""Transactional enqueue: a job sent inside your transaction exists only if it commits.

Celery's best-known trap is ``.delay()`` before the commit: the worker runs before the
data it needs is visible, or runs for data that was rolled back. Inside
``with app.transaction(session):`` heretic writes the job's row through *your*
connection, so the row commits or rolls back with your data, and publishes the message
only after the commit. A rolled-back transaction leaves no job and no message. If the
publish after the commit fails, the row stays ``pending`` and the reconciler publishes
it: the commit is the moment the job is accepted.

The rows are written just before the commit (and whenever a thousand are waiting), a
thousand to an ``INSERT``: one statement per send would cost a round trip each. So a
row that cannot be written (a ``task_id`` already taken) fails the commit, not the send.

The job table must live in the database your session or engine talks to.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

logger = logging.getLogger("heretic_kombu")


class Outbox:
    """Jobs written in one caller transaction, waiting for its commit to be published."""

    def __init__(self, connection: Callable[[], Connection]) -> None:
        self.connection = connection
        #: Inside its ``with`` block: the sends go on, and so does the outbox across
        #: commits (a session may commit inside the block and send more).
        self.open = True
        self._before_commit: list[Callable[[], None]] = []
        self._after_commit: list[Callable[[], None]] = []
        self._after_rollback: list[Callable[[], None]] = []

    def before_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` just before the caller's transaction commits, inside it; an
        exception it raises fails the commit."""
        self._before_commit.append(callback)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the caller's transaction has committed."""
        self._after_commit.append(callback)

    def after_rollback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` if the caller's transaction rolls back (what waited for its
        commit is dropped)."""
        self._after_rollback.append(callback)

    def committing(self) -> None:
        callbacks, self._before_commit = self._before_commit, []
        for callback in callbacks:
            callback()

    def committed(self) -> None:
        callbacks, self._after_commit = self._after_commit, []
        self._after_rollback = []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # the data is committed; the reconciler will publish the job
                logger.exception("publishing after commit failed; the job stays pending")

    def rolled_back(self) -> None:
        callbacks = self._after_rollback
        self._before_commit, self._after_commit, self._after_rollback = [], [], []
        for callback in callbacks:
            callback()


_current: contextvars.ContextVar[Outbox | None] = contextvars.ContextVar(
    "heretic_outbox", default=None
)


def current_outbox() -> Outbox | None:
    """The outbox of the enclosing ``app.transaction(...)`` block, if any."""
    return _current.get()


_SESSION_KEY = "heretic_outboxes"


def _on_session_committing(session: Session) -> None:
    for outbox in session.info.get(_SESSION_KEY, []):
        outbox.committing()


def _on_session_commit(session: Session) -> None:
    outboxes = session.info.pop(_SESSION_KEY, [])
    session.info[_SESSION_KEY] = [outbox for outbox in outboxes if outbox.open]
    for outbox in outboxes:
        outbox.committed()


def _on_session_rollback(session: Session) -> None:
    outboxes = session.info.pop(_SESSION_KEY, [])
    session.info[_SESSION_KEY] = [outbox for outbox in outboxes if outbox.open]
    for outbox in outboxes:
        outbox.rolled_back()


@contextlib.contextmanager
def session_transaction(session: Session) -> Iterator[Session]:
    """Jobs sent in the block are written through ``session`` and published on its commit.

    The commit may come inside the block or after it. The session gets one pair of
    listeners for its whole life; the waiting outboxes live in ``session.info``.
    """
    if not session.info.get("heretic_listening"):
        event.listen(session, "before_commit", _on_session_committing)
        event.listen(session, "after_commit", _on_session_commit)
        event.listen(session, "after_rollback", _on_session_rollback)
        session.info["heretic_listening"] = True
    outbox = Outbox(session.connection)
    session.info.setdefault(_SESSION_KEY, []).append(outbox)
    token = _current.set(outbox)
    try:
        yield session
    finally:
        _current.reset(token)
        outbox.open = False  # it waits for the session's next commit or rollback


@contextlib.contextmanager
def engine_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction of its own on ``engine``; jobs sent in it are published after it commits."""
    with engine.begin() as connection:
        outbox = Outbox(lambda: connection)
        token = _current.set(outbox)
        try:
            yield connection
        finally:
            _current.reset(token)
        outbox.committing()  # reached only when the block succeeded
    outbox.committed()  # reached only when the block and the commit succeeded


def transaction(target: Any) -> contextlib.AbstractContextManager[Any]:
    """``session_transaction`` for an ORM ``Session``, ``engine_transaction`` for an ``Engine``."""
    if isinstance(target, Session):
        return session_transaction(target)
    if isinstance(target, Engine):
        return engine_transaction(target)
    raise TypeError(
        f"app.transaction() takes a SQLAlchemy Session or Engine, not {type(target).__name__};"
        " for a Connection, wrap it: Session(bind=connection)"
    )
