"""The core under the Celery façade: what every façade module may use, and nothing above it.

- :mod:`.context`: the request of the task running in this thread (``task.request``).
- :mod:`.registry`: the apps of this process, the current app, ``@shared_task``'s registry.
- :mod:`.protocols`: what the layers under ``app.py`` may ask of an app and of a task.

No module here imports a façade module (app, task, canvas, result…), so the façade
needs ``app.py`` for nothing: ``app.py`` installs itself here when imported.
"""

from __future__ import annotations
