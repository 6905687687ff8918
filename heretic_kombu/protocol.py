"""The wire format: Celery message protocol v2, JSON only, strictly validated.

A message is ``headers`` (``task``, ``id``, ``retries``, ``eta``, ``expires``,
``root_id``, ``parent_id``, ``group``…) plus a JSON body ``[args, kwargs, embed]``.
heretic producers add the header ``heretic_job_id`` naming the job's row; messages
without it come from Celery clients, and the worker creates their row on receipt.

:func:`decode` turns whatever arrived into a :class:`TaskMessage` or raises
:class:`MalformedMessage` with the reason; it never unpickles or guesses.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import uuid
from typing import Any

from . import limits, serialization
from .exceptions import EncodeError, InvalidValue, MalformedMessage

CONTENT_TYPE = "application/json"
JOB_ID_HEADER = "heretic_job_id"


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """One task invocation as carried by a message."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    retries: int = 0
    eta: dt.datetime | None = None
    expires: dt.datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    job_id: int | None = None  # heretic's row id; None for messages from Celery clients
    embed: dict[str, Any] = dataclasses.field(default_factory=dict)
    priority: int | None = None
    group_index: int | None = None
    timelimit: tuple[float | None, float | None] = (None, None)  # (hard, soft) seconds


def encode(message: TaskMessage) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Return ``(body, headers, properties)`` for publishing ``message``."""
    body = serialization.dumps([message.args, message.kwargs, message.embed or _EMPTY_EMBED])
    headers = {
        "lang": "py",
        "task": message.task,
        "id": message.id,
        "shadow": None,
        "eta": _iso(message.eta),
        "expires": _iso(message.expires),
        "group": message.group,
        "group_index": message.group_index,
        "retries": message.retries,
        "timelimit": list(message.timelimit),
        "root_id": message.root_id or message.id,
        "parent_id": message.parent_id,
        "argsrepr": _short_repr(message.args),
        "kwargsrepr": _short_repr(message.kwargs),
        "origin": f"{os.getpid()}@{_HOSTNAME}",
        "ignore_result": False,
        JOB_ID_HEADER: message.job_id,
    }
    properties: dict[str, Any] = {"correlation_id": message.id}
    if message.priority is not None:
        properties["priority"] = message.priority
    return body, headers, properties


def decode(
    body: bytes | str | None,
    content_type: str | None,
    headers: dict[str, Any] | None,
    priority: int | None = None,
) -> TaskMessage:
    """Validate a received message and return it as a :class:`TaskMessage`.

    Raises:
        MalformedMessage: the message can never be handled; the reason says why.
    """
    if content_type != CONTENT_TYPE:
        raise MalformedMessage(
            f"content type {content_type!r} refused: heretic_kombu accepts {CONTENT_TYPE} only"
        )
    if not isinstance(headers, dict) or "task" not in headers or "id" not in headers:
        raise MalformedMessage(
            "not a Celery protocol v2 message: headers 'task' and 'id' are missing"
        )
    try:
        decoded = serialization.loads(body if body is not None else b"")
    except Exception as exc:  # kombu's typed-value hooks raise TypeError, AttributeError…
        raise MalformedMessage(f"body is not valid JSON: {exc!r}") from exc
    if not (isinstance(decoded, list) and len(decoded) == 3):
        raise MalformedMessage("body must be a JSON array [args, kwargs, embed]")
    args, kwargs, embed = decoded
    if not isinstance(args, list):
        raise MalformedMessage("body[0] (args) must be a JSON array")
    if not isinstance(kwargs, dict):
        raise MalformedMessage("body[1] (kwargs) must be a JSON object")
    if embed is not None and not isinstance(embed, dict):
        raise MalformedMessage("body[2] (embed) must be a JSON object or null")
    try:
        return _checked(headers, args, kwargs, embed or {}, priority)
    except InvalidValue as exc:  # the same rules as a call's (heretic_kombu.limits)
        raise MalformedMessage(str(exc)) from None


def _checked(
    headers: dict[str, Any],
    args: list[Any],
    kwargs: dict[str, Any],
    embed: dict[str, Any],
    priority: int | None,
) -> TaskMessage:
    """The message's values checked against what the table, the broker and a worker can
    hold (:mod:`heretic_kombu.limits`); raises :class:`InvalidValue` naming the header."""
    task = limits.name(headers["task"], "header 'task'")
    retries = headers.get("retries") or 0
    limits.integer(retries, "header 'retries'", minimum=0, maximum=limits.RETRIES_MAX)
    group_index = headers.get("group_index")
    if group_index is not None:
        limits.integer(group_index, "header 'group_index'", minimum=0)
    timelimit = headers.get("timelimit") or [None, None]
    if not (isinstance(timelimit, list) and len(timelimit) == 2):
        raise InvalidValue("header 'timelimit' must be [hard, soft] seconds or nulls")
    hard, soft = (
        limits.positive_seconds(value, "header 'timelimit'") if value is not None else None
        for value in timelimit
    )
    job_id = headers.get(JOB_ID_HEADER)
    if job_id is not None:
        limits.integer(job_id, f"header '{JOB_ID_HEADER}'", minimum=1, maximum=limits.BIGINT_MAX)
    if priority is not None:
        limits.priority(priority, "the message's priority")
    if any(value is not None for value in embed.values()):
        try:  # the links a Celery client sends are kept in the job's row
            serialization.dumps(embed)
        except EncodeError as exc:
            raise InvalidValue(f"body[2] (embed) cannot be stored: {exc}") from None
    return TaskMessage(
        id=_uuid_header(headers, "id", required=True),  # type: ignore[arg-type]
        task=task,
        args=args,
        kwargs=kwargs,
        retries=retries,
        eta=_datetime_header(headers, "eta"),
        expires=_datetime_header(headers, "expires"),
        root_id=_uuid_header(headers, "root_id"),
        parent_id=_uuid_header(headers, "parent_id"),
        group=_uuid_header(headers, "group"),
        job_id=job_id,
        embed=embed,
        priority=priority,
        group_index=group_index,
        timelimit=(hard, soft),
    )


def check_task_id(value: Any) -> str:
    """Return ``value`` as a canonical UUID string, or raise ``InvalidValue`` (a
    ``ValueError``).

    Job ids are UUIDs (the table's ``task_id`` column), as Celery generates them.
    """
    return limits.task_id(value)


def new_task_id() -> str:
    """A fresh task id, as Celery makes them (uuid4)."""
    return str(uuid.uuid4())


_EMPTY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_HOSTNAME = socket.gethostname()


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 1024 else text[:1021] + "..."


def _uuid_header(headers: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = headers.get(name)
    if value is None and not required:
        return None
    return limits.task_id(value, f"header {name!r}")


def _datetime_header(headers: dict[str, Any], name: str) -> dt.datetime | None:
    value = headers.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidValue(f"header {name!r} must be an ISO 8601 string or null")
    # Celery sends naive datetimes in UTC when enable_utc is on (its default).
    return limits.moment_text(value, f"header {name!r}")
