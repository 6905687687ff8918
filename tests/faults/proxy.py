"""A loopback TCP proxy the fault tests put between heretic and a server.

Workers and producers connect to the proxy's port instead of RabbitMQ's or
PostgreSQL's, so a test can break *their* connections without touching the shared
server:

- :meth:`FaultProxy.cut`: close every connection (a reset), and refuse new ones
  (accepted and closed at once) until :meth:`FaultProxy.restore`;
- :meth:`FaultProxy.stall`: stop moving bytes in both directions while keeping the
  sockets open, as a dead network path looks to both ends;
- :meth:`FaultProxy.hold_replies`: forward what clients send, hold back what the
  server answers (a reply lost on the way), and :meth:`FaultProxy.reset` to break the
  connections afterwards while accepting new ones;
- :meth:`FaultProxy.restore`: back to normal.

Threads, not asyncio, so it runs beside the test's own blocking code. Loopback only.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        if target_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fault proxy only forwards to loopback")
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._cut = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._replies = threading.Event()  # cleared: the server's bytes are held back
        self._replies.set()
        self._closed = False
        #: Local ports of the proxy's connections to the server (RabbitMQ sees them as
        #: the clients' peer ports), for closing exactly these from the server side.
        self.upstream_ports: set[int] = set()
        self.accepted = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- faults -----------------------------------------------------------------

    def cut(self) -> None:
        """Reset every connection and refuse new ones until :meth:`restore`."""
        with self._lock:
            self._cut = True
            pairs, self._pairs = self._pairs, []
        self._flowing.set()  # let stalled pumps notice and exit
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def stall(self) -> None:
        """Stop forwarding bytes; connections stay open."""
        self._flowing.clear()

    def hold_replies(self) -> None:
        """Forward what clients send; hold what the server sends back (left unread)."""
        self._replies.clear()

    def reset(self) -> None:
        """Reset every connection; new ones are accepted (unlike :meth:`cut`)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def restore(self) -> None:
        """Accept and forward again."""
        with self._lock:
            self._cut = False
        self._flowing.set()
        self._replies.set()

    def close(self) -> None:
        """Stop the proxy and close everything."""
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # -- plumbing -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut or self._closed
            if refused:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            self.upstream_ports.add(upstream.getsockname()[1])
            with self._lock:
                if self._cut:
                    _reset(client)
                    _reset(upstream)
                    continue
                self._pairs.append((client, upstream))
                self.accepted += 1
            for source, sink, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pump,
                    args=(source, sink, replies),
                    name="fault-proxy-pump",
                    daemon=True,
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        def moving() -> bool:
            return self._flowing.is_set() and (not replies or self._replies.is_set())

        try:
            while True:
                self._flowing.wait()
                if self._closed or not self._is_open(source, sink):
                    return
                if not moving():
                    self._replies.wait(0.1)
                    continue
                ready, _, _ = select.select([source], [], [], 0.1)
                if not ready:
                    continue
                if not moving():
                    continue  # stopped between select and recv: leave the bytes unread
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except (OSError, ValueError):
            pass
        self._drop(source, sink)

    def _is_open(self, source: socket.socket, sink: socket.socket) -> bool:
        with self._lock:
            return any(source in pair and sink in pair for pair in self._pairs)

    def _drop(self, source: socket.socket, sink: socket.socket) -> None:
        with self._lock:
            self._pairs = [p for p in self._pairs if not (source in p and sink in p)]
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a broken network path looks."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
