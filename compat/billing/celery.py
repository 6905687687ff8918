"""The project's app module, as in Celery's "First steps with Django/Flask" layout."""

from __future__ import annotations

from heretic_kombu import Celery  # celery: from celery import Celery

app = Celery("billing", include=["billing.tasks"])
app.config_from_object("billing.celeryconfig")
