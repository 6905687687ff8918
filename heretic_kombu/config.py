"""Settings: one typed dataclass, built from the environment and the app's config.

Precedence, highest first: ``HERETIC_<NAME>`` environment variables, the app's config
under heretic's own name, the app's config under Celery's name (``broker_url``,
``task_default_queue``, ``worker_prefetch_multiplier``…), then the defaults below. The
environment is read when settings are built, never at import time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .exceptions import ConfigurationError
from .ratelimit import parse_rate
from .search import parse_duration

ENV_PREFIX = "HERETIC_"

#: Celery's key names accepted in app config, mapped to heretic's setting names.
CELERY_KEYS = {
    "broker_url": "broker_url",
    "task_default_queue": "default_queue",
    "worker_prefetch_multiplier": "prefetch_multiplier",
    "worker_concurrency": "concurrency",
    "worker_pool": "pool",
    "broker_transport_options": "broker_transport_options",
    "task_queue_max_priority": "queue_max_priority",
    "task_default_queue_type": "queue_type",  # Celery 5.5
    "task_always_eager": "always_eager",
    "task_eager_propagates": "eager_propagates",
    "task_time_limit": "time_limit",
    "task_soft_time_limit": "soft_time_limit",
    "task_default_rate_limit": "default_rate_limit",
}

#: Celery settings that would let non-JSON content in; heretic refuses them.
_SERIALIZER_KEYS = ("task_serializer", "result_serializer", "accept_content", "event_serializer")

POOLS = ("prefork", "threads", "solo")
#: The databases heretic's table may live in (the store speaks psycopg2 to PostgreSQL).
DATABASE_SCHEMES = ("postgresql", "postgresql+psycopg2", "sqlite", "sqlite+pysqlite")
QUEUE_TYPES = ("classic", "quorum")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything heretic_kombu can be configured with.

    Each field is also read from the environment variable ``HERETIC_<FIELD>``.
    """

    #: Job table. Default: a SQLite file, so nothing needs to run for a first try.
    database_url: str = "sqlite:///.heretic/jobs.sqlite3"
    #: Broker. Default: heretic's serverless SQLite transport beside the job table.
    broker_url: str = "sqlite:///.heretic/broker.sqlite3"
    #: Celery's default queue name, so messages from unchanged Celery clients arrive.
    default_queue: str = "celery"
    #: Messages reserved per pool slot; Celery's default.
    prefetch_multiplier: int = 4
    #: Messages reserved per pool slot while jobs are short (a few ms on average): more
    #: jobs per database commit. Equal to prefetch_multiplier turns the boost off.
    short_job_prefetch_multiplier: int = 64
    #: Pool slots; 0 means one per CPU, as in Celery.
    concurrency: int = 0
    #: prefork (processes, Celery's default), threads, or solo (in the consuming thread).
    pool: str = "prefork"
    #: Worker name in rows and logs; empty means heretic@<hostname>.
    worker_name: str = ""
    #: How often a worker's scheduler looks for due countdown/eta/retry jobs, in seconds.
    scheduler_interval: float = 1.0
    #: How often a worker renews the lease (``updated_at``) of the jobs it runs, in seconds.
    heartbeat_interval: float = 5.0
    #: A ``started`` job whose lease is older than this is lost (its worker died): retried.
    lease_timeout: float = 30.0
    #: A ``pending`` row older than this (publish failed after commit) is published again.
    pending_timeout: float = 60.0
    #: A ``queued`` row older than this whose message the broker may have lost (its
    #: queue holds fewer ready messages than there are such rows, or was re-created) is
    #: published again; duplicates are harmless, the claim decides. 0 turns it off.
    queued_timeout: float = 300.0
    #: At most this many ``queued`` rows are published again per reconciler pass.
    queued_republish_limit: int = 500
    #: A message whose task this worker does not know is passed back to its queue this
    #: many times (for a worker that knows it), then dead-lettered; its job is untouched.
    unknown_task_requeues: int = 3
    #: Longest pause between two reads of the row while AsyncResult.get() waits, in seconds.
    result_poll_interval: float = 0.2
    #: Passed to kombu's Connection (e.g. {"polling_interval": 0.05} for the embedded broker).
    broker_transport_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: x-max-priority for declared queues; unset declares queues without priorities.
    queue_max_priority: int | None = None
    #: RabbitMQ queue type of declared work queues: "classic" or "quorum" (replicated).
    queue_type: str = "classic"
    #: With quorum queues, deliveries of one message before RabbitMQ dead-letters it
    #: (x-delivery-limit): a second guard against a job that kills its worker forever.
    delivery_limit: int = 20
    #: Largest message body the broker accepts, in bytes: a call whose encoded arguments
    #: are larger is refused (InvalidValue). RabbitMQ's default max_message_size, 128 MiB.
    max_message_size: int = 134_217_728
    #: Seconds to wait for the broker to confirm one publish.
    confirm_timeout: float = 10.0
    #: Run tasks in the calling process instead of sending them (Celery's task_always_eager).
    always_eager: bool = False
    #: With always_eager, re-raise task exceptions in the caller.
    eager_propagates: bool = False
    #: Hard time limit in seconds for tasks without their own (prefork pool only).
    time_limit: float | None = None
    #: Soft time limit in seconds for tasks without their own (prefork and solo pools).
    soft_time_limit: float | None = None
    #: Rate limit ("10/s", "100/m", "1000/h") for tasks without their own; per worker.
    default_rate_limit: str = ""
    #: Workers delete finished jobs older than this ("30d", "12h"); empty keeps them all.
    prune_older_than: str = ""
    #: Comma-separated finished statuses the workers' pruning deletes.
    prune_statuses: str = "succeeded"
    #: How often a worker prunes, in seconds (several workers pruning at once is harmless).
    prune_interval: float = 600.0
    #: A prefork process is replaced after this many tasks; 0: never (Celery's
    #: worker_max_tasks_per_child). The threads and solo pools ignore it, as Celery's.
    worker_max_tasks_per_child: int = 0
    #: A prefork process whose resident memory exceeds this many KiB after a task is
    #: replaced (the task completes first); 0: no limit (Celery's
    #: worker_max_memory_per_child). The threads and solo pools ignore it.
    worker_max_memory_per_child: int = 0

    @classmethod
    def build(
        cls, conf: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings from app config and the environment (``os.environ`` by default)."""
        conf = dict(conf or {})
        env = os.environ if env is None else env
        refuse_non_json(conf)
        values: dict[str, Any] = {}
        for celery_key, name in CELERY_KEYS.items():
            if conf.get(celery_key) is not None:
                values[name] = conf[celery_key]
        for field in dataclasses.fields(cls):
            if conf.get(field.name) is not None:
                values[field.name] = conf[field.name]
            env_value = env.get(ENV_PREFIX + field.name.upper())
            if env_value not in (None, ""):
                values[field.name] = env_value
        coerced = {name: _coerce(cls, name, value) for name, value in values.items()}
        if isinstance(coerced.get("database_url"), str):
            coerced["database_url"] = database_url(coerced["database_url"])
        settings = cls(**coerced)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`ConfigurationError` for values no worker could use."""
        scheme = self.database_url.partition(":")[0].lower()
        if scheme not in DATABASE_SCHEMES:
            raise ConfigurationError(
                f"database_url ({env_var('database_url')}) {redact_url(self.database_url)!r}:"
                " heretic keeps its table in PostgreSQL (postgresql://user@host/db) or SQLite"
                " (sqlite:///path/jobs.sqlite3)"
            )
        broker_scheme = self.broker_url.partition(":")[0].lower()
        if broker_scheme in ("redis", "rediss") and importlib.util.find_spec("redis") is None:
            raise ConfigurationError(
                f"broker_url ({env_var('broker_url')}) is a Redis URL, but the redis package"
                " is not installed: pip install 'heretic-kombu[redis]'"
            )
        if self.pool not in POOLS:
            raise ConfigurationError(
                f"pool ({env_var('pool')}) must be one of {', '.join(POOLS)}, not {self.pool!r}"
            )
        if self.prefetch_multiplier < 1:
            raise ConfigurationError(
                f"prefetch_multiplier ({env_var('prefetch_multiplier')}) must be at least 1"
            )
        if self.short_job_prefetch_multiplier < 1:
            raise ConfigurationError(
                f"short_job_prefetch_multiplier ({env_var('short_job_prefetch_multiplier')})"
                " must be at least 1"
            )
        if self.concurrency < 0:
            raise ConfigurationError(
                f"concurrency ({env_var('concurrency')}) must be 0 (one per CPU) or more"
            )
        for recycling in ("worker_max_tasks_per_child", "worker_max_memory_per_child"):
            if getattr(self, recycling) < 0:
                raise ConfigurationError(
                    f"{recycling} ({env_var(recycling)}) must be 0 (no limit) or more"
                )
        if self.lease_timeout <= 2 * self.heartbeat_interval:
            raise ConfigurationError(
                f"lease_timeout ({env_var('lease_timeout')}) must exceed twice"
                f" heartbeat_interval ({env_var('heartbeat_interval')})"
            )
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigurationError(
                f"queue_type ({env_var('queue_type')}) must be one of {', '.join(QUEUE_TYPES)},"
                f" not {self.queue_type!r}"
            )
        if self.queue_type == "quorum" and self.queue_max_priority is not None:
            raise ConfigurationError(
                f"queue_type=quorum cannot be combined with queue_max_priority"
                f" ({env_var('queue_max_priority')}={self.queue_max_priority}): RabbitMQ quorum"
                " queues have no message priorities. Unset queue_max_priority, or use"
                " queue_type=classic"
            )
        if self.delivery_limit < 1:
            raise ConfigurationError(
                f"delivery_limit ({env_var('delivery_limit')}) must be at least 1"
            )
        if not self.default_queue:
            raise ConfigurationError(f"default_queue ({env_var('default_queue')}) is empty")
        if self.max_message_size < 1:
            raise ConfigurationError(
                f"max_message_size ({env_var('max_message_size')}) must be a number of bytes > 0"
            )
        if self.queue_max_priority is not None and not 0 <= self.queue_max_priority <= 255:
            raise ConfigurationError(
                f"queue_max_priority ({env_var('queue_max_priority')}) must be 0..255"
            )
        for name in ("time_limit", "soft_time_limit"):
            limit = getattr(self, name)
            if limit is not None and not limit > 0:
                raise ConfigurationError(
                    f"{name} ({env_var(name)}) must be a number of seconds > 0"
                )
        if self.prune_older_than:
            try:
                parse_duration(self.prune_older_than)
            except ValueError as exc:
                raise ConfigurationError(
                    f"prune_older_than ({env_var('prune_older_than')}): {exc}"
                ) from None
        finished = ("succeeded", "failed", "revoked", "ignored")
        unknown = [s for s in self.prune_status_list if s not in finished]
        if unknown or not self.prune_status_list:
            raise ConfigurationError(
                f"prune_statuses ({env_var('prune_statuses')}) must name finished statuses"
                f" ({', '.join(finished)}), not {self.prune_statuses!r}"
            )
        if self.default_rate_limit:
            try:
                parse_rate(self.default_rate_limit)
            except ValueError as exc:
                raise ConfigurationError(
                    f"default_rate_limit ({env_var('default_rate_limit')}): {exc}"
                ) from None

    @property
    def prune_status_list(self) -> list[str]:
        """``prune_statuses`` as a list."""
        return [s.strip() for s in self.prune_statuses.split(",") if s.strip()]

    @property
    def effective_concurrency(self) -> int:
        """Pool slots: ``concurrency``, or the number of CPUs when it is 0."""
        return self.concurrency or os.cpu_count() or 1

    @property
    def effective_worker_name(self) -> str:
        """The worker's name as written in rows: ``worker_name`` or heretic@<hostname>."""
        return self.worker_name or f"heretic@{socket.gethostname()}"


def database_url(url: str) -> str:
    """``url`` in the spelling SQLAlchemy takes: ``postgres://`` (Heroku's and many
    platforms' DATABASE_URL) becomes ``postgresql://``, and Celery's database result
    backend prefix ``db+`` is dropped, so a URL copied from either works."""
    if url.lower().startswith("db+"):
        url = url[3:]
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() == "postgres":
        return f"postgresql://{rest}"
    return url


def env_var(name: str) -> str:
    """The environment variable that sets the setting ``name``."""
    return ENV_PREFIX + name.upper()


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and CLI output."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def refuse_non_json(conf: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigurationError` if ``conf`` lets any content but JSON in."""
    for key in _SERIALIZER_KEYS:
        value = conf.get(key)
        if value is None:
            continue
        names = [value] if isinstance(value, str) else list(value)
        bad = [n for n in names if n not in ("json", "application/json")]
        if bad:
            raise ConfigurationError(
                f"{key}={value!r}: heretic_kombu speaks JSON only (never pickle, yaml or msgpack);"
                f" set {key} to 'json' or remove it"
            )


def _coerce(cls: type[Settings], name: str, value: Any) -> Any:
    field_type = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if not isinstance(value, str) or field_type == "str":
        return value
    try:
        if field_type == "int":
            return int(value)
        if field_type == "int | None":
            return int(value) if value.lower() not in ("none", "") else None
        if field_type == "float":
            return float(value)
        if field_type == "float | None":
            return float(value) if value.lower() not in ("none", "") else None
        if field_type == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if field_type.startswith("Mapping"):
            parsed = json.loads(value)
            if not isinstance(parsed, dict):
                raise ValueError(value)
            return parsed
    except ValueError as exc:
        raise ConfigurationError(
            f"{env_var(name)}/{name}: {value!r} is not a valid {field_type}"
        ) from exc
    return value
