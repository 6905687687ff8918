"""Billing tasks, written against Celery's documented API."""

from __future__ import annotations

from heretic_kombu import shared_task  # celery: from celery import shared_task
from heretic_kombu.exceptions import MaxRetriesExceededError  # celery: from celery.exceptions


class CardDeclined(Exception):
    pass


@shared_task(bind=True, max_retries=2, default_retry_delay=0.1)
def charge(self, customer, cents, fail_times=0):
    if self.request.retries < fail_times:
        raise self.retry(exc=ConnectionError("gateway timeout"))
    if cents <= 0:
        raise CardDeclined(f"refusing to charge {cents} cents to {customer}")
    return {"customer": customer, "cents": cents, "attempt": self.request.retries + 1}


@shared_task(bind=True)
def invoice(self, customer, lines):
    return {
        "customer": customer,
        "total": sum(line["cents"] for line in lines),
        "invoice_id": self.request.id,
    }


@shared_task(bind=True, max_retries=1, default_retry_delay=0.1)
def settle(self):
    try:
        raise self.retry()
    except MaxRetriesExceededError:
        return "gave up politely"
