"""The chaos run's generic worker: two consumers of a Redis list, under graceful or hand-written.

    python -m _chaos_worker
    python -c "import _chaos_worker; _chaos_worker.enqueue('jobs.json')"

The queue is the one graceful's docs show (docs/adapters/workers.md, examples/queue_worker.py):
``LPUSH`` to enqueue, ``BRPOP`` to fetch, ``RPUSH`` to put a job back at the head. Under
graceful: ``graceful.adapters.worker.Worker(fetch, handle, requeue, concurrency=2)``; an
iterating job raises ``Requeue`` with its cursor once ``is_stopping()``. Plain: the same fetch
and handle in two threads, and a hand-written SIGTERM handler that sets a flag the loops look
at between two jobs, the main thread joining them (what one writes without a library).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import _chaos_job

KEY = "chaos:jobs"
CONCURRENCY = 2
POLL = 0.5

_said_ready = threading.Lock()


def fetch(timeout: float) -> Any:
    if _said_ready.acquire(blocking=False):  # the first fetch: the consumers are running
        _chaos_job.ready()
    item = _chaos_job.client().brpop([KEY], timeout=timeout)
    return json.loads(item[1]) if item else None


def requeue(spec: _chaos_job.Job) -> None:
    _chaos_job.client().rpush(KEY, json.dumps(spec))  # the end BRPOP takes first: it runs next


def enqueue(path: str) -> None:
    specs = json.loads(Path(path).read_text(encoding="utf-8"))
    _chaos_job.client().lpush(KEY, *[json.dumps(spec) for spec in specs])


def run_graceful() -> int:
    import graceful
    from graceful.adapters.worker import Requeue, Worker

    def hand_on(spec: _chaos_job.Job) -> None:
        raise Requeue(spec)

    def handle(spec: _chaos_job.Job) -> None:
        _chaos_job.run(spec, graceful.is_stopping, hand_on)

    worker = Worker(
        fetch,
        handle,
        requeue,
        concurrency=CONCURRENCY,
        name="chaos",
        describe=lambda s: str(s["id"]),
        poll=POLL,
    )
    return graceful.run(worker)


def run_plain() -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())

    def consume() -> None:
        while not stop.is_set():
            spec = fetch(POLL)
            if spec is not None:
                _chaos_job.run(spec)

    consumers = [threading.Thread(target=consume) for _ in range(CONCURRENCY)]
    for consumer in consumers:
        consumer.start()
    for consumer in consumers:
        consumer.join()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(run_graceful() if _chaos_job.GRACEFUL else run_plain())
