"""The Celery app of tests/test_host_celery.py: ``celery -A tests.support.celery_app worker``.

Each process of the worker writes what happens to it on stdout as ``EV <event> <pid>`` lines,
with one ``os.write`` each (whole lines from several processes; Celery redirects
``sys.stdout`` into its log). The tasks wait on events, never on time: ``hold`` waits for its
process's wrap-up (a wrap-up listener sets the event) and then for the test's release (a Redis
list), ``stuck`` for ever (until graceful's deadline); see each task for the others. Each pool
process says ``EV pool-process <pid>`` as it starts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import celery.worker.request
import redis
from celery import Celery, signals

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


@app.task(name="tests.stuck_early")  # Celery's default: acknowledged as it starts
def stuck_early(*args: object, **kwargs: object) -> None:
    say("stuck-early-start")
    never.wait(60)


@app.task(name="tests.stuck_early_kept", graceful_resend_early_acked=False)
def stuck_early_kept(*args: object, **kwargs: object) -> None:
    say("stuck-early-kept-start")
    never.wait(60)


@app.task(name="tests.linger", acks_late=True)
def linger(key: str) -> None:
    """Done at once; then its process lingers in ``task_postrun`` (below), before it sends the
    result: the main process still believes it runs, as it does of any task whose result it
    has not read yet."""
    store.rpush(f"{key}:done", os.getpid())


@signals.task_postrun.connect
def _linger_after_the_end(task: Any = None, **_: object) -> None:
    if getattr(task, "name", "") == "tests.linger":
        say("linger-finished")
        never.wait(60)


@app.task(name="tests.watch_own_message", bind=True, acks_late=True)
def watch_own_message(self: Any, key: str) -> None:
    """Runs until its own message is back on the queue, then applies its side effect: what a
    task put back while it still runs would do (it must be stopped first)."""
    say("watch-start")
    until = time.monotonic() + 60
    while time.monotonic() < until:
        if any(json.loads(raw)["headers"]["id"] == self.request.id for raw in store.lrange("celery", 0, -1)):
            store.rpush(f"{key}:done-after-put-back", os.getpid())
            return
        time.sleep(0.001)


@signals.worker_process_init.connect
def _pool_process(**_: object) -> None:
    say("pool-process")


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
