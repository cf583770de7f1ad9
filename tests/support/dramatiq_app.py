"""The Dramatiq app of tests/test_host_dramatiq.py: ``dramatiq tests.support.dramatiq_app``.

Each worker process writes what happens to it on stdout as ``EV <event> <pid>`` lines, one
``os.write`` each (Dramatiq redirects ``sys.stdout`` into its log pipe; fd 1 is the test's).
The actors wait on events, never on time: ``hold`` waits for its process's wrap-up and then for
the test's release (a Redis list), ``stuck`` for ever on its first run (until graceful's
deadline) and returns at once on the next, ``note`` records that it ran.
``DRAMATIQ_HEARTBEAT_MS`` sets the broker's heartbeat timeout (the heartbeat test makes it short);
``APP_FAIL_SHUTDOWN`` adds a shutdown listener that raises. ``walk`` is the job-iteration example:
it does its items (``ITEM_SECONDS`` each) from a cursor and, stopped, sends the rest of itself.
"""

from __future__ import annotations

import os
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

import graceful
import graceful.dramatiq
import graceful.iteration

BOUND = 20.0

URL = os.environ["DRAMATIQ_REDIS_URL"]
broker = RedisBroker(url=URL, heartbeat_timeout=int(os.environ.get("DRAMATIQ_HEARTBEAT_MS", "60000")))
graceful.dramatiq.install(broker)
dramatiq.set_broker(broker)
store = redis.Redis.from_url(URL, decode_responses=True)


def say(event: str) -> None:
    os.write(1, f"EV {event} {os.getpid()}\n".encode())


# Registered at import: every worker process imports this module, so each runs them.
graceful.add_wrap_up_listener(lambda: say("wrap-up"), name="say wrap-up")
graceful.add_shutdown_listener(lambda: say("shutdown"), name="say shutdown")


def fail() -> None:
    raise RuntimeError("this shutdown listener fails")


if os.environ.get("APP_FAIL_SHUTDOWN"):
    graceful.add_shutdown_listener(fail, name="fails")


@dramatiq.actor(max_retries=0)
def hold(key: str) -> None:
    say(f"start-{key}")
    if not graceful.wait_for_wrap_up(BOUND):
        say("never-told")
        return
    say(f"saw-stopping-{graceful.is_stopping()}")
    store.blpop([f"{key}:release"], timeout=BOUND)
    store.rpush(f"{key}:done", os.getpid())
    say(f"end-{key}")


@dramatiq.actor(max_retries=0)
def stuck(key: str) -> None:
    if store.incr(f"{key}:runs") == 1:
        say(f"stuck-{key}")
        graceful.wait_for_shutdown(60)  # past graceful's deadline
    store.rpush(f"{key}:done", os.getpid())
    say(f"end-{key}")


@dramatiq.actor(max_retries=0)
def note(key: str) -> None:
    store.rpush(f"{key}:done", os.getpid())
    say(f"end-{key}")


@dramatiq.actor(max_retries=0)
def walk(key: str, total: int, cursor: int = 0) -> None:
    steps = graceful.iteration.iterate(range(total), cursor=cursor)
    for item in steps:
        time.sleep(float(os.environ.get("ITEM_SECONDS", "0")))  # the work of one item
        store.rpush(f"{key}:items", item)
        say(f"item-{item}")
    if steps.stopped:
        walk.send(key, total, steps.cursor)  # the rest, from where this run got to
        say(f"handed-on-at-{steps.cursor}")
    else:
        say(f"walked-{key}")
