"""``app.control``: Celery's remote control, answered by the job table.

Celery broadcasts ``revoke`` to every worker, which keeps the id in memory and discards
the message when it comes (and forgets it on restart). heretic writes the revocation
into the job's row instead, so it holds for every worker, survives restarts, and is in
the job's history:

- a job that has not started (pending, scheduled, queued, retrying) becomes ``revoked``
  at once with error ``"revoked"``; its message, if one is queued, finds nothing to
  claim when a worker receives it, and the worker acks it and sends ``task_revoked``;
- a running job is left running unless ``terminate=True``, as in Celery; its outcome is
  recorded normally. A job a worker has claimed with its prefetch but not started yet
  is ``started`` in its row too: the row notes the request (error
  ``"revoke requested"``), and that worker drops the job at its next heartbeat, as
  Celery drops a revoked reserved task: it ends ``revoked``, the attempt uncounted;
- with ``terminate=True`` a running job becomes ``revoked`` with error
  ``"terminated (SIGTERM)"`` (the signal named); the worker running it learns this at
  its next heartbeat (``heartbeat_interval``), kills the pool process with that
  signal (prefork only), acks the message and sends ``task_revoked(terminated=True)``;
- a finished job is left alone.

Each change appends a line to the row's ``attempt_logs`` (invariant 8).
"""

from __future__ import annotations

import logging
import re
import signal as _signal
from collections.abc import Iterable
from typing import Any

from .core.protocols import StoreOwner
from .protocol import check_task_id

logger = logging.getLogger("heretic_kombu")

#: Celery's default signal for ``revoke(terminate=True)``.
TERM_SIGNAME = "SIGTERM"

_TERMINATED = re.compile(r"^terminated \((SIG[A-Z0-9]+)\)$")


def signal_name(value: str | int | None) -> str:
    """The canonical name (``"SIGKILL"``) of a signal given as a name, a short name
    (``"KILL"``) or a number, as Celery accepts it. Raises ``ValueError`` if unknown."""
    if value is None or value == "":
        return TERM_SIGNAME
    if isinstance(value, bool):
        raise ValueError(f"unknown signal {value!r}")
    if isinstance(value, int):
        try:
            return _signal.Signals(value).name
        except ValueError:
            raise ValueError(f"unknown signal number {value}") from None
    if isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("SIG"):
            name = f"SIG{name}"
        if name in _signal.Signals.__members__ and not name.startswith("SIG_"):
            return name
    raise ValueError(f"unknown signal {value!r}: use a name such as 'SIGTERM' or 'SIGKILL'")


def terminated_error(signame: str) -> str:
    """The ``error`` of a job revoked with ``terminate=True`` (names the signal)."""
    return f"terminated ({signame})"


def terminate_signal(error: str | None) -> int | None:
    """The signal number a worker must send for a revoked row with ``error``, or ``None``
    if the row was not revoked with ``terminate=True``."""
    match = _TERMINATED.match(error or "")
    if match is None:
        return None
    return int(_signal.Signals[match.group(1)])


class Control:
    """Celery's ``app.control`` for what a job table can answer: ``revoke``/``terminate``.

    It needs nothing of its app but the job store (read at each call: the app builds a
    new store after its settings change).
    """

    def __init__(self, app: StoreOwner) -> None:
        self.app = app

    def revoke(
        self,
        task_id: str | Iterable[str],
        destination: Any = None,
        terminate: bool = False,
        signal: str | int = TERM_SIGNAME,
        **kwargs: Any,
    ) -> dict[str, str]:
        """Revoke a job by id (or a list of ids), as Celery's ``control.revoke``.

        ``destination``, ``reply`` and the other broadcast options are accepted and
        ignored: the row is the one place every worker looks. Returns, per id, what
        happened: ``revoked``, ``terminated``, ``running`` (left to finish),
        ``finished`` (already ended, left alone) or ``missing`` (no such job).

        Raises:
            ValueError: an id is not a UUID, or the signal is unknown.
        """
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        ids = [check_task_id(str(one)) for one in ids]
        signame = signal_name(signal)
        store = self.app.store
        outcomes: dict[str, str] = {}
        for one in ids:
            outcome = store.revoke(
                one,
                terminate=bool(terminate),
                terminated_error=terminated_error(signame),
                by="app.control.revoke",
            )
            outcomes[one] = outcome
            if outcome == "running":
                logger.info("revoke %s: running, left to finish (terminate=False)", one)
            elif outcome == "finished":
                logger.info("revoke %s: already finished, left alone", one)
            elif outcome == "missing":
                logger.warning("revoke %s: no such job", one)
            else:
                logger.info("revoke %s: %s", one, outcome)
        return outcomes

    def terminate(
        self,
        task_id: str | Iterable[str],
        destination: Any = None,
        signal: str | int = TERM_SIGNAME,
    ) -> dict[str, str]:
        """Revoke and terminate a running job (Celery's ``control.terminate``)."""
        return self.revoke(task_id, destination=destination, terminate=True, signal=signal)
