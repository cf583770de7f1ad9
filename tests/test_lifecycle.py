"""The Lifecycle engine: phases, triggers, listener rules, status and logging."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time

import pytest

import graceful
from graceful import Lifecycle, ListenerStatus, State, Status
from graceful._deadline import FakeClock
from graceful.lowlevel import record_failure

from .conftest import BOUND, Recorder


def test_shutdown_listeners_start_only_after_every_wrap_up_listener_finished(lc: Lifecycle) -> None:
    """No shutdown listener starts while a wrap-up listener is still running."""
    release = threading.Event()
    order: list[str] = []
    lc.add_wrap_up_listener(lambda: (release.wait(BOUND), order.append("wrap-up slow")))
    lc.add_wrap_up_listener(lambda: order.append("wrap-up fast"))
    closed = lc.add_shutdown_listener(lambda: order.append("shutdown"))
    lc.shutdown(wait=False)
    assert not closed.wait(0.05)
    assert lc.state() is State.WRAPPING_UP
    release.set()
    assert closed.wait(BOUND)
    assert order == ["wrap-up fast", "wrap-up slow", "shutdown"]
    assert lc.wait_for_shutdown(BOUND)
    assert lc.state() is State.STOPPED


def test_listeners_of_a_phase_run_concurrently(lc: Lifecycle) -> None:
    """Fifty listeners that each wait for all the others can only finish if run together."""
    barrier = threading.Barrier(50, timeout=BOUND)
    waiters = [lc.add_wrap_up_listener(barrier.wait) for _ in range(50)]
    assert lc.shutdown(timeout=BOUND)
    assert all(w.done() and w.exception() is None for w in waiters)


def test_a_thousand_no_op_listeners_all_run_once(lc: Lifecycle) -> None:
    calls = [0] * 1000

    def make(i: int) -> graceful.Waiter:
        def bump() -> None:
            calls[i] += 1

        return lc.add_shutdown_listener(bump)

    waiters = [make(i) for i in range(1000)]
    for _ in range(3):
        lc.shutdown(timeout=BOUND)
    assert calls == [1] * 1000
    assert all(w.done() for w in waiters)


def test_every_listener_runs_at_most_once_whatever_the_triggers(lc: Lifecycle) -> None:
    count = {"w": 0, "s": 0}
    lc.add_wrap_up_listener(lambda: count.__setitem__("w", count["w"] + 1))
    lc.add_shutdown_listener(lambda: count.__setitem__("s", count["s"] + 1))
    lc.wrap_up("one")
    lc.wrap_up("two")
    lc.shutdown("three", timeout=BOUND)
    lc.shutdown("four", timeout=BOUND)
    lc.wrap_up("five")
    assert count == {"w": 1, "s": 1}


def test_many_threads_racing_shutdown_all_return_only_after_stopped(lc: Lifecycle) -> None:
    """asynq #979: a second Shutdown() returned early. Here every caller waits for STOPPED."""
    release = threading.Event()
    ran = []
    lc.add_shutdown_listener(lambda: (release.wait(BOUND), ran.append(1)))
    seen: list[tuple[bool, State]] = []
    start = threading.Barrier(33, timeout=BOUND)

    def caller() -> None:
        start.wait()
        ok = lc.shutdown("race", timeout=BOUND)
        seen.append((ok, lc.state()))

    threads = [threading.Thread(target=caller) for _ in range(32)]
    for t in threads:
        t.start()
    start.wait()
    assert not lc.wait_for_shutdown(0.05)
    release.set()
    for t in threads:
        t.join(BOUND)
    assert seen == [(True, State.STOPPED)] * 32
    assert ran == [1]


def test_shutdown_from_inside_a_listener_does_not_deadlock(lc: Lifecycle) -> None:
    results: list[bool] = []
    lc.add_wrap_up_listener(lambda: results.append(lc.shutdown("from a listener")))
    lc.wrap_up()
    assert lc.wait_for_shutdown(BOUND)
    assert results == [False]
    assert lc.status().reason == "from a listener"


def test_listener_may_register_and_read_status_without_deadlock(lc: Lifecycle) -> None:
    inner: list[graceful.Waiter] = []

    def listener() -> None:
        inner.append(lc.add_wrap_up_listener(lambda: None, name="inner"))
        lc.status()

    lc.add_wrap_up_listener(listener)
    assert lc.shutdown(timeout=BOUND)
    assert inner[0].done()


def test_a_listener_registered_late_runs_at_once(lc: Lifecycle) -> None:
    """go-zero runs no listener added after its phase fired; its waiter hangs. Not here."""
    release = threading.Event()
    lc.add_shutdown_listener(lambda: release.wait(BOUND))
    lc.shutdown(wait=False)
    late_wrap = lc.add_wrap_up_listener(lambda: None, name="late wrap-up")
    assert late_wrap.wait(BOUND)
    release.set()
    assert lc.wait_for_shutdown(BOUND)
    after = lc.add_shutdown_listener(lambda: None, name="after stop")
    assert after.wait(BOUND)
    assert after.exception() is None


def test_stopped_waits_for_late_wrap_up_listeners_too(lc: Lifecycle) -> None:
    hold, release = threading.Event(), threading.Event()

    def shutdown_listener() -> None:
        lc.add_wrap_up_listener(lambda: release.wait(BOUND), name="late and slow")
        hold.set()

    lc.add_shutdown_listener(shutdown_listener)
    lc.shutdown(wait=False)
    assert hold.wait(BOUND)
    assert not lc.wait_for_shutdown(0.05)
    release.set()
    assert lc.wait_for_shutdown(BOUND)


def test_a_failing_listener_is_isolated_logged_by_name_and_kept(
    lc: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    ran = []

    def boom() -> None:
        raise RuntimeError("pool already closed")

    bad = lc.add_wrap_up_listener(boom, name="close-pool")
    good = lc.add_shutdown_listener(lambda: ran.append(1))
    with caplog.at_level(logging.DEBUG, logger="graceful"):
        assert lc.shutdown(timeout=BOUND)
    assert isinstance(bad.exception(), RuntimeError)
    assert good.exception() is None
    assert ran == [1]
    assert lc.exit_code == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "close-pool" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert lc.status().listeners[0].state == "failed"


def test_base_exceptions_in_listeners_are_isolated_too(lc: Lifecycle) -> None:
    def exits() -> None:
        raise SystemExit(3)

    waiter = lc.add_shutdown_listener(exits)
    assert lc.shutdown(timeout=BOUND)
    assert isinstance(waiter.exception(), SystemExit)
    assert lc.exit_code == 1


def test_async_listener_without_any_event_loop(lc: Lifecycle) -> None:
    seen = []

    async def close() -> None:
        await asyncio.sleep(0)
        seen.append(asyncio.get_running_loop())

    waiter = lc.add_shutdown_listener(close)
    assert lc.shutdown(timeout=BOUND)
    assert waiter.exception() is None
    assert len(seen) == 1


def test_async_listener_runs_on_the_loop_it_was_registered_from() -> None:
    """A listener registered inside a running loop may touch that loop's objects."""
    lifecycle = Lifecycle(force_quit=25)
    seen: list[asyncio.AbstractEventLoop] = []
    ready = threading.Event()
    holder: dict[str, asyncio.AbstractEventLoop] = {}

    async def app() -> None:
        holder["loop"] = asyncio.get_running_loop()

        async def close() -> None:
            seen.append(asyncio.get_running_loop())

        lifecycle.add_shutdown_listener(close)
        ready.set()
        assert await lifecycle.wait_for_shutdown_async()

    thread = threading.Thread(target=asyncio.run, args=(app(),))
    thread.start()
    assert ready.wait(BOUND)
    assert lifecycle.shutdown(timeout=BOUND)
    thread.join(BOUND)
    assert seen == [holder["loop"]]


def test_failing_async_listener_keeps_its_exception(lc: Lifecycle) -> None:
    async def boom() -> None:
        raise ValueError("flush failed")

    waiter = lc.add_shutdown_listener(boom)
    assert lc.shutdown(timeout=BOUND)
    assert isinstance(waiter.exception(), ValueError)


def test_shutdown_from_a_running_event_loop_does_not_block(lc: Lifecycle) -> None:
    release = threading.Event()
    lc.add_shutdown_listener(lambda: release.wait(BOUND))

    async def main() -> bool:
        returned = lc.shutdown("from the loop")  # would block the loop for BOUND if it waited
        release.set()
        assert await lc.wait_for_shutdown_async()
        return returned

    assert asyncio.run(main()) is False
    assert lc.state() is State.STOPPED


def test_waiter_api(lc: Lifecycle) -> None:
    release = threading.Event()
    waiter = lc.add_wrap_up_listener(lambda: release.wait(BOUND), name="slow")
    assert waiter.name == "slow"
    assert not waiter.done()
    assert waiter.exception() is None
    assert waiter(0.01) is False
    assert "slow" in repr(waiter)
    lc.wrap_up()
    release.set()
    assert waiter(BOUND)
    assert waiter.done()

    async def await_it() -> bool:
        return await waiter

    assert asyncio.run(await_it()) is True


def test_awaiting_a_waiter_that_finishes_later(lc: Lifecycle) -> None:
    release = threading.Event()
    waiter = lc.add_shutdown_listener(lambda: release.wait(BOUND))

    async def main() -> bool:
        lc.shutdown(wait=False)
        asyncio.get_running_loop().call_later(0.01, release.set)
        return await waiter

    assert asyncio.run(main()) is True


def test_remove_before_the_phase_unregisters(lc: Lifecycle) -> None:
    ran = []
    waiter = lc.add_shutdown_listener(lambda: ran.append(1))
    assert waiter.remove() is True
    assert waiter.remove() is False
    assert waiter.done()
    assert lc.shutdown(timeout=BOUND)
    assert ran == []
    assert lc.status().listeners == ()  # a removed listener is gone


def test_remove_after_the_listener_started_is_refused(lc: Lifecycle) -> None:
    started, release = threading.Event(), threading.Event()
    waiter = lc.add_wrap_up_listener(lambda: (started.set(), release.wait(BOUND)))
    lc.wrap_up()
    assert started.wait(BOUND)
    assert waiter.remove() is False
    release.set()
    assert waiter.wait(BOUND)


def test_non_callable_listener_is_a_type_error_that_says_what_is_accepted(lc: Lifecycle) -> None:
    with pytest.raises(TypeError, match="takes a callable with no arguments"):
        lc.add_wrap_up_listener("close")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="add_shutdown_listener"):
        lc.add_shutdown_listener(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="add_reload_listener"):
        lc.add_reload_listener(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), float("-inf")])
def test_bad_force_quit_budget_is_a_value_error(lc: Lifecycle, bad: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds greater than 0"):
        lc.set_time_to_force_quit(bad)
    with pytest.raises(ValueError, match="Lifecycle"):
        Lifecycle(force_quit=bad)


@pytest.mark.parametrize("bad", ["25", None, True])
def test_non_number_force_quit_budget_is_a_type_error(lc: Lifecycle, bad: object) -> None:
    with pytest.raises(TypeError, match="number of seconds"):
        lc.set_time_to_force_quit(bad)  # type: ignore[arg-type]


def test_is_stopping_state_and_status_follow_the_sequence(lc: Lifecycle, clock: FakeClock) -> None:
    assert lc.is_stopping() is False
    assert lc.state() is State.RUNNING
    assert lc.status().seconds_since_trigger is None
    assert lc.time_remaining() is None
    started, release = threading.Event(), threading.Event()
    lc.add_wrap_up_listener(lambda: (started.set(), release.wait(BOUND)), name="drain")
    lc.add_shutdown_listener(lambda: None, name="close")
    lc.wrap_up("SIGTSTP")
    assert lc.is_stopping() is True
    assert started.wait(BOUND)
    assert lc.time_remaining() is None  # a pause starts no deadline
    clock.advance(2)
    snap = lc.status()
    assert snap.state is State.WRAPPING_UP
    assert snap.reason == "SIGTSTP"
    assert snap.seconds_since_trigger == 2
    assert [(x.name, x.phase, x.state) for x in snap.listeners] == [
        ("drain", "wrap_up", "running"),
        ("close", "shutdown", "pending"),
    ]
    assert snap.listeners[0].duration == 2
    assert "drain" in snap.format()
    lc.shutdown("SIGTERM", wait=False)
    assert lc.time_remaining() == 25
    release.set()
    assert lc.wait_for_shutdown(BOUND)
    final = lc.status()
    assert final.state is State.STOPPED
    assert final.reason == "SIGTERM"
    assert [x.state for x in final.listeners] == ["done", "done"]
    assert "stopped" in repr(lc)


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


def test_state_changes_are_logged_at_info_with_reason_and_durations_at_debug(
    lc: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    lc.add_shutdown_listener(lambda: None, name="flush")
    with caplog.at_level(logging.DEBUG, logger="graceful"):
        assert lc.shutdown("SIGTERM", timeout=BOUND)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("wrapping up" in m and "SIGTERM" in m for m in info)
    assert any("shutting down" in m for m in info)
    assert any("stopped" in m and "SIGTERM" in m for m in info)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("'flush' finished in" in m for m in debug)


def test_wait_for_shutdown_times_out_while_running(lc: Lifecycle) -> None:
    assert lc.wait_for_shutdown(0.01) is False
    assert lc.shutdown(timeout=BOUND) is True
    assert lc.wait_for_shutdown(0) is True


def test_wait_for_shutdown_async_after_stop_returns_at_once(lc: Lifecycle) -> None:
    assert lc.shutdown(timeout=BOUND)
    assert asyncio.run(lc.wait_for_shutdown_async()) is True


def test_reload_listeners_run_in_order_and_a_failure_does_not_stop_the_others(
    lc: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def bad() -> None:
        raise OSError("config unreadable")

    async def async_reload() -> None:
        calls.append("async")

    lc.add_reload_listener(lambda: calls.append("first"))
    handle = lc.add_reload_listener(bad, name="bad-reload")
    lc.add_reload_listener(async_reload)
    assert lc.reload("SIGHUP") == 3
    assert calls == ["first", "async"]
    assert "bad-reload" in caplog.text
    assert "bad-reload" in repr(handle)
    assert handle.remove() is True
    assert handle.remove() is False
    assert lc.reload() == 2


def test_module_level_functions_act_on_the_default_and_use_swaps_it(exits: Recorder) -> None:
    mine = Lifecycle(force_quit=3, clock=FakeClock(), exit=exits)
    previous = graceful.use(mine)
    try:
        assert graceful.get_lifecycle() is mine
        ran = []
        graceful.add_wrap_up_listener(lambda: ran.append("w"))
        graceful.add_shutdown_listener(lambda: ran.append("s"))
        graceful.add_reload_listener(lambda: None)
        graceful.set_time_to_force_quit(5)
        assert graceful.status().force_quit == 5
        assert graceful.is_stopping() is False
        assert graceful.state() is State.RUNNING
        graceful.wrap_up("pause")
        assert graceful.is_stopping() is True
        assert graceful.shutdown(timeout=BOUND)
        assert graceful.wait_for_shutdown(0)
        assert asyncio.run(graceful.wait_for_shutdown_async())
        assert ran == ["w", "s"]
    finally:
        assert graceful.use(previous) is mine
    assert graceful.get_lifecycle() is previous
    with pytest.raises(TypeError, match="Lifecycle"):
        graceful.use("nope")  # type: ignore[arg-type]


def test_record_failure_makes_the_exit_code_one(lc: Lifecycle) -> None:
    assert lc.exit_code == 0
    record_failure(lc, "server 'api' crashed")
    assert lc.exit_code == 1


def test_a_hundred_blocking_listeners_all_run_at_once(lc: Lifecycle) -> None:
    """100 listeners that each wait for all the others: the pool grows to run them together."""
    barrier = threading.Barrier(100, timeout=BOUND)
    waiters = [lc.add_shutdown_listener(barrier.wait) for _ in range(100)]
    assert lc.shutdown(timeout=BOUND)
    assert all(w.exception() is None for w in waiters)


def test_idle_pool_threads_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OS thread is kept per idle listener: idle workers leave after the idle timeout."""
    from graceful._listeners import Pool

    pool = Pool()
    monkeypatch.setattr(pool, "IDLE", 0.05)
    barrier = threading.Barrier(8, timeout=BOUND)
    done = threading.Semaphore(0)

    def job() -> None:
        barrier.wait()
        done.release()

    for _ in range(8):
        pool.submit(job)
    for _ in range(8):
        assert done.acquire(timeout=BOUND)
    assert pool._workers >= 8
    assert pool.wait_idle(BOUND)


def _waits_in_run_phase(thread: threading.Thread) -> bool:
    """True when ``thread`` is blocked in an Event/Condition wait called from ``_run_phase``."""
    frame = sys._current_frames().get(thread.ident or -1)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return bool(names) and names[0] == "wait" and "_run_phase" in names


@pytest.mark.timeout(30)
def test_the_sequence_logs_its_first_line_only_after_the_trigger_said_wrapping_up(lc: Lifecycle) -> None:
    """Act first, log after: the listeners start before "wrapping up" is logged, but the
    sequence's own lines ("wrap_up phase done", "stopped") never come before it, however long
    the trigger's thread takes to log it (here: held in a logging filter)."""
    held = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def hold(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("wrapping up"):
            held.set()
            release.wait(BOUND)
        seen.append(message)
        return True

    logger = logging.getLogger("graceful")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addFilter(hold)
    try:
        ran = lc.add_wrap_up_listener(lambda: None, name="quick")
        trigger = threading.Thread(target=lc.shutdown, kwargs={"reason": "test", "wait": False})
        trigger.start()
        assert held.wait(BOUND)
        assert ran.wait(BOUND)  # the listener ran while the trigger's line is held
        driver = next(t for t in threading.enumerate() if t.name == "graceful-lifecycle")
        deadline = time.monotonic() + BOUND  # until the sequence waits, or (the bug) logs on
        while not _waits_in_run_phase(driver) and not any("phase done" in m for m in seen):
            assert time.monotonic() < deadline, "the sequence neither waited nor logged"
            time.sleep(0.001)  # polling a thread's stack: there is nothing to wait on
        release.set()
        trigger.join(BOUND)
        assert lc.wait_for_shutdown(BOUND)
    finally:
        release.set()
        logger.removeFilter(hold)
        logger.setLevel(level)
    mine = [m for m in seen if m.startswith(("wrapping up", "wrap_up phase done", "stopped"))]
    assert mine[0].startswith("wrapping up (test)"), seen
    assert [m.split(" ")[0] for m in mine] == ["wrapping", "wrap_up", "stopped"], seen


@pytest.mark.timeout(30)
def test_a_moment_wakes_threads_and_coroutines_and_a_cancelled_wait_leaves_nothing() -> None:
    """``Moment`` (wrap-up began, stopped): one set wakes a thread and a coroutine; a cancelled
    ``await`` takes its wake-up back; once set, waits return at once."""
    from graceful._aio import Moment

    moment = Moment()
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: moment.wait(BOUND) and woke.set())
    waiter.start()

    async def main() -> bool:
        gone = asyncio.ensure_future(moment.wait_async())
        await asyncio.sleep(0)  # it has arranged its wake-up
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert moment._wakes == []  # taken back
        staying = asyncio.ensure_future(moment.wait_async())
        await asyncio.sleep(0)
        threading.Thread(target=moment.set).start()
        return await asyncio.wait_for(staying, BOUND)

    assert asyncio.run(main()) is True
    assert woke.wait(BOUND)
    waiter.join(BOUND)
    assert moment.wait(0)
    assert asyncio.run(moment.wait_async())
