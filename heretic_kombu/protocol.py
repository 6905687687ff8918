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

from . import serialization
from .exceptions import MalformedMessage

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
    task = headers["task"]
    if not isinstance(task, str) or not task:
        raise MalformedMessage("header 'task' must be a non-empty string")
    if not isinstance(args, list):
        raise MalformedMessage("body[0] (args) must be a JSON array")
    if not isinstance(kwargs, dict):
        raise MalformedMessage("body[1] (kwargs) must be a JSON object")
    if embed is not None and not isinstance(embed, dict):
        raise MalformedMessage("body[2] (embed) must be a JSON object or null")
    retries = headers.get("retries") or 0
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise MalformedMessage("header 'retries' must be a non-negative integer")
    group_index = headers.get("group_index")
    if group_index is not None and (
        not isinstance(group_index, int) or isinstance(group_index, bool)
    ):
        raise MalformedMessage("header 'group_index' must be an integer or null")
    timelimit = headers.get("timelimit") or [None, None]
    if not (
        isinstance(timelimit, list)
        and len(timelimit) == 2
        and all(_is_seconds(v) for v in timelimit)
    ):
        raise MalformedMessage("header 'timelimit' must be [hard, soft] seconds or nulls")
    job_id = headers.get(JOB_ID_HEADER)
    if job_id is not None and (not isinstance(job_id, int) or isinstance(job_id, bool)):
        raise MalformedMessage(f"header '{JOB_ID_HEADER}' must be an integer")
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
        embed=embed or {},
        priority=priority,
        group_index=group_index,
        timelimit=(timelimit[0], timelimit[1]),
    )


def check_task_id(value: Any) -> str:
    """Return ``value`` as a canonical UUID string, or raise ``ValueError``.

    Job ids are UUIDs (the table's ``task_id uuid`` column), as Celery generates them.
    """
    if not isinstance(value, str):
        raise ValueError(f"task id must be a UUID string, not {type(value).__name__}")
    return str(uuid.UUID(value))


def new_task_id() -> str:
    """A fresh task id, as Celery makes them (uuid4)."""
    return str(uuid.uuid4())


_EMPTY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_HOSTNAME = socket.gethostname()


def _is_seconds(value: Any) -> bool:
    return value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9
    )


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 1024 else text[:1021] + "..."


def _uuid_header(headers: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = headers.get(name)
    if value is None and not required:
        return None
    try:
        return check_task_id(value)
    except ValueError as exc:
        raise MalformedMessage(f"header {name!r} must be a UUID string, got {value!r}") from exc


def _datetime_header(headers: dict[str, Any], name: str) -> dt.datetime | None:
    value = headers.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedMessage(f"header {name!r} must be an ISO 8601 string or null")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise MalformedMessage(f"header {name!r} is not an ISO 8601 datetime: {value!r}") from exc
    # Celery sends naive datetimes in UTC when enable_utc is on (its default).
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
