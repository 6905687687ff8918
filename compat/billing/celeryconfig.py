"""Celery-style settings module: Celery's key names, read by app.config_from_object."""

from __future__ import annotations

task_serializer = "json"
accept_content = ["json"]
result_serializer = "json"
task_acks_late = True
worker_prefetch_multiplier = 1
task_default_queue = "billing"
task_routes = {"billing.tasks.invoice": {"queue": "invoices"}}
