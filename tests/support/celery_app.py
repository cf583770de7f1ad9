"""The Celery app of tests/test_host_celery.py: ``celery -A tests.support.celery_app worker``.

Each process of the worker writes what happens to it on stdout as ``EV <event> <pid>`` lines,
with one ``os.write`` each (whole lines from several processes; Celery redirects
``sys.stdout`` into its log). The tasks wait on events, never on time: ``hold`` waits for its
process's wrap-up (a wrap-up listener sets the event) and then for the test's release (a Redis
list), ``stuck`` for ever (until graceful's deadline).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import celery.worker.request
import redis
from celery import Celery

import graceful
import graceful.celery

BOUND = 20.0

app = Celery("celery_app", broker=os.environ["CELERY_BROKER_URL"])
app.conf.worker_prefetch_multiplier = 1
graceful.celery.install(app)
store = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"], decode_responses=True)


def say(event: str) -> None:
    os.write(1, f"EV {event} {os.getpid()}\n".encode())


# Registered at import, before the pool forks: they run in every process of the worker.
graceful.add_wrap_up_listener(lambda: say("wrap-up"), name="say wrap-up")
graceful.add_shutdown_listener(lambda: say("shutdown"), name="say shutdown")
stopping = threading.Event()
graceful.add_wrap_up_listener(stopping.set, name="tasks: stopping")
never = threading.Event()


@app.task(name="tests.hold", acks_late=True)
def hold(key: str) -> None:
    say("task-start")
    if not stopping.wait(BOUND):  # graceful.wait_for_wrap_up(BOUND), once the core has it
        say("task-never-told")
        return
    say(f"task-saw-stopping-{graceful.is_stopping()}")
    store.blpop([f"{key}:release"], timeout=BOUND)
    store.rpush(f"{key}:done", os.getpid())
    say("task-end")


@app.task(name="tests.stuck", acks_late=True)
def stuck() -> None:
    say("stuck-start")
    never.wait(60)


# "EV accepted-<task id>" once the main process has seen its pool take the task (Celery has no
# signal for it). A SIGTERM just before that can hang Celery's own warm shutdown (its pool join
# waits for a process it never tells to exit; seen with plain Celery 5.7 too), so the tests
# send theirs after this line. graceful's deadline would end that hang, but that is not what
# these tests are about.
_task_accepted = celery.worker.request.task_accepted


def _say_accepted(request: Any, *args: Any, **kwargs: Any) -> None:
    _task_accepted(request, *args, **kwargs)
    say(f"accepted-{request.id}")


celery.worker.request.task_accepted = _say_accepted
