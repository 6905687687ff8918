"""Embedded default broker: a kombu virtual transport backed by one SQLite file.

This module owns the ``messages`` table of the broker file and the rules for reserving,
acknowledging and recovering messages in it. Several processes on one host share queues
through the file with no server to run.

It exists because kombu's own serverless transports are not safe enough for a job runner.
Their virtual QoS remembers unacknowledged messages only in the consumer's memory, so a
consumer killed with SIGKILL takes the messages it held with it; and the SQLAlchemy transport
never deletes delivered rows. Here a delivered message stays in the table, marked with the
reserving process, until it is acknowledged. When that process dies, any consumer on the host
makes its messages visible again flagged ``redelivered``: at-least-once delivery, like
RabbitMQ. Owners are identified by hostname, pid and process start time, so processes of
other hosts, or in other pid namespaces with the same hostname, cannot be judged; keep one
broker file per host. Exchanges and bindings stay in kombu's per-process memory.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from ..exceptions import BrokerError

__all__ = ["Channel", "QoS", "Transport"]

logger = logging.getLogger(__name__)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " queue TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL,"
    " owner TEXT, token TEXT, redelivered INTEGER NOT NULL DEFAULT 0)",
    # Matches the reservation query exactly, so picking the next message is one index probe.
    "CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, owner, priority DESC, id)",
    # Acks address rows by token; only reserved rows have one, hence the partial index.
    "CREATE INDEX IF NOT EXISTS messages_token ON messages (token) WHERE token IS NOT NULL",
)
_NEXT = (
    "SELECT id FROM messages WHERE queue = ? AND owner IS NULL ORDER BY priority DESC, id LIMIT 1"
)
_RELEASE = "UPDATE messages SET owner = NULL, token = NULL, redelivered = 1"
_DELETE_TOKEN = "DELETE FROM messages WHERE token = ?"
#: Seconds between two scans of one queue for reservations held by dead processes.
RECOVERY_INTERVAL = 1.0


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """Return ``(state, start time)`` of a process from /proc, or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0].decode(), fields[19].decode()  # fields 3 and 22 of proc(5)


@functools.lru_cache(maxsize=4)
def _owner_of(pid: int) -> str:
    stat = _proc_stat(pid)
    return f"{socket.gethostname()}:{pid}" + (f":{stat[1]}" if stat else "")


def current_owner() -> str:
    """Return the owner string of this process: ``hostname:pid[:start time]``."""
    # Keyed by pid, so a forked child never reserves messages in its parent's name.
    return _owner_of(os.getpid())


def _owner_is_dead(owner: str) -> bool:
    """Tell whether ``owner`` is a process of this host that no longer runs."""
    prefix = socket.gethostname() + ":"
    if owner == current_owner() or not owner.startswith(prefix):
        return False  # alive, or on another host where we cannot look
    parts = owner[len(prefix) :].split(":")
    if len(parts) > 2 or not parts[0].isdigit():
        return False
    pid = int(parts[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is None:
        return False
    # A zombie has been killed but not yet reaped; a new start time means the pid was reused.
    return stat[0] in ("Z", "X") or (len(parts) == 2 and parts[1] != stat[1])


def _open_database(path: Path) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode, creating the directory and schema if missing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrokerError(f"cannot create the folder of the embedded broker {path}: {exc}") from exc
    # Autocommit: every operation below is one statement, hence one atomic transaction, and
    # SQLite retries the lock of a fresh single-statement write under busy_timeout.
    # timeout=30 sets busy_timeout; check_same_thread=False as kombu lets other threads ack.
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        for statement in ("PRAGMA journal_mode = WAL", *_SCHEMA):  # WAL: readers never block
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


class QoS(virtual.QoS):
    """Keeps kombu's in-memory bookkeeping, but settles every reservation in the table."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        """Delete the acknowledged message."""
        self.channel._run(_DELETE_TOKEN, (delivery_tag,))
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Delete the message, or with ``requeue`` make it visible again as redelivered."""
        # A requeued row keeps its id, so it is next in line again, as on RabbitMQ.
        self.channel._run(
            f"{_RELEASE} WHERE token = ?" if requeue else _DELETE_TOKEN, (delivery_tag,)
        )
        # Not super().reject(): it would publish a second copy of the message.
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        """Make every unacknowledged message of this channel visible again as redelivered."""
        self._flush()
        delivered: dict[str, Any] = self._delivered
        tokens = list(delivered)
        delivered.clear()
        if tokens:
            try:
                self.channel._run(
                    f"{_RELEASE} WHERE token IN (SELECT value FROM json_each(?))", (dumps(tokens),)
                )
            except sqlite3.Error as exc:
                # Nothing is lost: the rows stay reserved until this process exits.
                logger.warning("could not release %d unacked messages: %s", len(tokens), exc)
        return []


class Channel(virtual.Channel):
    """A channel with its own SQLite connection, opened on first use."""

    QoS = QoS
    connection: Transport

    def __init__(self, connection: Transport, **kwargs: Any) -> None:
        self._path = connection.db_path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()  # the connection is shared with acking threads
        self._db_closed = False
        self._no_ack_queues: set[str] = set()
        self._last_recovery: dict[str, float] = {}
        super().__init__(connection, **kwargs)

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[list[Any], int]:
        """Execute one statement; return its rows and the number of rows it changed."""
        with self._lock:
            if self._conn is None:
                if self._db_closed:
                    raise ChannelError("channel is closed")
                self._conn = _open_database(self._path)
            cursor = self._conn.execute(sql, params)
            # Fetch everything: a RETURNING statement commits only once it has run to the end.
            return cursor.fetchall(), cursor.rowcount

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self._run(
            "INSERT INTO messages (queue, priority, payload) VALUES (?, ?, ?)",
            (queue, self._get_message_priority(message), dumps(message)),
        )

    def _get(
        self, queue: str, timeout: float | None = None, no_ack: bool | None = None
    ) -> dict[str, Any]:
        """Take the next visible message of ``queue``: reserve it, or delete it if ``no_ack``."""
        if no_ack is None:
            no_ack = queue in self._no_ack_queues
        self._recover_dead_owners(queue)
        token = uuid.uuid4().hex
        if no_ack:  # nobody will ack it, so keeping the row would leak it
            rows, _ = self._run(
                f"DELETE FROM messages WHERE id = ({_NEXT}) RETURNING payload, redelivered",
                (queue,),
            )
        else:
            rows, _ = self._run(
                f"UPDATE messages SET owner = ?, token = ? WHERE id = ({_NEXT})"
                " RETURNING payload, redelivered",
                (current_owner(), token, queue),
            )
        if not rows:
            raise Empty()
        payload: dict[str, Any] = loads(rows[0][0])
        properties = payload["properties"]
        # The publisher's tag is shared by every copy; acks must name this reservation.
        properties["delivery_tag"] = token
        properties.setdefault("delivery_info", {})["redelivered"] = bool(rows[0][1])
        return payload

    def _recover_dead_owners(self, queue: str) -> None:
        """Release reservations held by dead processes; runs at most once a second per queue."""
        now = time.monotonic()
        if now - self._last_recovery.get(queue, float("-inf")) < RECOVERY_INTERVAL:
            return
        self._last_recovery[queue] = now
        owners, _ = self._run(
            "SELECT DISTINCT owner FROM messages WHERE queue = ? AND owner IS NOT NULL", (queue,)
        )
        for (owner,) in owners:
            if _owner_is_dead(owner):
                # All its queues at once: this is rare, and the owner will never ack.
                _, count = self._run(f"{_RELEASE} WHERE owner = ?", (owner,))
                logger.info("recovered %d messages reserved by dead process %s", count, owner)

    def _size(self, queue: str) -> int:
        rows, _ = self._run(
            "SELECT COUNT(*) FROM messages WHERE queue = ? AND owner IS NULL", (queue,)
        )
        return int(rows[0][0])

    def _purge(self, queue: str) -> int:
        # Reserved messages stay: their consumers will still ack or reject them.
        return self._run("DELETE FROM messages WHERE queue = ? AND owner IS NULL", (queue,))[1]

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._run("DELETE FROM messages WHERE queue = ?", (queue,))

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        """Delete ``queue`` and its messages, even when it has no binding in this process."""
        # kombu's version only deletes through bindings, and ours live in another process.
        if if_empty and self._size(queue):
            return
        self._delete(queue)
        self.state.queue_bindings_delete(queue)

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> None:
        """Consume from ``queue``, remembering whether its messages need an ack."""
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        """Fetch one message synchronously, or None if ``queue`` has none visible."""
        try:
            message = self.Message(self._get(queue, no_ack=no_ack), channel=self)
        except Empty:
            return None
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def close(self) -> None:
        """Close the channel; kombu first releases its unacked messages."""
        super().close()
        with self._lock:
            self._db_closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class Transport(virtual.Transport):
    """Transport for ``kombu.Connection("sqlite:////abs/path.sqlite3", transport=Transport)``.

    Accepts ``transport_options={"polling_interval": seconds}`` (default 0.05).
    """

    Channel = Channel
    polling_interval = 0.05
    driver_type = "sqlite"
    driver_name = "sqlite"
    # A lock held past busy_timeout is worth kombu's reconnect-and-retry.
    connection_errors = (  # type: ignore[assignment]
        *virtual.Transport.connection_errors,
        sqlite3.OperationalError,
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        # kombu hands the URL path over as virtual_host: "sqlite:///rel.db" gives "rel.db",
        # "sqlite:////abs/x.db" gives "/abs/x.db". Relative paths are pinned to the cwd now.
        location = client.virtual_host or ""
        if location in ("", "/"):
            raise ValueError("no database file in broker URL; use sqlite:////abs/path.sqlite3")
        self.db_path = Path(os.path.abspath(location))

    def establish_connection(self) -> Transport:
        """Open the first channel's database now, so a bad path fails at connect time."""
        transport = super().establish_connection()
        self._avail_channels[-1]._run("SELECT 1")
        return transport

    def driver_version(self) -> str:
        """Return the version of the SQLite library."""
        return sqlite3.sqlite_version
