"""The Celery parity suite: one Celery-style project run on real Celery and on heretic_kombu.

``proj.py`` is the project (its only implementation-specific lines are the imports, chosen
by ``COMPAT_IMPL``), ``scenarios.py`` the scenarios, ``run.py`` the runner behind
``nox -s compat``. See ``compat/parity/README.md``.
"""
