"""The arq app of tests/test_host_arq.py: ``arq tests.support.arq_app.WorkerSettings``.

The worker writes what happens to it on stdout as ``EV <event> <pid>`` lines (one ``os.write``
each). The jobs wait on events, never on time: ``hold`` waits for the wrap-up and then for the
test's release (a Redis list); ``stuck`` sleeps past graceful's deadline on its first run and
returns at once on the next; ``note`` records that it ran. ``APP_FAIL_SHUTDOWN`` adds a
shutdown listener that raises. ``walk`` is the job-iteration example: it does its items
(``ITEM_SECONDS`` each) from a cursor and, stopped, enqueues the rest of itself.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from arq.connections import RedisSettings

import graceful
import graceful.arq
import graceful.iteration

BOUND = 20.0


def say(event: str) -> None:
    os.write(1, f"EV {event} {os.getpid()}\n".encode())


graceful.add_wrap_up_listener(lambda: say("wrap-up"), name="say wrap-up")
graceful.add_shutdown_listener(lambda: say("shutdown"), name="say shutdown")


def fail() -> None:
    raise RuntimeError("this shutdown listener fails")


if os.environ.get("APP_FAIL_SHUTDOWN"):
    graceful.add_shutdown_listener(fail, name="fails")


async def hold(ctx: dict[str, Any], key: str) -> None:
    say(f"start-{key}")
    try:
        await asyncio.wait_for(graceful.wait_for_wrap_up_async(), BOUND)
    except asyncio.TimeoutError:
        say("never-told")
        return
    say(f"saw-stopping-{graceful.is_stopping()}")
    await ctx["redis"].blpop([f"{key}:release"], timeout=BOUND)
    await ctx["redis"].rpush(f"{key}:done", os.getpid())
    say(f"end-{key}")


async def stuck(ctx: dict[str, Any], key: str) -> None:
    if await ctx["redis"].incr(f"{key}:runs") == 1:
        say(f"stuck-{key}")
        await asyncio.sleep(60)  # past graceful's deadline
    await ctx["redis"].rpush(f"{key}:done", os.getpid())
    say(f"end-{key}")


async def note(ctx: dict[str, Any], key: str) -> None:
    await ctx["redis"].rpush(f"{key}:done", os.getpid())
    say(f"end-{key}")


async def walk(ctx: dict[str, Any], key: str, total: int, cursor: int = 0) -> None:
    steps = graceful.iteration.iterate(range(total), cursor=cursor)
    async for item in steps:
        await asyncio.sleep(float(os.environ.get("ITEM_SECONDS", "0")))  # the work of one item
        await ctx["redis"].rpush(f"{key}:items", item)
        say(f"item-{item}")
    if steps.stopped:
        await ctx["redis"].enqueue_job("walk", key, total, steps.cursor)  # the rest, from the cursor
        say(f"handed-on-at-{steps.cursor}")
    else:
        say(f"walked-{key}")


async def startup(ctx: dict[str, Any]) -> None:
    say("arq-on-startup")


async def shutdown(ctx: dict[str, Any]) -> None:
    say("arq-on-shutdown")


class WorkerSettings:
    functions = [hold, stuck, note, walk]  # noqa: RUF012 - arq reads class attributes
    redis_settings = RedisSettings.from_dsn(os.environ["ARQ_REDIS_URL"])
    on_startup = startup
    on_shutdown = shutdown
    max_jobs = 2
    poll_delay = 0.05


graceful.arq.install(WorkerSettings)
