"""The chaos run's Dramatiq app: ``dramatiq _chaos_dramatiq --processes 1 --threads 2``.

    python -m dramatiq _chaos_dramatiq --processes 1 --threads 2
    python -c "import _chaos_dramatiq; _chaos_dramatiq.enqueue('jobs.json')"

Plain is Dramatiq at its defaults with its Redis broker (the CLI forks the worker process and
forwards SIGTERM to it; the worker lets the messages in hand finish, requeues what it had
prefetched). Under graceful the app calls ``graceful.dramatiq.install(broker)``
(docs/hosts/dramatiq.md) and an iterating job sends the rest of itself again from its cursor
once ``is_stopping()``.
The worker says it is ready from a middleware's ``after_worker_boot``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import _chaos_job
import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware


class _Ready(Middleware):
    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        _chaos_job.ready()


broker = RedisBroker(url=_chaos_job.URL)
broker.add_middleware(_Ready())
dramatiq.set_broker(broker)


def _install() -> None:
    import graceful.dramatiq  # type: ignore[import-not-found,unused-ignore]

    graceful.dramatiq.install(broker)


if _chaos_job.GRACEFUL:
    _install()


@dramatiq.actor(actor_name="chaos_job", queue_name="chaos")
def job(spec: _chaos_job.Job) -> None:
    if not _chaos_job.GRACEFUL:
        _chaos_job.run(spec)
        return
    import graceful

    _chaos_job.run(spec, graceful.is_stopping, job.send)


def enqueue(path: str) -> None:
    for spec in json.loads(Path(path).read_text(encoding="utf-8")):
        job.send(spec)
