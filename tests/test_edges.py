"""Edge cases of the core that the main suites do not reach on their way."""

from __future__ import annotations

import _thread
import asyncio
import signal
import sys
import threading
from collections.abc import Iterator

import pytest

import graceful
from graceful import Lifecycle, ListenerStatus, State, Status
from graceful._signals import _name

from .child import Child
from .conftest import BOUND, Recorder


@pytest.fixture
def fresh() -> Iterator[tuple[Lifecycle, Recorder]]:
    exits = Recorder()
    lifecycle = Lifecycle(force_quit=BOUND, exit=exits)
    previous = graceful.use(lifecycle)
    yield lifecycle, exits
    graceful.use(previous)
    if lifecycle.state() is not State.RUNNING:
        lifecycle.shutdown(wait=False)
        assert lifecycle.wait_for_shutdown(BOUND)


def test_status_records_are_frozen_comparable_and_readable() -> None:
    one = ListenerStatus("flush", "shutdown", "done", 0.5)
    same = ListenerStatus("flush", "shutdown", "done", 0.5)
    assert one == same
    assert hash(one) == hash(same)
    assert one != ListenerStatus("flush", "shutdown", "failed", 0.5)
    assert one != ("flush", "shutdown", "done", 0.5)
    assert repr(one) == (
        "ListenerStatus(name='flush', phase='shutdown', state='done', duration=0.5, timeout=None, abandoned_for=None)"
    )
    with pytest.raises(AttributeError, match="snapshot"):
        one.state = "running"  # type: ignore[misc]
    status = Status(State.STOPPED, "SIGTERM", 1.0, 25.0, (one,))
    assert status.forced is False
    assert "shutdown listener 'flush': done (0.500 s)" in status.format()
    assert "not triggered" in Status(State.RUNNING, None, None, 25.0, ()).format()


def test_unknown_signal_numbers_get_a_readable_name() -> None:
    assert _name(signal.SIGTERM) == "SIGTERM"
    assert _name(250) == "signal 250"


@pytest.mark.timeout(30)
def test_keyboard_interrupt_in_main_without_our_handlers_shuts_down_then_forces(
    fresh: tuple[Lifecycle, Recorder],
) -> None:
    """handle_signals=False: Python's own KeyboardInterrupt in the main thread is honoured."""
    lifecycle, exits = fresh
    release = threading.Event()
    wrapping = threading.Event()
    lifecycle.add_wrap_up_listener(lambda: (wrapping.set(), release.wait(BOUND)), name="slow")

    main = threading.main_thread().ident
    assert main is not None

    sent_at: list[str] = []  # the main thread's stack as each Ctrl-C was sent: said on failure

    def stack() -> str:
        frame, names = sys._current_frames().get(main), []
        while frame is not None:
            names.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        return " < ".join(names)

    def main_thread_is_blocked_in_run() -> bool:
        """Waiting in run()'s final wait: not starting up, not handling the last Ctrl-C."""
        frame = sys._current_frames().get(main)
        if frame is None or frame.f_code.co_name != "wait":
            return False
        while frame is not None and frame.f_code.co_name in {"wait", "wait_for_shutdown"}:
            frame = frame.f_back
        return frame is not None and frame.f_code.co_name == "_block"

    def ctrl_c() -> None:
        """A real Ctrl-C at the main thread, once it waits in run(), as an operator's finds it.

        Python's KeyboardInterrupt lands wherever the main thread is: sent the moment serve()
        runs, it could land in the instant between run()'s start-up and its wait, and
        propagate out of run() instead of starting the shutdown.
        """
        pause = threading.Event()
        for _ in range(int(BOUND / 0.005)):
            if main_thread_is_blocked_in_run():
                break
            pause.wait(0.005)  # polling a stack: there is no event to wait on
        else:
            raise AssertionError("the main thread never waited in run()")
        sent_at.append(stack())
        signal.pthread_kill(main, signal.SIGINT)

    def interrupter() -> None:
        ctrl_c()  # the first shuts down gracefully
        assert wrapping.wait(BOUND)
        ctrl_c()  # the second one forces
        assert exits.called.wait(BOUND), sent_at
        release.set()

    def serve() -> None:
        threading.Thread(target=interrupter).start()
        assert release.wait(BOUND)

    code = graceful.run(serve, handle_signals=False)
    assert exits.codes == [70]
    assert code == 70
    assert "KeyboardInterrupt again" in (lifecycle.force_quit_report or ""), sent_at


@pytest.mark.timeout(30)
def test_a_ctrl_c_pending_while_the_main_thread_is_blocked_is_not_lost(
    fresh: tuple[Lifecycle, Recorder],
) -> None:
    """handle_signals=False: a Ctrl-C whose Python handler is pending while the main thread is
    blocked in run()'s wait still shuts down (within a slice of the wait).

    CPython runs a signal's Python handler only between bytecodes: a SIGINT landing after the
    last check and before the lock wait blocks stays pending until the lock is acquired.
    ``_thread.interrupt_main()`` makes exactly that state (the handler pending, no signal to
    interrupt the wait); with one endless wait, run() never saw it.
    """
    lifecycle, _ = fresh
    wrapping = threading.Event()
    release = threading.Event()
    lifecycle.add_wrap_up_listener(lambda: (wrapping.set(), release.set()), name="note")
    main = threading.main_thread().ident

    def main_waits_in_run() -> bool:
        frame = sys._current_frames().get(main or -1)
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        return bool(names) and names[0] == "wait" and "_block" in names

    def interrupter() -> None:
        pause = threading.Event()
        for _ in range(int(BOUND / 0.005)):
            if main_waits_in_run():
                break
            pause.wait(0.005)  # polling a stack: there is no event to wait on
        _thread.interrupt_main()  # the handler is pending; nothing interrupts the wait

    def serve() -> None:
        threading.Thread(target=interrupter).start()
        assert release.wait(BOUND)

    assert graceful.run(serve, handle_signals=False) == 0
    assert wrapping.is_set()
    assert lifecycle.status().reason == "KeyboardInterrupt"


@pytest.mark.timeout(30)
def test_an_async_server_crash_gives_exit_code_1(fresh: tuple[Lifecycle, Recorder]) -> None:
    async def crash() -> None:
        raise RuntimeError("async boom")

    assert graceful.run(crash()) == 1


@pytest.mark.timeout(30)
def test_an_async_service_that_raises_keyboard_interrupt_is_graceful(
    fresh: tuple[Lifecycle, Recorder],
) -> None:
    class Interrupted:
        name = "interrupted"

        async def serve(self, ctx: graceful.Context) -> None:
            ctx.started()
            raise KeyboardInterrupt

        async def wrap_up(self, ctx: graceful.Context) -> None:
            return None

        async def close(self, ctx: graceful.Context) -> None:
            return None

    lifecycle, _ = fresh
    assert graceful.run(Interrupted()) == 0
    assert lifecycle.status().reason == "KeyboardInterrupt"


@pytest.mark.timeout(30)
def test_usr1_dump_lists_the_asyncio_tasks_of_the_loop_run_drives() -> None:
    code = """
import asyncio, graceful, sys
async def pump_messages():
    print("serving", flush=True)
    await asyncio.sleep(60)
sys.exit(graceful.run(pump_messages()))
"""
    child = Child(code)
    try:
        child.expect("serving")
        child.send(signal.SIGUSR1)
        child.expect_err("end of thread dump")
        assert "asyncio tasks of" in child.err
        assert "in pump_messages" in child.err
        child.send(signal.SIGTERM)
        assert child.wait() == 0
    finally:
        child.kill()


def test_a_coroutine_service_wrap_up_before_it_started_is_harmless(fresh: tuple[Lifecycle, Recorder]) -> None:
    from graceful.adapters import CoroutineService

    async def never() -> None:
        return None

    coro = never()
    service = CoroutineService(coro, name="never")
    lifecycle, _ = fresh
    ctx = graceful.Context(lifecycle, "never")
    asyncio.run(service.wrap_up(ctx))
    asyncio.run(service.close(ctx))
    coro.close()
