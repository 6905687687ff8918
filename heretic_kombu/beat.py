"""Beat: sends the periodic tasks of Celery's ``beat_schedule``, exactly once per due time.

``app.conf.beat_schedule`` (or ``CELERYBEAT_SCHEDULE``) is Celery's dict::

    {"cleanup": {"task": "proj.tasks.cleanup", "schedule": crontab(minute="*/15"),
                 "args": (...), "kwargs": {...}, "options": {"queue": "...", "expires": 60}}}

``schedule`` is a crontab, a schedule, a timedelta or a number of seconds. The semantics
are Celery's: an interval entry that never ran is first due one interval after beat first
sees it; a crontab entry at its next matching minute; an entry overdue after downtime
fires once, not once per missed period.

What heretic adds: every firing is an ordinary job row, written and published like
``send_task`` (so late or missed firings show in ``heretic_jobs``: a firing's ``eta`` is
its due time, ``created_at`` when it was sent), and the entries' state lives in the
database (``heretic_beat_entries``), so any number of beats may run: each decides and
writes firings under a database lock, and a firing's task id is derived from the entry
name and due time, so the same due time can never give two jobs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import signal
import threading
import uuid
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import serialization, signals
from .exceptions import ConfigurationError, HereticKombuError
from .schedules import BaseSchedule, crontab, maybe_schedule
from .status import Status
from .store import BeatStore, EntrySpec, EntryState, Firing, NewJob, utcnow

if TYPE_CHECKING:
    from .app import Heretic

logger = logging.getLogger("heretic_kombu.beat")

#: Namespace of firing task ids: uuid5(FIRING_NAMESPACE, "<entry name>|<due time ISO>").
FIRING_NAMESPACE = uuid.UUID("5b0f7c1e-8f1d-4a43-9d0e-6865726574ff")
#: Longest sleep between two looks at the schedule, in seconds (Celery's default).
DEFAULT_MAX_INTERVAL = 300.0
#: Pause before trying again after the database or broker failed, at most.
_ERROR_PAUSE = 5.0

_ENTRY_KEYS = {"task", "schedule", "args", "kwargs", "options", "relative"}
#: Entry options passed on to the job, by Celery's names.
_OPTIONS = {"queue", "expires", "priority", "countdown", "serializer", "max_attempts"}
#: Celery options that make no sense here (heretic routes by queue name): ignored.
_IGNORED_OPTIONS = {"exchange", "routing_key", "exchange_type", "headers", "retry", "retry_policy"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One ``beat_schedule`` entry, checked."""

    name: str
    task: str
    schedule: BaseSchedule
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]

    def next_due(self, state: EntryState, now: dt.datetime) -> dt.datetime:
        """When this entry is due next, from its row: after its last run, else after the
        time its row was created (Celery's "last run = first seen")."""
        return self.schedule.next_due(state.last_run_at or state.created_at, now)


def firing_id(entry_name: str, due: dt.datetime) -> str:
    """The task id of the firing of ``entry_name`` due at ``due``: the same in every beat."""
    stamp = due.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")
    return str(uuid.uuid5(FIRING_NAMESPACE, f"{entry_name}|{stamp}"))


def schedule_from_conf(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The raw ``beat_schedule`` of an app's config (Celery's new or old key name)."""
    for key in ("beat_schedule", "CELERYBEAT_SCHEDULE", "celerybeat_schedule"):
        value = conf.get(key)
        if value is not None:
            if not isinstance(value, Mapping):
                raise ConfigurationError(f"{key} must be a dict of entries, not {value!r}")
            return dict(value)
    return {}


def timezone_from_conf(conf: Mapping[str, Any]) -> dt.tzinfo | None:
    """The app's Celery ``timezone`` setting, in which crontabs are read (``None``: UTC)."""
    name = conf.get("timezone") or conf.get("CELERY_TIMEZONE")
    if not name:
        return None
    try:
        return crontab(tz=name).tz
    except ValueError as exc:
        raise ConfigurationError(f"timezone: {exc}") from exc


def load_entries(raw: Mapping[str, Any], tz: dt.tzinfo | None = None) -> list[Entry]:
    """Check ``beat_schedule`` entries and return them.

    Raises:
        ConfigurationError: an entry is malformed; the message names it.
    """
    entries = []
    for name, spec in raw.items():
        where = f"beat_schedule entry {name!r}"
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"beat_schedule names must be non-empty strings: {name!r}")
        if not isinstance(spec, Mapping):
            raise ConfigurationError(f"{where} must be a dict, not {spec!r}")
        unknown = set(spec) - _ENTRY_KEYS
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}"
            )
        task = spec.get("task")
        if not isinstance(task, str) or not task:
            raise ConfigurationError(f"{where} needs a task name ('task': 'proj.tasks.x')")
        if "schedule" not in spec:
            raise ConfigurationError(f"{where} needs a 'schedule'")
        try:
            schedule = maybe_schedule(spec["schedule"])
        except ValueError as exc:
            raise ConfigurationError(f"{where}: {exc}") from exc
        if isinstance(schedule, crontab) and schedule.tz is None and tz is not None:
            schedule = schedule.in_timezone(tz)
        args = spec.get("args") or ()
        kwargs = spec.get("kwargs") or {}
        options = dict(spec.get("options") or {})
        if not isinstance(args, (list, tuple)):
            raise ConfigurationError(f"{where}: args must be a list or tuple, not {args!r}")
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise ConfigurationError(f"{where}: kwargs must be a dict with string keys")
        unknown_options = set(options) - _OPTIONS - _IGNORED_OPTIONS
        if unknown_options:
            raise ConfigurationError(
                f"{where}: unknown options {sorted(unknown_options)}; supported: {sorted(_OPTIONS)}"
            )
        for option in sorted(set(options) & _IGNORED_OPTIONS):
            logger.warning("%s: option %r is ignored (heretic routes by queue)", where, option)
            del options[option]
        try:
            serialization.dumps({"args": list(args), "kwargs": dict(kwargs)})
        except HereticKombuError as exc:
            raise ConfigurationError(f"{where}: {exc}") from exc
        entries.append(Entry(name, task, schedule, list(args), dict(kwargs), options))
    return entries


class Beat:
    """Fires the app's ``beat_schedule`` entries when due; any number may run at once.

    Args:
        app: the app whose config holds ``beat_schedule`` and whose store and broker
            the firings go through.
        max_interval: longest sleep between two looks at the schedule, in seconds
            (``--max-interval``; default ``HERETIC_BEAT_MAX_INTERVAL``, then Celery's
            ``beat_max_loop_interval``, then 300).
        schedule: the entries, instead of the app's ``beat_schedule``.

    Raises:
        ConfigurationError: an entry is malformed or cannot be sent as a job.
    """

    def __init__(
        self,
        app: Heretic,
        *,
        max_interval: float | None = None,
        schedule: Mapping[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.max_interval = _max_interval(app.conf, max_interval)
        raw = schedule_from_conf(app.conf) if schedule is None else dict(schedule)
        self.entries = load_entries(raw, timezone_from_conf(app.conf))
        for entry in self.entries:  # fail now, not at the first firing
            try:
                self._job(entry, utcnow())
            except HereticKombuError as exc:
                raise ConfigurationError(f"beat_schedule entry {entry.name!r}: {exc}") from exc
        self.store = BeatStore(app.store)
        self._synced = False
        self._stop = threading.Event()

    # -- one step ------------------------------------------------------------

    def setup(self) -> None:
        """Record the configured entries in ``heretic_beat_entries`` (once)."""
        if self._synced:
            return
        changes = self.store.sync(
            EntrySpec(e.name, e.task, e.schedule.describe()) for e in self.entries
        )
        for entry in self.entries:
            change = changes.get(entry.name)
            if change == "changed":
                logger.info("beat: entry %s changed: now %s", entry.name, entry.schedule)
            elif change == "new":
                logger.info("beat: new entry %s: %s", entry.name, entry.schedule)
        self._synced = True

    def tick(self) -> float:
        """Fire every entry due now; return the seconds until the next is due (at most
        ``max_interval``).

        Deciding and writing the firings is one transaction under beat's database lock;
        the messages are published after its commit. A beat that dies in between leaves
        the rows ``pending``, and a worker's reconciler publishes them.
        """
        self.setup()
        rows, current = self.store.fire(self._plan)
        for row in rows:
            try:
                self.app.deliver_all([row])
            except Exception as exc:  # the committed row is the job: a reconciler publishes it
                logger.error("beat: could not publish %s[%s]: %s", row.task_name, row.task_id, exc)
        return self._wait(current, utcnow())

    def _plan(self, current: dict[str, EntryState], now: dt.datetime) -> list[Firing]:
        firings = []
        for entry in self.entries:
            state = current.get(entry.name)
            if state is None:
                continue
            due = entry.next_due(state, now)
            if due > now:
                continue
            late = (now - due).total_seconds()
            logger.info(
                "beat: sending due task %s (%s)%s",
                entry.name,
                entry.task,
                f", {late:.1f} s late (due {due:%Y-%m-%d %H:%M:%S})" if late >= 1 else "",
            )
            # The run is recorded as now, as Celery does: after downtime an overdue entry
            # fires once, and its next due time counts from this firing.
            firings.append(Firing(entry.name, self._job(entry, due), now))
        return firings

    def _job(self, entry: Entry, due: dt.datetime) -> NewJob:
        job = self.app.build_job(
            entry.task,
            list(entry.args),
            dict(entry.kwargs),
            task_id=firing_id(entry.name, due),
            **entry.options,
        )
        if job.status == Status.PENDING:
            # The row's eta is the due time, so `created_at - eta` shows how late it fired.
            job = dataclasses.replace(job, eta=due)
        return job

    def _wait(self, current: dict[str, EntryState], now: dt.datetime) -> float:
        wait = self.max_interval
        for entry in self.entries:
            state = current.get(entry.name)
            if state is not None:
                wait = min(wait, (entry.next_due(state, now) - now).total_seconds())
        return max(0.0, wait)

    # -- the loop --------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        """Tick until :meth:`stop` (or SIGTERM/SIGINT with ``install_signals``); return 0.

        A second signal exits at once with status 1. A database or broker failure is
        logged and tried again after a pause, as a worker does.
        """
        if install_signals:
            self._install_signals()
        logger.info(
            "beat: starting with %d entries (%s), max interval %g s",
            len(self.entries),
            ", ".join(e.name for e in self.entries) or "none configured",
            self.max_interval,
        )
        try:
            while not self._stop.is_set():
                try:
                    wait = self.tick()
                except Exception as exc:
                    # A database or broker outage must not end beat: try again later.
                    wait = min(self.max_interval, _ERROR_PAUSE)
                    ours = isinstance(exc, HereticKombuError)  # clear already: no traceback
                    logger.error(
                        "beat: %s; trying again in %g s", exc, wait, exc_info=None if ours else exc
                    )
                self._stop.wait(wait)
        finally:
            self.app.broker.close()  # this thread's producer connection
        logger.info("beat: stopped")
        return 0

    def stop(self) -> None:
        """Ask :meth:`run` to return (from a signal handler or another thread)."""
        self._stop.set()

    def _install_signals(self) -> None:
        def handle(signum: int, frame: FrameType | None) -> None:
            if self._stop.is_set():
                raise SystemExit(1)
            logger.info("beat: %s received, stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


def run_beside_worker(beat: Beat, worker: Any) -> threading.Thread:
    """Run ``beat`` in a thread of ``worker``'s process (``heretic worker -B``).

    The thread starts when the worker is ready (after its pool has forked, so no child
    inherits it mid-transaction) and is stopped and joined when the worker shuts down,
    before the worker closes the app's connections.
    """
    thread = threading.Thread(
        target=beat.run, kwargs={"install_signals": False}, name="heretic-beat", daemon=True
    )

    def start(sender: Any = None, **_: Any) -> None:
        thread.start()

    def stop(sender: Any = None, **_: Any) -> None:
        beat.stop()
        if thread.is_alive():
            thread.join(timeout=30)

    signals.worker_ready.connect(start, sender=worker)
    signals.worker_shutdown.connect(stop, sender=worker)
    return thread


def _max_interval(conf: Mapping[str, Any], given: float | None) -> float:
    raw: Any = given
    if raw is None:
        raw = os.environ.get("HERETIC_BEAT_MAX_INTERVAL") or None
    if raw is None:
        raw = conf.get("beat_max_loop_interval")
    if raw is None:
        return DEFAULT_MAX_INTERVAL
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:
        raise ConfigurationError(
            f"beat max interval (HERETIC_BEAT_MAX_INTERVAL/--max-interval) must be a positive"
            f" number of seconds, not {raw!r}"
        )
    return value
