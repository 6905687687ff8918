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

Savepoints (``session.begin_nested()``, ``connection.begin_nested()``) are followed:
jobs sent inside one that rolls back are gone, the others stay. Rows waiting to be
written are written before a savepoint begins, so every row is written at the level it
was sent in, and a rollback to a savepoint drops exactly the jobs sent since it began.
Savepoints are matched innermost first, as SQLAlchemy's sessions and ``with`` blocks
close them.

The job table must live in the database your session or engine talks to.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

logger = logging.getLogger("heretic_kombu")

#: Sent jobs waiting to be written in one caller transaction: at this many, they are
#: written at once (bounding the memory they hold), the rest just before the commit.
TRANSACTION_BATCH = 1000


class Sink(Protocol):
    """Who writes and publishes what is sent in a caller's transaction (the app)."""

    def write_sent(self, connection: Connection, sent: list[Any]) -> list[Any]:
        """Write the sent items through ``connection``; return the rows to publish."""

    def deliver_all(self, rows: list[Any]) -> None:
        """Publish rows once their transaction has committed."""


@dataclasses.dataclass(eq=False)
class _Sent:
    """What one sink sent in the transaction: items not yet written, rows written."""

    unwritten: list[Any] = dataclasses.field(default_factory=list)
    size: int = 0
    written: list[Any] = dataclasses.field(default_factory=list)


class Outbox:
    """Jobs sent in one caller transaction: written through its connection before it
    commits, published after it commits, dropped with whatever part of it rolls back."""

    def __init__(self, connection: Callable[[], Connection]) -> None:
        self.connection = connection
        #: Inside its ``with`` block: the sends go on, and so does the outbox across
        #: commits (a session may commit inside the block and send more).
        self.open = True
        self._sent: dict[Sink, _Sent] = {}
        #: Per savepoint begun since the first send, how many rows each sink had written.
        self._savepoints: list[dict[Sink, int]] = []
        self._watched: list[Connection] = []

    def add(self, sink: Sink, item: Any, size: int) -> None:
        """Keep ``item`` (``size`` jobs) until the commit, or write the waiting items now
        if :data:`TRANSACTION_BATCH` jobs wait."""
        # Every send asks for the connection: a session begins its transaction and
        # its savepoints lazily, and the item must be sent inside them, not before.
        connection = self.connection()
        self._watch(connection)
        sent = self._sent.setdefault(sink, _Sent())
        sent.unwritten.append(item)
        sent.size += size
        if sent.size >= TRANSACTION_BATCH:
            self._write(connection)

    def committing(self) -> None:
        """Write what waits, just before a commit (of the transaction or a savepoint);
        an exception fails that commit."""
        if any(sent.unwritten for sent in self._sent.values()):
            self._write(self.connection())

    def committed(self) -> None:
        """The caller's transaction committed: publish every row written in it.

        A session joined to a transaction begun on its connection outside it
        (``Session(bind=connection)``, as test suites do) commits only its own part: the
        connection's transaction goes on and may still roll back, and nothing says when
        it ends. Its rows are left ``pending``, unpublished: if that transaction commits,
        a worker's reconciler publishes them after ``pending_timeout``."""
        sent, self._sent = self._sent, {}
        outer = any(not c.closed and c.in_transaction() for c in self._watched)
        self._end()
        if outer:
            if any(rows.written for rows in sent.values()):
                logger.warning(
                    "the session committed inside a transaction begun on its connection:"
                    " its jobs are not published now; if that transaction commits, a"
                    " worker's reconciler publishes them after pending_timeout"
                )
            return
        for sink, rows in sent.items():
            try:
                sink.deliver_all(rows.written)
            except Exception:  # the data is committed; the reconciler will publish the job
                logger.exception("publishing after commit failed; the job stays pending")

    def rolled_back(self) -> None:
        """The caller's transaction rolled back: nothing sent in it is kept."""
        self._sent = {}
        self._end()

    def _write(self, connection: Connection) -> None:
        for sink, sent in self._sent.items():
            if sent.unwritten:
                items, sent.unwritten, sent.size = sent.unwritten, [], 0
                sent.written.extend(sink.write_sent(connection, items))

    def _watch(self, connection: Connection) -> None:
        if any(watched is connection for watched in self._watched):
            return
        self._watched.append(connection)
        for name, listener in self._savepoint_listeners():
            event.listen(connection, name, listener)

    def _end(self) -> None:
        """The transaction is over: forget its savepoints, stop following its connections."""
        self._savepoints = []
        watched, self._watched = self._watched, []
        for connection in watched:
            for name, listener in self._savepoint_listeners():
                event.remove(connection, name, listener)

    def _savepoint_listeners(self) -> tuple[tuple[str, Callable[..., None]], ...]:
        return (
            ("savepoint", self._on_savepoint),
            ("release_savepoint", self._on_release),
            ("rollback_savepoint", self._on_rollback_to),
        )

    def _on_savepoint(self, connection: Connection, name: str | None) -> None:
        # Before the SAVEPOINT is sent: what waits was sent outside it, written there.
        self._write(connection)
        self._savepoints.append({sink: len(sent.written) for sink, sent in self._sent.items()})

    def _on_release(self, connection: Connection, name: str, context: Any) -> None:
        if self._savepoints:  # what was sent in it now belongs to the enclosing level
            self._savepoints.pop()

    def _on_rollback_to(self, connection: Connection, name: str, context: Any) -> None:
        # A savepoint begun before the first send holds every send: all of them go.
        began = self._savepoints.pop() if self._savepoints else {}
        for sink, sent in self._sent.items():
            sent.unwritten, sent.size = [], 0  # all sent at the innermost level
            del sent.written[began.get(sink, 0) :]


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
    if session.in_nested_transaction():
        return  # a savepoint released: what was sent in it waits for the real commit
    outboxes = session.info.pop(_SESSION_KEY, [])
    session.info[_SESSION_KEY] = [outbox for outbox in outboxes if outbox.open]
    for outbox in outboxes:
        outbox.committed()


def _on_session_rollback(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint rolled back: its connection's event dropped its jobs
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
    outbox: Outbox | None = None
    try:
        with engine.begin() as connection:
            outbox = Outbox(lambda: connection)
            token = _current.set(outbox)
            try:
                yield connection
            finally:
                _current.reset(token)
            outbox.committing()  # reached only when the block succeeded
    except BaseException:
        if outbox is not None:
            outbox.rolled_back()
        raise
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
