"""The Celery app of benchmarks/celery_stops.py: graceful installed unless ``STOPS_PLAIN=1``.

``busy`` sleeps (an ``acks_late`` task in a pool process); it writes ``BUSY-START`` on stdout
when it begins, so the driver signals the worker only once a task is running.
"""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("_celery_stops_app", broker=os.environ["CELERY_BROKER_URL"])
app.conf.worker_prefetch_multiplier = 1
if os.environ.get("STOPS_PLAIN") != "1":
    import graceful.celery

    graceful.celery.install(app)


@app.task(name="stops.busy", acks_late=True)
def busy(seconds: float) -> None:
    os.write(1, b"BUSY-START\n")
    time.sleep(seconds)
