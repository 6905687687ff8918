"""Settings: defaults, Celery key names, precedence, env coercion and refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from heretic_kombu import Heretic
from heretic_kombu.config import Settings, env_var, redact_url
from heretic_kombu.exceptions import ConfigurationError


def build(conf: dict[str, Any] | None = None, **env: str) -> Settings:
    return Settings.build(conf, env=env)


# -- defaults and names ----------------------------------------------------------


def test_defaults_are_the_embedded_sqlite_files() -> None:
    settings = build()
    assert settings.database_url == "sqlite:///.heretic/jobs.sqlite3"
    assert settings.broker_url == "sqlite:///.heretic/broker.sqlite3"
    assert settings.default_queue == "celery"
    assert settings.prefetch_multiplier == 4
    assert settings.pool == "prefork"
    assert settings.always_eager is False


def test_build_without_env_argument_reads_os_environ(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERETIC_DEFAULT_QUEUE", "from-os-environ")
    assert Settings.build({}).default_queue == "from-os-environ"


def test_celery_key_names_are_honoured() -> None:
    settings = build(
        {
            "broker_url": "amqp://guest:guest@rabbit:5672//",
            "task_default_queue": "jobs",
            "worker_prefetch_multiplier": 1,
            "worker_concurrency": 3,
            "worker_pool": "threads",
            "task_always_eager": True,
            "task_eager_propagates": True,
            "task_queue_max_priority": 10,
        }
    )
    assert settings.broker_url == "amqp://guest:guest@rabbit:5672//"
    assert settings.default_queue == "jobs"
    assert settings.prefetch_multiplier == 1
    assert settings.concurrency == 3
    assert settings.pool == "threads"
    assert settings.always_eager is True
    assert settings.eager_propagates is True
    assert settings.queue_max_priority == 10


def test_heretic_names_win_over_celery_names() -> None:
    settings = build(
        {
            "task_default_queue": "celery-name",
            "default_queue": "heretic-name",
            "worker_prefetch_multiplier": 2,
            "prefetch_multiplier": 7,
        }
    )
    assert settings.default_queue == "heretic-name"
    assert settings.prefetch_multiplier == 7


def test_environment_wins_over_both_config_names() -> None:
    settings = build(
        {"task_default_queue": "celery-name", "default_queue": "heretic-name"},
        HERETIC_DEFAULT_QUEUE="from-env",
    )
    assert settings.default_queue == "from-env"
    assert build({"broker_url": "amqp://a//"}, HERETIC_BROKER_URL="amqp://b//").broker_url == (
        "amqp://b//"
    )


def test_empty_environment_value_does_not_override_config() -> None:
    assert build({"default_queue": "conf"}, HERETIC_DEFAULT_QUEUE="").default_queue == "conf"


def test_none_in_config_means_unset() -> None:
    assert build({"default_queue": None, "broker_url": None}) == build()


def test_env_var_names_follow_the_setting_names() -> None:
    assert env_var("prefetch_multiplier") == "HERETIC_PREFETCH_MULTIPLIER"


# -- coercion of environment strings ---------------------------------------------


def test_env_strings_are_coerced_to_the_setting_types() -> None:
    settings = build(
        HERETIC_PREFETCH_MULTIPLIER="8",
        HERETIC_CONCURRENCY="2",
        HERETIC_SCHEDULER_INTERVAL="0.25",
        HERETIC_CONFIRM_TIMEOUT="3",
        HERETIC_ALWAYS_EAGER="true",
        HERETIC_BROKER_TRANSPORT_OPTIONS='{"polling_interval": 0.05, "nested": {"a": [1]}}',
        HERETIC_QUEUE_MAX_PRIORITY="10",
    )
    assert settings.prefetch_multiplier == 8 and type(settings.prefetch_multiplier) is int
    assert settings.concurrency == 2
    assert settings.scheduler_interval == 0.25
    assert settings.confirm_timeout == 3.0 and type(settings.confirm_timeout) is float
    assert settings.always_eager is True
    assert dict(settings.broker_transport_options) == {
        "polling_interval": 0.05,
        "nested": {"a": [1]},
    }
    assert settings.queue_max_priority == 10


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "yes", "On"])
def test_truthy_env_strings(text: str) -> None:
    assert build(HERETIC_EAGER_PROPAGATES=text).eager_propagates is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", "OFF"])
def test_falsy_env_strings(text: str) -> None:
    assert (
        build({"eager_propagates": True}, HERETIC_EAGER_PROPAGATES=text).eager_propagates is False
    )


def test_queue_max_priority_none_from_env() -> None:
    assert (
        build({"queue_max_priority": 5}, HERETIC_QUEUE_MAX_PRIORITY="none").queue_max_priority
        is None
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("HERETIC_PREFETCH_MULTIPLIER", "lots"),
        ("HERETIC_CONCURRENCY", "2.5"),
        ("HERETIC_SCHEDULER_INTERVAL", "soon"),
        ("HERETIC_ALWAYS_EAGER", "maybe"),
        ("HERETIC_BROKER_TRANSPORT_OPTIONS", "not json"),
        ("HERETIC_BROKER_TRANSPORT_OPTIONS", "[1, 2]"),
        ("HERETIC_QUEUE_MAX_PRIORITY", "high"),
    ],
)
def test_invalid_env_values_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build(**{var: value})
    assert var in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("HERETIC_POOL", "gevent", "pool"),
        ("HERETIC_PREFETCH_MULTIPLIER", "0", "prefetch_multiplier"),
        ("HERETIC_SHORT_JOB_PREFETCH_MULTIPLIER", "0", "short_job_prefetch_multiplier"),
        ("HERETIC_CONCURRENCY", "-1", "concurrency"),
    ],
)
def test_unusable_values_are_refused(var: str, value: str, named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build(**{var: value})
    assert named in str(info.value)


def test_empty_default_queue_in_config_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="default_queue"):
        build({"task_default_queue": ""})


# -- JSON only -------------------------------------------------------------------


@pytest.mark.parametrize(
    "conf",
    [
        {"task_serializer": "pickle"},
        {"result_serializer": "yaml"},
        {"event_serializer": "msgpack"},
        {"accept_content": ["pickle"]},
        {"accept_content": ["json", "pickle"]},
        {"accept_content": ["application/x-python-serialize"]},
        {"accept_content": "pickle"},
    ],
)
def test_non_json_serializers_are_refused(conf: dict[str, Any]) -> None:
    key = next(iter(conf))
    with pytest.raises(ConfigurationError) as info:
        build(conf)
    assert key in str(info.value)
    assert "JSON" in str(info.value)


@pytest.mark.parametrize(
    "conf",
    [
        {"task_serializer": "json"},
        {"result_serializer": "json"},
        {"accept_content": ["json"]},
        {"accept_content": ["application/json", "json"]},
    ],
)
def test_json_serializer_settings_are_accepted(conf: dict[str, Any]) -> None:
    assert build(conf) == build()


def test_app_with_pickle_serializer_is_refused(make_app: Callable[..., Heretic]) -> None:
    app = make_app("unit")
    with pytest.raises(ConfigurationError, match="task_serializer"):
        app.conf.update(task_serializer="pickle")
    with pytest.raises(ConfigurationError, match="accept_content"):
        make_app("unit", accept_content=["json", "pickle"])


# -- the app's settings --------------------------------------------------------------


def test_app_environment_wins_over_constructor_arguments(
    make_app: Callable[..., Heretic], isolated_env: Path
) -> None:
    app = make_app("unit", broker="amqp://guest:guest@elsewhere//", task_default_queue="jobs")
    assert app.settings.broker_url == f"sqlite:///{isolated_env}/broker.sqlite3"
    assert app.settings.database_url == f"sqlite:///{isolated_env}/jobs.sqlite3"
    assert app.settings.default_queue == "jobs"


def test_app_settings_follow_conf_changes(make_app: Callable[..., Heretic]) -> None:
    app = make_app("unit")
    assert app.settings.default_queue == "celery"
    app.conf.task_default_queue = "changed"
    assert app.settings.default_queue == "changed"


def test_config_from_object_with_celery_namespace(make_app: Callable[..., Heretic]) -> None:
    class DjangoSettings:
        CELERY_TASK_DEFAULT_QUEUE = "django-jobs"
        CELERY_WORKER_PREFETCH_MULTIPLIER = 2
        TASK_DEFAULT_QUEUE = "not-namespaced"
        DEBUG = True

    app = make_app("unit")
    app.config_from_object(DjangoSettings, namespace="CELERY")
    assert app.settings.default_queue == "django-jobs"
    assert app.settings.prefetch_multiplier == 2


def test_config_from_object_reads_lower_case_names(make_app: Callable[..., Heretic]) -> None:
    class CeleryConfig:
        task_default_queue = "from-object"
        WORKER_PREFETCH_MULTIPLIER = 9  # upper case: not a Celery setting name

    app = make_app("unit")
    app.config_from_object(CeleryConfig)
    assert app.settings.default_queue == "from-object"
    assert app.settings.prefetch_multiplier == 4


# -- redaction ------------------------------------------------------------------------


def test_redact_url_hides_the_password() -> None:
    redacted = redact_url("amqp://guest:secret@host//")
    assert "secret" not in redacted
    assert redacted == "amqp://guest:***@host//"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://app:s3cr3t@db.internal:5432/jobs",
            "postgresql://app:***@db.internal:5432/jobs",
        ),
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("amqp://user:p%40ss@host:5672/vhost", "amqp://user:***@host:5672/vhost"),
        ("amqp://user:p@ss@host/", "amqp://user:***@host/"),
    ],
)
def test_redact_url_keeps_everything_but_the_password(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["sqlite:///.heretic/jobs.sqlite3", "amqp://guest@host//", "amqp://host:5672//", "memory://"],
)
def test_redact_url_leaves_urls_without_password_alone(url: str) -> None:
    assert redact_url(url) == url


def test_redact_url_of_garbage_does_not_echo_it() -> None:
    assert "secret" not in redact_url("amqp://guest:secret@[::1")


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://app@db.internal/jobs", "postgresql://app@db.internal/jobs"),
        ("db+postgresql://app@db.internal/jobs", "postgresql://app@db.internal/jobs"),
        ("db+sqlite:///results.sqlite3", "sqlite:///results.sqlite3"),
        ("postgresql+psycopg2://app@db/jobs", "postgresql+psycopg2://app@db/jobs"),
    ],
)
def test_database_urls_of_other_spellings_are_taken(given: str, used: str) -> None:
    assert Settings.build({}, env={"HERETIC_DATABASE_URL": given}).database_url == used


@pytest.mark.parametrize("url", ["mysql://u:pw@host/db", "nonsense", "redis://127.0.0.1/0"])
def test_a_database_heretic_cannot_keep_its_table_in_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(ConfigurationError, match="PostgreSQL .* or SQLite") as info:
        Settings.build({"database_url": url}, env={})
    assert "pw" not in str(info.value)
