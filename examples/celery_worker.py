"""A Celery worker whose long job stops between two items at a warm shutdown and re-enqueues the rest.

The job-iteration pattern: a job of many items runs as one task that checks, between two items,
whether the worker is stopping. When it is, the task enqueues itself again with the index of the
next item (its checkpoint) and returns; the next worker to start picks the rest up. Every item is
done exactly once, however many times the workers are stopped, and no SIGTERM has to wait for a
whole job to end (nor kill it half-way).

``graceful.celery.install(app)`` is what makes ``graceful.is_stopping()`` turn True inside the
task, in every pool (prefork children included), as soon as the worker's warm shutdown begins.

Run it (a Redis on localhost, or set CELERY_BROKER_URL)::

    cd examples && celery -A celery_worker worker --pool prefork --concurrency 2 --loglevel INFO
    python examples/celery_worker.py enqueue demo 200      # in another terminal
    kill -TERM <the worker's main pid>                      # it stops after the item in hand
    cd examples && celery -A celery_worker worker --loglevel INFO   # finishes the job

``--loglevel INFO`` shows graceful's lines (wrapping up, each phase, stopped) among Celery's:
Celery configures logging itself, at WARNING unless told otherwise, and graceful keeps to it.
"""

from __future__ import annotations

import os
import sys
import time

import redis
from celery import Celery
from celery.utils.log import get_task_logger

import graceful
import graceful.celery
import graceful.iteration

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
ITEM_SECONDS = float(os.environ.get("ITEM_SECONDS", "0.05"))

app = Celery("celery_worker", broker=BROKER)
app.conf.worker_prefetch_multiplier = 1  # a stopping worker holds as few messages as it can
graceful.celery.install(app)

store = redis.Redis.from_url(BROKER)  # where the items' results go (the broker's Redis, for brevity)
log = get_task_logger(__name__)


def process_item(job: str, item: int) -> None:
    """One unit of work: short, and its result recorded once it is done."""
    time.sleep(ITEM_SECONDS)  # stands for the real work on one item
    store.rpush(f"job:{job}:done", item)


@app.task(name="process_job", acks_late=True)
def process_job(job: str, start: int, total: int) -> str:
    """Process items ``start`` to ``total - 1`` of ``job``; at a warm shutdown, hand the rest on."""
    # Between two items only: an item is never cut in half (graceful.iteration looks at
    # is_stopping() before it hands out the next one).
    walk = graceful.iteration.iterate(range(total), cursor=start)
    for item in walk:
        process_item(job, item)
        log.info("job %s: item %d done", job, item)
    if walk.stopped:
        process_job.apply_async((job, walk.cursor, total))  # the checkpoint travels with the task
        log.info("job %s: stopping before item %d of %d: the rest is re-enqueued", job, walk.cursor, total)
        return f"checkpointed at {walk.cursor}"
    log.info("job %s: finished", job)
    return "finished"


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "enqueue":
        sys.exit("usage: python celery_worker.py enqueue JOB ITEMS")
    result = process_job.delay(sys.argv[2], 0, int(sys.argv[3]))
    print(f"enqueued job {sys.argv[2]} as task {result.id}")
