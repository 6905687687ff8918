"""Behaviour of the embedded SQLite broker as seen through kombu's public API."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import kombu
import pytest
from kombu import Consumer, Exchange, Producer, Queue

from heretic_kombu.broker import embedded
from heretic_kombu.broker.embedded import Transport

EXCHANGE = Exchange("jobs", type="direct")
QUEUE = Queue("jobs", EXCHANGE, routing_key="jobs")


def connect(path: Path) -> kombu.Connection:
    """Open a connection to the broker file, polling fast to keep the tests quick."""
    conn = kombu.Connection(
        f"sqlite:///{path}", transport=Transport, transport_options={"polling_interval": 0.01}
    )
    conn.connect()
    return conn


def publish(conn: kombu.Connection, *bodies: Any, **kwargs: Any) -> None:
    producer = Producer(conn)
    for body in bodies:
        producer.publish(body, exchange=EXCHANGE, routing_key="jobs", declare=[QUEUE], **kwargs)


def drain(conn: kombu.Connection, received: list[Any], want: int, timeout: float = 10.0) -> None:
    """Drain events until ``received`` holds ``want`` items or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while len(received) < want and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.1)
        except TimeoutError:
            pass


def consume(conn: kombu.Connection, want: int = 1, **kwargs: Any) -> list[kombu.Message]:
    """Receive ``want`` messages from the jobs queue without acknowledging them."""
    received: list[kombu.Message] = []
    with Consumer(conn, [QUEUE], on_message=received.append, **kwargs):
        drain(conn, received, want)
    assert len(received) == want
    return received


def stored_rows(path: Path) -> int:
    """Count every row of the broker file, reserved or not."""
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    db.close()
    return count


@pytest.fixture
def broker(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "broker.sqlite3"


def test_ack_removes_the_message(broker: Path) -> None:
    with connect(broker) as conn:
        publish(conn, {"n": 1})
        assert broker.exists()  # parent directories were created
        [message] = consume(conn)
        assert message.payload == {"n": 1}
        message.ack()
        assert conn.default_channel._size("jobs") == 0
    assert stored_rows(broker) == 0
    with connect(broker) as conn:
        assert QUEUE(conn.default_channel).get() is None


def test_relative_url_is_resolved_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with kombu.Connection("sqlite:///sub/rel.db", transport=Transport) as conn:
        conn.connect()
        assert conn.transport.db_path == tmp_path / "sub" / "rel.db"
    assert (tmp_path / "sub" / "rel.db").exists()
    with pytest.raises(ValueError):
        kombu.Connection("sqlite://", transport=Transport).connect()


def test_competing_connections_each_get_distinct_messages(broker: Path) -> None:
    total = 40
    with connect(broker) as conn:
        publish(conn, *range(total))
    lock = threading.Lock()
    seen: list[list[int]] = [[], []]

    def worker(index: int) -> None:
        with connect(broker) as conn:

            def on_message(message: kombu.Message) -> None:
                seen[index].append(message.payload)
                message.ack()

            with Consumer(conn, [QUEUE], on_message=on_message):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    with lock:
                        if len(seen[0]) + len(seen[1]) >= total:
                            return
                    try:
                        conn.drain_events(timeout=0.05)
                    except TimeoutError:
                        pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert sorted(seen[0] + seen[1]) == list(range(total))
    assert stored_rows(broker) == 0


def test_reject_drops_or_requeues(broker: Path) -> None:
    with connect(broker) as conn:
        publish(conn, "drop", "again")
        first, second = consume(conn, 2)
        first.reject()
        assert first.delivery_info["redelivered"] is False
        second.requeue()
        [redelivered] = consume(conn)
        assert redelivered.payload == "again"
        assert redelivered.delivery_info["redelivered"] is True
        redelivered.ack()
    assert stored_rows(broker) == 0


def test_sigkilled_consumer_messages_come_back(broker: Path) -> None:
    with connect(broker) as conn:
        publish(conn, {"job": "survives"})
    marker = broker.parent / "received"
    script = textwrap.dedent(
        f"""
        import time, kombu
        from kombu import Consumer, Exchange, Queue
        from heretic_kombu.broker.embedded import Transport
        queue = Queue("jobs", Exchange("jobs", type="direct"), routing_key="jobs")
        conn = kombu.Connection({f"sqlite:///{broker}"!r}, transport=Transport)
        def hold(message):  # never acked
            open({str(marker)!r}, "w").close()
        with Consumer(conn, [queue], on_message=hold):
            while True:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    pass
        """
    )
    project_root = str(Path(embedded.__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([project_root, os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "child never received the message"
            time.sleep(0.02)
        with connect(broker) as conn:
            assert conn.default_channel._size("jobs") == 0  # reserved by the child
    finally:
        child.kill()
        child.wait(timeout=10)
        if child.stderr:
            child.stderr.close()
    with connect(broker) as conn:
        [message] = consume(conn)
        assert message.payload == {"job": "survives"}
        assert message.delivery_info["redelivered"] is True
        message.ack()
    assert stored_rows(broker) == 0


def test_clean_close_releases_unacked_messages(broker: Path) -> None:
    with connect(broker) as conn:
        publish(conn, "pending")
        consume(conn)
        assert conn.default_channel._size("jobs") == 0
    with connect(broker) as conn:
        assert conn.default_channel._size("jobs") == 1
        [message] = consume(conn)
        assert message.delivery_info["redelivered"] is True


def test_message_fields_round_trip_and_priority_orders_delivery(broker: Path) -> None:
    body = {"text": "h\u00e9llo", "nested": [1, 2.5, None, True]}
    with connect(broker) as conn:
        publish(conn, "low", priority=1)
        publish(conn, body, headers={"task": "t", "retries": 3}, priority=7)
        publish(conn, "mid", priority=4)
        publish(conn, b"\x00\xffraw", content_type="application/octet-stream", priority=0)
    with connect(broker) as conn:
        messages = consume(conn, 4)
    first, second, third, fourth = messages
    assert (first.payload, second.payload, third.payload) == (body, "mid", "low")
    assert first.headers == {"task": "t", "retries": 3}
    assert first.content_type == "application/json"
    assert first.properties["priority"] == 7
    assert fourth.body == b"\x00\xffraw"
    assert fourth.content_type == "application/octet-stream"


def test_no_ack_delivery_removes_the_message_and_queue_delete_drops_the_rest(
    broker: Path,
) -> None:
    with connect(broker) as conn:
        publish(conn, "fire", "forget")
        [message] = consume(conn, 1, no_ack=True)
        assert message.payload == "fire"
        assert stored_rows(broker) == 1
    with connect(broker) as conn:
        QUEUE(conn.default_channel).delete()
    assert stored_rows(broker) == 0
