"""The chaos run's Celery app: ``celery -A _chaos_celery worker --pool prefork -c 2``.

    python -c "from celery.__main__ import main; main()" -A _chaos_celery worker ...
    python -c "import _chaos_celery; _chaos_celery.enqueue('jobs.json')"

``CHAOS_ACKS`` is ``late`` (``task_acks_late=True``: a message is acknowledged once its task
returns) or ``early`` (Celery's default: acknowledged as the task starts). Everything else is
Celery's default (prefetch multiplier 4, Redis ``visibility_timeout`` one hour), for plain Celery
and under graceful alike; under graceful, ``graceful.celery.install(app)`` (docs/hosts/celery.md)
and an iterating task sends the rest of itself again from its cursor once ``is_stopping()``.
The worker says it is ready at Celery's ``worker_ready``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import _chaos_job
from celery import Celery, signals

app = Celery("_chaos_celery", broker=_chaos_job.URL)
app.conf.task_acks_late = os.environ.get("CHAOS_ACKS", "late") == "late"
app.conf.broker_connection_retry_on_startup = True
if _chaos_job.GRACEFUL:
    import graceful
    import graceful.celery

    graceful.celery.install(app)


@app.task(name="chaos.job", bind=True)
def job(self: Any, spec: _chaos_job.Job) -> str:
    ref = str(self.request.id)
    if not _chaos_job.GRACEFUL:
        return _chaos_job.run(spec, ref=ref)
    return _chaos_job.run(spec, graceful.is_stopping, _send, ref)


def _send(spec: _chaos_job.Job) -> None:
    job.apply_async((spec,))


@signals.worker_ready.connect
def _ready(**_: object) -> None:
    _chaos_job.ready()


def enqueue(path: str) -> None:
    with app.producer_or_acquire() as producer:
        for spec in json.loads(Path(path).read_text(encoding="utf-8")):
            job.apply_async((spec,), producer=producer)
