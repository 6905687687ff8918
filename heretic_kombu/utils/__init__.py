"""Where Celery keeps ``celery.utils``: the pieces of it that Celery code imports."""
