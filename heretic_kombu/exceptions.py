"""Every exception heretic_kombu raises, and the control-flow exceptions tasks raise.

Celery's names are kept so that ``except celery.exceptions.X`` becomes
``except heretic_kombu.exceptions.X`` with no other change::

    HereticKombuError
    ├── ConfigurationError          bad or unsupported setting
    ├── NotRegistered               no task of that name in the registry
    ├── EncodeError                 arguments or result are not JSON (also a kombu EncodeError)
    ├── StoreError                  the job table could not be read or written
    ├── BrokerError                 the broker refused or lost a message
    │   ├── PublishError            a publish was not confirmed
    │   └── QueueMismatchError      RabbitMQ holds the queue with other arguments (406)
    ├── MalformedMessage            a delivered message can never be handled (dead-lettered)
    ├── TimeoutError                AsyncResult.get() waited longer than its timeout
    ├── TaskRevokedError            the job was revoked or expired before it ran
    ├── MaxRetriesExceededError     Task.retry() past max_retries
    └── WorkerLostError             the process running the job died

    TimeLimitExceeded               the hard time limit killed the job (recorded as its error)

    Retry                           control flow: raised by Task.retry()
    Reject                          control flow: reject (dead-letter) or requeue the message
    Ignore                          control flow: end the job without recording an outcome
    SoftTimeLimitExceeded           raised inside a task body when its soft time limit passes
    Terminated                      the job's process was terminated by revoke(terminate=True)

The default message of each class is its docstring's first line.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from kombu.exceptions import EncodeError as _KombuEncodeError


class HereticKombuError(Exception):
    """A heretic_kombu error."""

    def __init__(self, message: str | None = None, *args: Any) -> None:
        if message is None:
            message = (self.__doc__ or type(self).__name__).strip().splitlines()[0]
        super().__init__(message, *args)


class ConfigurationError(HereticKombuError):
    """The configuration is invalid."""


class NotRegistered(HereticKombuError, KeyError):
    """No task is registered under this name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidValue(HereticKombuError, ValueError):
    """A value heretic could not store, read back, publish or run (a date out of range,
    a counter too large for its column, a NUL in a name...): refused where it entered,
    with nothing written."""


class EncodeError(HereticKombuError, _KombuEncodeError):
    """The value cannot be encoded as JSON."""


class StoreError(HereticKombuError):
    """The job table could not be read or written."""


class BrokerError(HereticKombuError):
    """The broker refused or lost a message."""


class PublishError(BrokerError):
    """The broker did not confirm the message."""


class MessageRefused(PublishError):
    """This one message can never be published as it is: it cannot be encoded for the
    broker (e.g. a priority over 255 for AMQP) or the broker refused it on its own (e.g.
    bigger than its maximum message size), while it took others. Publishing it again
    cannot help: its job is set aside (failed with this reason)."""


class QueueMismatchError(BrokerError):
    """The queue exists on the broker with different arguments."""


class MalformedMessage(HereticKombuError):
    """The message can never be handled."""


class TimeoutError(HereticKombuError):  # noqa: A001 - Celery's name
    """The operation timed out."""


class TaskRevokedError(HereticKombuError):
    """The task was revoked or expired before it ran."""


class MaxRetriesExceededError(HereticKombuError):
    """The task exceeded its maximum number of retries."""


class WorkerLostError(HereticKombuError):
    """The worker process running the job exited unexpectedly."""


class Retry(HereticKombuError):
    """The task is to be retried later.

    Raised by ``Task.retry()``; the worker records the attempt and schedules the next
    one. ``when`` is a number of seconds or an aware datetime.
    """

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | None = None,
        when: float | dt.datetime | None = None,
    ) -> None:
        self.exc = exc
        self.when = when
        if message is None:
            message = f"Retry in {when}s" if isinstance(when, (int, float)) else f"Retry at {when}"
            if exc is not None:
                message = f"{message}: {exc!r}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.exc, self.when)


class ChordError(HereticKombuError):
    """A chord's header job failed, so its body was not run (Celery's ``ChordError``)."""


class TimeLimitExceeded(HereticKombuError):
    """The hard time limit was exceeded and the job's process was killed.

    Celery's name (from billiard). The worker records the attempt as failed with this
    error and does not retry it, as Celery does. ``TimeLimitExceeded(30)`` reads
    "hard time limit (30s) exceeded".
    """

    def __init__(self, message: str | float | None = None, *args: Any) -> None:
        if isinstance(message, (int, float)):
            message = f"hard time limit ({float(message):g}s) exceeded"
        super().__init__(message, *args)


class SoftTimeLimitExceeded(HereticKombuError):
    """The soft time limit was exceeded.

    Raised inside the task body (Celery's name, from billiard) to give the task a chance
    to clean up; a task that catches it may still return normally.
    """


class Terminated(HereticKombuError):
    """The job's process was terminated by ``revoke(terminate=True)``."""


class Reject(HereticKombuError):
    """Raised by a task to reject its message (Celery's ``Reject``).

    ``requeue=False``: the message is dead-lettered and the job is failed with
    ``reason``. ``requeue=True``: the attempt is logged and the job runs again, while it
    has attempts left (``max_attempts``); after that it fails and is dead-lettered.
    """

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(str(reason) if reason is not None else "rejected", requeue)

    def __str__(self) -> str:
        return str(self.reason) if self.reason is not None else "rejected"

    def __repr__(self) -> str:
        return f"reject requeue={self.requeue}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.reason, self.requeue)


class Ignore(HereticKombuError):
    """Raised by a task to end the job without an outcome (Celery's ``Ignore``).

    Celery stores nothing for such a task; heretic ends the row in the terminal status
    ``ignored`` (Celery's state name ``IGNORED``) with an ``attempt_logs`` line, and acks
    the message.
    """
