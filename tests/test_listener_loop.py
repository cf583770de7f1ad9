"""Issue #15: an ``async def`` listener registered at module level runs on the loop run() drives."""

from __future__ import annotations

import asyncio
import threading

import pytest

import graceful
from graceful.lowlevel import listener_loop

from .conftest import BOUND


class Pool:
    """Like an asyncpg pool: made on a loop, and closing it awaits a future of that loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()

    async def close(self) -> str:
        asyncio.get_running_loop().call_soon(self.closed.set_result, "closed")
        return await self.closed  # on another loop: "attached to a different loop"


@pytest.mark.timeout(30)
def test_async_listener_registered_with_no_loop_runs_on_runs_loop(fresh: graceful.Lifecycle) -> None:
    """A module-level async shutdown listener closes a pool bound to run()'s loop: exit 0."""
    holder: dict[str, Pool] = {}
    results: list[str] = []

    async def close_pool() -> None:
        results.append(await holder["pool"].close())

    graceful.add_shutdown_listener(close_pool, name="close pool")  # no running loop here

    async def app() -> None:
        holder["pool"] = Pool()
        graceful.shutdown("test", wait=False)
        await graceful.wait_for_wrap_up_async()

    assert graceful.run(app(), handle_signals=False) == 0
    assert results == ["closed"]
    assert listener_loop(fresh) is None  # run() gave it back


@pytest.mark.timeout(30)
def test_the_same_pool_on_a_fresh_loop_fails(fresh: graceful.Lifecycle) -> None:
    """The control: with no default loop the listener runs on a fresh loop and the pool refuses."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def make() -> Pool:
        return Pool()

    try:
        pool = asyncio.run_coroutine_threadsafe(make(), loop).result(BOUND)
        waiter = graceful.add_shutdown_listener(pool.close, name="close pool")
        assert graceful.shutdown("test", timeout=BOUND)
        assert isinstance(waiter.exception(), RuntimeError)
        assert fresh.exit_code == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(BOUND)
        loop.close()


@pytest.mark.timeout(30)
def test_a_listener_registered_on_another_loop_keeps_that_loop(fresh: graceful.Lifecycle) -> None:
    """Registered from a running loop (not run()'s), an async listener still runs on that loop."""
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    seen: list[object] = []

    async def where() -> None:
        seen.append(asyncio.get_running_loop())

    async def register() -> None:
        graceful.add_shutdown_listener(where, name="where")

    try:
        asyncio.run_coroutine_threadsafe(register(), other).result(BOUND)

        async def app() -> None:
            graceful.shutdown("test", wait=False)
            await graceful.wait_for_wrap_up_async()

        assert graceful.run(app(), handle_signals=False) == 0
        assert seen == [other]
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(BOUND)
        other.close()
