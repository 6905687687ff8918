"""app.autodiscover_tasks imports <package>.tasks, lazily or at once, as Celery does."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture
def packages(tmp_path, monkeypatch):
    for name, body in {
        "shop_orders": "from heretic_kombu import shared_task\n\n"
        "@shared_task\ndef place():\n    return 'placed'\n",
        "shop_mail": "from heretic_kombu import shared_task\n\n"
        "@shared_task\ndef send():\n    return 'sent'\n",
        "shop_broken": "import module_that_does_not_exist  # noqa\n",
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "tasks.py").write_text(body)
    (tmp_path / "shop_plain").mkdir()
    (tmp_path / "shop_plain" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in list(sys.modules):
        if name.startswith("shop_"):
            del sys.modules[name]


def test_lazy_discovery_at_worker_start(make_app, packages):
    app = make_app()
    app.autodiscover_tasks(lambda: ["shop_orders", "shop_mail", "shop_plain"])
    assert "shop_orders.tasks.place" not in app.tasks  # nothing imported yet
    app.import_modules()
    assert {"shop_orders.tasks.place", "shop_mail.tasks.send"} <= set(app.tasks)


def test_forced_discovery_and_a_tasks_module_that_fails(make_app, packages):
    app = make_app()
    app.autodiscover_tasks(["shop_mail"], force=True)
    assert "shop_mail.tasks.send" in app.tasks
    with pytest.raises(ModuleNotFoundError, match="module_that_does_not_exist"):
        app.autodiscover_tasks(["shop_broken"], force=True)
