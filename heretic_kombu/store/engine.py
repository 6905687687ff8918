"""Connections to the job database: the engine, its tuning, and driver errors.

One SQLAlchemy engine per process (a forked child opens its own), SQLite tuned for a
writer and many readers, pooled connections pinged only after sitting idle, and the
bare driver cursor that the hot paths use to skip SQLAlchemy's execution layer. Driver
errors leave this module as :class:`~heretic_kombu.exceptions.StoreError`, the cause
chained; a connection the driver reports as lost is dropped with the pool's others.

Nothing here knows what a job is: :mod:`.jobstore` runs its statements through
:class:`Connections`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .. import serialization
from ..exceptions import StoreError

#: A pooled connection unused for longer than this is pinged before it is handed out.
PING_AFTER_IDLE = 1.0

_PG_UNIQUE_VIOLATION = "23505"


class ConnectionLost(StoreError):
    """The database connection broke under a statement; it is out of the pool now."""


class RowError(StoreError):
    """The database is there, but refused this statement's values (a data or constraint
    error: an integer out of its column's range, a duplicate key) or gave back a value
    that cannot be read (a timestamp past year 9999 in UTC). Trying the same statement
    again cannot help: the row or value is to be set aside, the others go on."""


class UniqueViolation(RowError):
    """A row with the same unique key (the ``task_id``) is there already."""


class Connections:
    """The engine of one database URL in this process, and transactions on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine | None = None
        self._pid = os.getpid()
        self._rendered: dict[Any, str] = {}  # statements rendered for the driver

    @property
    def engine(self) -> Engine:
        if self._pid != os.getpid():
            # Forked: never touch the parent's sockets, open our own.
            if self._engine is not None:
                self._engine.dispose(close=False)
            self._engine, self._pid = None, os.getpid()
        if self._engine is None:
            self._engine = create_engine(self.url)
        return self._engine

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def dispose(self) -> None:
        """Close every pooled connection."""
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
        self._engine = None

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection in a write transaction (on SQLite ``BEGIN IMMEDIATE``: the write
        lock up front), committed when the block ends without an error."""
        with wrap_errors(), self.engine.connect() as conn:
            conn.execution_options(heretic_write=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection to read on (its transaction, if any, is rolled back at the end)."""
        with wrap_errors(), self.engine.connect() as conn:
            yield conn

    def driver_sql(self, statement: Any) -> str:
        """``statement`` rendered once for this engine's driver (``%(name)s`` params)."""
        rendered = self._rendered.get(statement)
        if rendered is None:
            rendered = str(statement.compile(dialect=self.engine.dialect))
            self._rendered[statement] = rendered
        return rendered

    def driver_cursor(self) -> contextlib.AbstractContextManager[Any]:
        """:func:`driver_cursor` on this engine."""
        return driver_cursor(self.engine)


@contextlib.contextmanager
def wrap_errors() -> Iterator[None]:
    """Turn SQLAlchemy's driver errors into :class:`StoreError` (the cause chained):
    :class:`ConnectionLost` for a connection that broke, :class:`RowError` for a data or
    constraint error (:class:`UniqueViolation` for a duplicate key)."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        message = f"job store error: {exc.orig!r}"
        if exc.connection_invalidated:
            raise ConnectionLost(message) from exc
        raise row_error(exc.orig, message) or StoreError(message) from exc


#: SQLSTATE classes of errors about the values, not the connection: 22 data exception
#: (e.g. integer out of range), 23 integrity constraint violation.
_PG_VALUE_CLASSES = ("22", "23")


def row_error(orig: BaseException | None, message: str) -> RowError | None:
    """The :class:`RowError` a driver error means, if it is about the statement's values
    rather than the connection (``None`` otherwise)."""
    code = getattr(orig, "pgcode", None)
    text = str(orig)
    if code == _PG_UNIQUE_VIOLATION or text.startswith("UNIQUE constraint failed"):
        return UniqueViolation(message)
    if isinstance(code, str) and code[:2] in _PG_VALUE_CLASSES:
        return RowError(message)
    name = type(orig).__name__
    if name in ("DataError", "IntegrityError") or isinstance(orig, OverflowError):
        return RowError(message)  # SQLite's (e.g. an integer too big for 64 bits)
    return None


def unreadable(exc: Exception) -> RowError:
    """The :class:`RowError` of a row the driver could not turn into Python values."""
    return RowError(f"job row cannot be read: {exc}")


#: What a driver or SQLAlchemy raises for a stored value Python cannot hold (a
#: timestamp past year 9999 in UTC): the row is unreadable, the connection is fine.
READ_ERRORS = (ValueError, OverflowError)


@contextlib.contextmanager
def driver_cursor(engine: Engine) -> Iterator[Any]:
    """A DBAPI cursor on a pooled connection in autocommit, for a statement sent without
    SQLAlchemy's execution layer. Driver errors become :class:`StoreError`. A connection
    the driver reports as lost is dropped, and the pool's others with it (as SQLAlchemy
    does): the server went away, so they are most likely gone too."""
    try:
        raw = engine.raw_connection()
    except (engine.dialect.loaded_dbapi.Error, sa.exc.DBAPIError) as exc:
        # A new connection could not be opened (the pool hands over the driver's own
        # error): the database is down, which callers wait out like any store error.
        raise StoreError(f"job store error: {exc!r}") from exc
    driver: Any = raw.driver_connection
    cursor = None
    try:
        driver.autocommit = True
        cursor = driver.cursor()
        yield cursor
    except engine.dialect.loaded_dbapi.Error as exc:
        if engine.dialect.is_disconnect(exc, driver, cursor):
            raw.invalidate(exc)
            engine.dispose()  # the connections in use are discarded when given back
            raise ConnectionLost(f"job store error: {exc!r}") from exc
        message = f"job store error: {exc!r}"
        raise row_error(exc, message) or StoreError(message) from exc
    finally:
        if cursor is not None and not cursor.closed:
            cursor.close()
        if not driver.closed:
            driver.autocommit = False
        raw.close()


def create_engine(url: str) -> Engine:
    """The engine of ``url``: psycopg2 for PostgreSQL, SQLite tuned (its folder made),
    JSON through :mod:`heretic_kombu.serialization`."""
    url_obj = sa.make_url(url)
    if url_obj.drivername == "postgresql":
        # psycopg2 is the driver we ship with; SQLAlchemy 2.1 would pick psycopg 3.
        url_obj = url_obj.set(drivername="postgresql+psycopg2")
    if url_obj.get_backend_name() == "sqlite":
        database = url_obj.database
        if database and database != ":memory:":
            try:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the folder of the job database {database}: {exc}"
                ) from exc
        engine = sa.create_engine(
            url_obj,
            json_serializer=serialization.engine_serializer,
            json_deserializer=serialization.loads,
            connect_args={"timeout": 30, "check_same_thread": False},
        )
        _tune_sqlite(engine)
        return engine
    engine = sa.create_engine(
        url_obj,
        json_serializer=serialization.engine_serializer,
        json_deserializer=serialization.loads,
    )
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection before use only if it sat idle for a while.

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout: one more round trip for each
    statement of a busy worker or producer, most of the cost of a one-row write. A
    connection used a moment ago is as good as the ping would say; one left idle (the
    server may have restarted, a proxy may have cut it) is pinged, and replaced if dead.
    """

    @sa.event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_conn: Any, record: Any) -> None:
        record.info["heretic_idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("heretic_idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool discards this connection and checks out another (a new one).
            raise sa.exc.DisconnectionError(f"pooled connection is dead: {exc!r}") from exc


def _tune_sqlite(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        # Let SQLAlchemy's begin event decide how transactions start.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        # Readers never wait for the writer. The mode stays with the file; switching
        # it takes a lock that another connection's open write transaction would hold.
        cursor.execute("PRAGMA journal_mode")
        names = [column[0] for column in cursor.description]
        mode = dict(zip(names, cursor.fetchone(), strict=True))["journal_mode"]
        if mode.lower() != "wal":
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable across crashes of the process
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write transaction takes the write lock up front: a deferred transaction that
        # reads first and writes later can fail with SQLITE_BUSY despite busy_timeout.
        write = conn.get_execution_options().get("heretic_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
