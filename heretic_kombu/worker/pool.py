"""Execution pools: where task bodies run while the worker's main thread keeps consuming.

Three pools, Celery's names: ``prefork`` (child processes, the default), ``threads``
and ``solo`` (inline, in the consuming thread). Each runs
:func:`heretic_kombu.execution.execute` on a JSON-able call and hands the outcome to a
callback.

The worker claims every prefetched message it can in one statement and submits the
claimed jobs at once; a pool queues what it cannot start yet and starts the next call
the moment a slot frees (the prefork pool does it from its reader thread), so a slot
never waits for the worker's main thread, which may be busy committing.

The prefork pool talks to each child over a pipe in JSON (no pickle crosses it), knows
which job each child runs, and reports a child that dies mid-job as a ``lost`` outcome
for that job alone. When more calls wait than children are idle, each busy child is sent
its next call ahead, so it starts it the moment it ends the one it runs instead of
waiting for the parent to read its outcome and answer. A call sent ahead has not
started: it can still be taken back (revoke, warm shutdown) or moved to a child that
went idle while it waited behind a long job; the child checks, under a lock they
share, that the parent has not taken it back before it starts it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import failure, serialization, signals
from ..exceptions import TimeLimitExceeded
from ..execution import FAILED, LOST, announce_hard_time_limit, execute

if TYPE_CHECKING:
    from ..app import Heretic

logger = logging.getLogger("heretic_kombu.worker")

Callback = Callable[[dict[str, Any]], None]


class Pool:
    """Runs calls; subclasses decide where."""

    def __init__(
        self,
        app: Heretic,
        concurrency: int,
        *,
        max_tasks_per_child: int = 0,
        max_memory_per_child: int = 0,
    ) -> None:
        self.app = app
        self.concurrency = concurrency
        #: Replace a child process after this many tasks (0: never); prefork only.
        self.max_tasks_per_child = max_tasks_per_child
        #: Replace a child process whose resident memory went over this many KiB during
        #: a task, once that task has ended (0: no limit); prefork only.
        self.max_memory_per_child = max_memory_per_child

    def start(self) -> None:
        """Prepare the slots (prefork forks its children here)."""

    def submit(self, call: dict[str, Any], on_done: Callback) -> None:
        """Run ``call`` in a slot, now or when one frees, in order of submission;
        ``on_done(outcome)`` runs when it ends."""
        raise NotImplementedError

    def maintain(self) -> None:
        """Replace dead slots; called from the worker's main thread."""

    def stop(self, wait: bool = True) -> None:
        """Shut the slots down; with ``wait=False``, kill what is running."""

    #: Whether :meth:`terminate_job` can stop a running job (prefork only, as in Celery).
    can_terminate = False
    #: Whether hard time limits (``time_limit``) are enforced (prefork only).
    enforces_time_limits = False
    #: Whether max_tasks_per_child / max_memory_per_child recycle processes (prefork
    #: only, as in Celery).
    recycles = False

    def terminate_job(self, task_id: str, signum: int) -> bool:
        """Send ``signum`` to the process running ``task_id``; ``False`` if this pool
        cannot (threads, solo) or does not run that job now."""
        return False

    def take_queued(self) -> list[dict[str, Any]]:
        """Remove the calls submitted but not started, and return them (a warm
        shutdown hands their jobs back instead of running them)."""
        return []

    def take_unstarted(self, task_id: str) -> bool:
        """Remove the call of ``task_id`` if it has not started; ``True`` if removed
        (its ``on_done`` is never called)."""
        return False


class SoloPool(Pool):
    """Runs each call inline: simplest, one at a time, easy to debug."""

    def submit(self, call: dict[str, Any], on_done: Callback) -> None:
        on_done(_without_live_objects(execute(self.app, call)))


class ThreadPool(Pool):
    """Runs calls in threads: good for I/O-bound tasks."""

    def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.concurrency, thread_name_prefix="heretic-task"
        )
        self._lock = threading.Lock()
        # Calls submitted and not finished: take_queued cancels those not started.
        self._waiting: dict[concurrent.futures.Future[dict[str, Any]], dict[str, Any]] = {}

    def submit(self, call: dict[str, Any], on_done: Callback) -> None:
        def finished(future: concurrent.futures.Future[dict[str, Any]]) -> None:
            with self._lock:
                self._waiting.pop(future, None)
            if future.cancelled():  # taken back by take_queued before it started
                return
            exc = future.exception()
            if exc is not None:  # a BaseException that escaped execute()
                on_done({"status": FAILED, "exc": None, "error": repr(exc), "traceback": None})
            else:
                on_done(_without_live_objects(future.result()))

        future = self._executor.submit(execute, self.app, call)
        with self._lock:
            self._waiting[future] = call
        future.add_done_callback(finished)

    def take_queued(self) -> list[dict[str, Any]]:
        with self._lock:
            waiting = list(self._waiting.items())
        return [call for future, call in waiting if future.cancel()]

    def take_unstarted(self, task_id: str) -> bool:
        with self._lock:
            waiting = [f for f, call in self._waiting.items() if call.get("id") == task_id]
        return any(future.cancel() for future in waiting)

    def stop(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=not wait)


class _Handshake:
    """What a child and its parent share to agree whether a call sent ahead has started.

    Calls to a child are numbered in the order sent. The child starts call ``n`` only if
    ``n > withdrawn``, and records ``started = n``; the parent takes call ``n`` back only
    if ``started < n``, by setting ``withdrawn = n`` (every older call has started or
    was withdrawn before). Both steps hold the lock, so exactly one of them wins.
    """

    def __init__(self, context: Any) -> None:
        self.lock = context.Lock()
        self.numbers = context.RawArray("q", 2)  # [started, withdrawn]

    def start(self, number: int) -> bool:
        """In the child: claim call ``number``; ``False`` if the parent took it back."""
        with self.lock:
            if number <= self.numbers[1]:
                return False
            self.numbers[0] = number
            return True

    def has_started(self, number: int) -> bool:
        """In the parent: whether the child has started call ``number`` (a plain read:
        the answer may be late, never early)."""
        return bool(self.numbers[0] >= number)

    def withdraw(self, number: int) -> bool:
        """In the parent: take call ``number`` back; ``False`` if it has started (or the
        lock could not be had: a child killed while holding it is as good as started)."""
        if not self.lock.acquire(timeout=HANDSHAKE_TIMEOUT):
            return False
        try:
            if self.has_started(number):
                return False
            self.numbers[1] = number
            return True
        finally:
            self.lock.release()


class _Child:
    def __init__(
        self, process: multiprocessing.process.BaseProcess, conn: Any, handshake: _Handshake
    ) -> None:
        self.process = process
        self.conn = conn
        self.handshake = handshake
        self.sent = 0  # the number of the last call sent
        # The call sent ahead, not known to have started: (call, on_done, number).
        self.ahead: tuple[dict[str, Any], Callback, int] | None = None
        self.terminate_ahead: int | None = None  # signal sent to the call held ahead
        self.on_done: Callback | None = None
        self.dead = False
        self.call: dict[str, Any] | None = None  # the job it runs now
        self.started = 0.0
        self.deadline: float | None = None  # hard time limit, monotonic
        self.timed_out: float | None = None  # the hard limit that killed it
        self.kill_at: float | None = None  # SIGKILL if still alive then (after terminate)
        self.terminated: int | None = None  # the signal revoke(terminate=True) sent
        self.retired = False  # it said it exits after its last outcome (recycling)


#: Seconds a child may outlive the signal of revoke(terminate=True) before SIGKILL
#: (children ignore SIGTERM and SIGINT, which a warm shutdown must not pass on to jobs).
TERMINATE_GRACE = 1.0
#: Seconds between two checks of the hard time limits and terminations by the reader
#: thread (it also looks when a wait ends with nothing to read).
LIMITS_CHECK_INTERVAL = 0.05
#: A child whose job has run this long gets no call ahead, and the one it holds moves to
#: a child that is idle: it should not wait behind a long job.
AHEAD_WAIT_LIMIT = 0.1
#: Seconds the parent waits for a child's handshake lock before it counts the call as
#: started (only a child killed inside the few instructions it holds it for keeps it).
HANDSHAKE_TIMEOUT = 1.0
_NUMBER = struct.Struct("<q")  # the number that prefixes each call on a child's pipe


class PreforkPool(Pool):
    """Runs calls in forked child processes, one call per child at a time.

    It enforces hard time limits (the child is killed and the attempt fails with
    :class:`TimeLimitExceeded`) and terminates jobs revoked with ``terminate=True``.
    """

    can_terminate = True
    enforces_time_limits = True
    recycles = True

    def start(self) -> None:
        self._context = multiprocessing.get_context("fork")
        self._lock = threading.Lock()
        self._children: list[_Child] = []
        self._queued: collections.deque[tuple[dict[str, Any], Callback]] = collections.deque()
        for _ in range(self.concurrency):
            self._children.append(self._spawn())
        self._closing = False
        self._next_limits_check = 0.0
        self._reader = threading.Thread(target=self._read_loop, name="heretic-pool", daemon=True)
        self._reader.start()

    def _spawn(self) -> _Child:
        parent_conn, child_conn = self._context.Pipe()
        handshake = _Handshake(self._context)
        # The child must not keep the parent's ends of any pipe open, or closing them
        # would never signal EOF to the children at shutdown.
        inherited = [parent_conn, *(c.conn for c in self._children)]
        limits = (self.max_tasks_per_child, self.max_memory_per_child)
        process = self._context.Process(
            target=_child_main,
            args=(self.app, child_conn, handshake, inherited, limits),
            name="heretic-child",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Child(process, parent_conn, handshake)

    def submit(self, call: dict[str, Any], on_done: Callback) -> None:
        with self._lock:
            self._queued.append((call, on_done))
            self._dispatch()

    def _dispatch(self) -> None:
        """Give queued calls to children (the caller holds the lock): first to the idle
        ones, then one ahead to each busy child whose job is still short."""
        now = time.monotonic()
        live = [c for c in self._children if not c.dead]
        idle = [c for c in live if c.on_done is None]
        if idle:
            self._withdraw_stuck(live, len(idle), now)
        for child in idle:
            if not self._queued:
                return
            call, child.on_done = self._queued.popleft()
            self._send(child, call)
            self._begin(child, call, now)
        for child in live:
            if not self._queued:
                return
            if child.on_done is not None and child.ahead is None:
                if now - child.started < AHEAD_WAIT_LIMIT:
                    call, on_done = self._queued.popleft()
                    child.ahead = (call, on_done, self._send(child, call))

    def _withdraw_stuck(self, live: list[_Child], room: int, now: float) -> None:
        """Put back at the head of the queue the calls held ahead by children whose job
        has run ``AHEAD_WAIT_LIMIT`` or longer, for up to ``room`` idle children."""
        stuck = [c for c in live if c.ahead is not None and now - c.started >= AHEAD_WAIT_LIMIT]
        withdrawn = []
        for child in sorted(stuck, key=lambda c: c.started)[:room]:
            call, on_done, number = child.ahead  # type: ignore[misc]
            if child.handshake.withdraw(number):
                child.ahead = None
                withdrawn.append((call, on_done))
        self._queued.extendleft(reversed(withdrawn))

    @staticmethod
    def _begin(
        child: _Child, call: dict[str, Any], now: float, terminated: int | None = None
    ) -> None:
        """Note that ``child`` now runs ``call`` (sent to it idle, or held ahead until
        the outcome of the one before arrived)."""
        child.call, child.started = call, now
        child.timed_out = None
        child.terminated = terminated
        child.kill_at = now + TERMINATE_GRACE if terminated is not None else None
        limit = call.get("time_limit")
        child.deadline = now + float(limit) if limit else None

    @staticmethod
    def _send(child: _Child, call: dict[str, Any]) -> int:
        """Write ``call`` to the child's pipe, numbered; returns its number."""
        child.sent += 1
        try:
            child.conn.send_bytes(
                _NUMBER.pack(child.sent) + serialization.dumps(call).encode("utf-8")
            )
        except OSError:
            pass  # the child just died: its burial reports or re-queues this call
        return child.sent

    def take_queued(self) -> list[dict[str, Any]]:
        with self._lock:
            dropped = []
            for child in self._children:
                if child.ahead is not None and child.handshake.withdraw(child.ahead[2]):
                    dropped.append(child.ahead[0])
                    child.ahead = None
            dropped.extend(call for call, _ in self._queued)
            self._queued.clear()
        return dropped

    def take_unstarted(self, task_id: str) -> bool:
        with self._lock:
            for index, (call, _) in enumerate(self._queued):
                if call.get("id") == task_id:
                    del self._queued[index]
                    return True
            for child in self._children:
                if child.ahead is not None and child.ahead[0].get("id") == task_id:
                    if child.handshake.withdraw(child.ahead[2]):
                        child.ahead = None
                        return True
                    return False
        return False

    def terminate_job(self, task_id: str, signum: int) -> bool:
        with self._lock:
            for child in self._children:
                if child.dead:
                    continue
                if child.call is not None and child.call.get("id") == task_id:
                    child.terminated = signum
                    child.kill_at = time.monotonic() + TERMINATE_GRACE
                    break
                ahead = child.ahead
                if (
                    ahead
                    and ahead[0].get("id") == task_id
                    and child.handshake.has_started(ahead[2])
                ):
                    # It started after the one before, whose outcome is not read yet.
                    child.terminate_ahead = signum
                    break
            else:
                return False
        try:
            os.kill(child.process.pid, signum)  # type: ignore[arg-type]
        except ProcessLookupError:
            pass
        return True

    def _enforce_limits(self) -> None:
        """Kill children past their hard time limit, or still alive after terminate."""
        now = time.monotonic()
        with self._lock:
            running = [c for c in self._children if not c.dead and c.call is not None]
        for child in running:
            if child.deadline is not None and now >= child.deadline and child.timed_out is None:
                call = child.call or {}
                child.timed_out = float(call.get("time_limit") or 0)
                logger.error(
                    "Hard time limit (%ss) exceeded for %s[%s]: killing process %s",
                    f"{child.timed_out:g}",
                    call.get("task"),
                    call.get("id"),
                    child.process.pid,
                )
                child.process.kill()
            elif child.kill_at is not None and now >= child.kill_at and child.process.is_alive():
                child.kill_at = None
                child.process.kill()

    def _read_loop(self) -> None:
        while not self._closing:
            with self._lock:
                by_conn = {c.conn: c for c in self._children if not c.dead}
                by_sentinel = {c.process.sentinel: c for c in self._children if not c.dead}
            ready = multiprocessing.connection.wait([*by_conn, *by_sentinel], timeout=0.2)
            # Not after every outcome: a busy pool ends hundreds of jobs a second.
            if not ready or time.monotonic() >= self._next_limits_check:
                self._next_limits_check = time.monotonic() + LIMITS_CHECK_INTERVAL
                self._enforce_limits()
                with self._lock:
                    self._dispatch()  # a call held ahead behind a job grown long moves on
            for item in ready:
                child = by_conn.get(item) or by_sentinel.get(item)  # type: ignore[arg-type]
                if child is None or child.dead:
                    continue
                if item in by_conn:
                    try:
                        data = child.conn.recv_bytes()
                    except (EOFError, OSError):
                        self._bury(child)
                        continue
                    self._deliver(child, serialization.loads(data))
                else:
                    self._bury(child)

    def _deliver(self, child: _Child, outcome: dict[str, Any]) -> None:
        retiring = outcome.pop(RETIRING, None)
        lost_ahead: Callback | None = None
        with self._lock:
            on_done, child.on_done = child.on_done, None
            child.call = child.deadline = None
            if retiring:
                # Recycled: the child exits after this outcome and starts nothing more,
                # so the call it holds ahead goes to another child; maintain() forks
                # its replacement.
                logger.info("pool child %s recycled (%s)", child.process.pid, retiring)
                child.dead = child.retired = True
                ahead, child.ahead = child.ahead, None
                if ahead is not None:
                    if child.handshake.withdraw(ahead[2]):
                        self._queued.appendleft(ahead[:2])
                    else:  # cannot be: a retiring child starts nothing
                        lost_ahead = ahead[1]
            elif child.ahead is not None:  # the child has gone on to it already
                call, child.on_done, _ = child.ahead
                child.ahead = None
                self._begin(child, call, time.monotonic(), child.terminate_ahead)
                child.terminate_ahead = None
            self._dispatch()  # the next call starts before the worker records this one
        if on_done is not None:
            on_done(outcome)
        if lost_ahead is not None:
            lost_ahead({"status": LOST, "error": "pool child exited while recycled"})

    def _bury(self, child: _Child) -> None:
        child.process.join(timeout=1)
        with self._lock:
            child.dead = True  # nothing more is sent to it
        # Outcomes it sent before it died count; the call it held then is the one lost.
        while True:
            try:
                if not child.conn.poll():
                    break
                data = child.conn.recv_bytes()
            except (EOFError, OSError):
                break
            self._deliver(child, serialization.loads(data))
        with self._lock:
            on_done, child.on_done = child.on_done, None
            ahead, child.ahead = child.ahead, None
            if ahead is not None and not self._closing:  # never started: another child runs it
                self._queued.appendleft(ahead[:2])
                self._dispatch()
        if self._closing or (child.retired and on_done is None):
            return
        if on_done is not None and child.timed_out is not None:
            exc = TimeLimitExceeded(child.timed_out)
            announce_hard_time_limit(self.app, child.call or {}, exc)
            on_done(
                {
                    "status": FAILED,
                    "exc": failure.describe(exc),
                    "error": failure.summary(exc),
                    "traceback": None,
                    "runtime": time.monotonic() - child.started,
                }
            )
            return
        if on_done is not None and child.terminated is not None:
            name = signal.Signals(child.terminated).name
            logger.info("pool child %s terminated (%s) by revoke", child.process.pid, name)
            on_done(
                {
                    "status": LOST,
                    "error": f"terminated by {name} (revoke with terminate=True)",
                    "terminated": child.terminated,
                }
            )
            return
        logger.error("pool child %s exited with code %s", child.process.pid, child.process.exitcode)
        if on_done is not None:
            on_done(
                {
                    "status": LOST,
                    "error": f"worker process {child.process.pid} exited with"
                    f" code {child.process.exitcode} while running the job",
                }
            )

    def maintain(self) -> None:
        with self._lock:
            dead = [c for c in self._children if c.dead]
        for child in dead:
            replacement = self._spawn()
            with self._lock:
                self._children[self._children.index(child)] = replacement
                self._dispatch()
            child.conn.close()

    def stop(self, wait: bool = True) -> None:
        self._closing = True
        self._reader.join(timeout=2)
        for child in self._children:
            child.conn.close()  # the child sees EOF and exits
        for child in self._children:
            if wait:
                child.process.join(timeout=5)
            if child.process.is_alive():
                child.process.kill()
                child.process.join(timeout=5)


#: The key of a child's outcome that says it exits after it (why, for the log).
RETIRING = "_heretic_retiring"


def _child_main(
    app: Heretic,
    conn: Any,
    handshake: _Handshake,
    inherited: list[Any],
    limits: tuple[int, int] = (0, 0),
) -> None:
    """A prefork child: run calls received on ``conn`` until the parent closes it, but
    none the parent took back after sending it ahead; with ``limits`` (max tasks, max
    resident KiB), exit after the task that reaches one, as Celery's children do."""
    max_tasks, max_memory = limits
    tasks = 0
    for other in inherited:
        other.close()
    # The parent decides when children stop: a Ctrl-C or SIGTERM to the process group
    # must not interrupt a running job during a warm shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    signals.worker_process_init.send(sender=None)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            break
        (number,) = _NUMBER.unpack_from(data)
        if not handshake.start(number):
            continue  # taken back: run by another child, handed back or revoked
        call = serialization.loads(data[_NUMBER.size :])
        outcome = _without_live_objects(execute(app, call))
        try:
            encoded = serialization.dumps(outcome)
        except Exception as exc:  # e.g. retry(args=...) with values JSON cannot hold
            encoded = serialization.dumps(
                {
                    "status": FAILED,
                    "exc": None,
                    "error": f"EncodeError: {exc}",
                    "traceback": None,
                    "runtime": outcome.get("runtime"),
                }
            )
        tasks += 1
        retiring = _retiring(tasks, max_tasks, max_memory)
        if retiring:  # the parent reads the outcome, then takes back what it sent ahead
            encoded = serialization.dumps({**serialization.loads(encoded), RETIRING: retiring})
        conn.send_bytes(encoded.encode("utf-8"))
        if retiring:
            break
    os._exit(0)


def _retiring(tasks: int, max_tasks: int, max_memory: int) -> str | None:
    """Why a child that has run ``tasks`` tasks exits now, or ``None`` to go on."""
    if max_tasks and tasks >= max_tasks:
        return f"{tasks} tasks, max_tasks_per_child {max_tasks}"
    if max_memory:
        rss = resident_kib()
        if rss is not None and rss > max_memory:
            return f"resident memory {rss} KiB over max_memory_per_child {max_memory} KiB"
    return None


def resident_kib() -> int | None:
    """This process's resident set size in KiB (Linux's /proc; else the peak RSS)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except (ImportError, OSError):
        return None


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child if the worker dies (no orphaned jobs running)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except Exception:  # not fatal: the child still exits when its pipe closes
        logger.debug("prctl(PR_SET_PDEATHSIG) unavailable", exc_info=True)


def _without_live_objects(outcome: dict[str, Any]) -> dict[str, Any]:
    outcome.pop("exception", None)  # live objects stay in the process that ran the task
    outcome.pop("cause", None)
    return outcome


POOLS: dict[str, type[Pool]] = {"prefork": PreforkPool, "threads": ThreadPool, "solo": SoloPool}
