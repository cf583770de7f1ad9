"""The force-quit deadline and its report."""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
import threading
from collections.abc import Callable

import pytest

from graceful import Lifecycle
from graceful._deadline import FakeClock, MonotonicClock, TimerHandle, emit_report
from graceful._settings import read_budget
from graceful.lowlevel import on_force_quit

from .conftest import BOUND, Recorder, run_python


def stuck_in_flush(release: threading.Event) -> None:
    release.wait(BOUND)


def test_deadline_fires_once_with_a_report_naming_the_stuck_listener_and_its_stack(
    lc: Lifecycle, clock: FakeClock, exits: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    release, started = threading.Event(), threading.Event()
    lc.add_wrap_up_listener(lambda: None, name="quick")
    lc.add_shutdown_listener(lambda: (started.set(), stuck_in_flush(release)), name="flush-metrics")
    closed = lc.add_shutdown_listener(lambda: None, name="close-db")
    lc.shutdown("SIGTERM", wait=False)
    assert started.wait(BOUND)
    assert closed.wait(BOUND)
    clock.advance(24.9)
    assert exits.codes == []
    with caplog.at_level(logging.CRITICAL, logger="graceful"):
        clock.advance(0.1)
    assert exits.codes == [70]
    report = lc.force_quit_report
    assert report is not None
    assert "deadline of 25 s passed" in report
    assert "shutdown listener 'flush-metrics': running for" in report
    assert "in stuck_in_flush" in report  # the stack of the thread running it
    assert "close-db" not in report  # it finished: only the unfinished are named
    assert lc.exit_code == 70
    # logged without the "graceful: " prefix: the logger name says it (no "graceful graceful:")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL] == [
        report.removeprefix("graceful: ")
    ]
    clock.advance(100)
    lc.force_quit_now("again")
    assert exits.codes == [70]
    release.set()


def test_report_lists_listeners_that_never_started(lc: Lifecycle, clock: FakeClock, exits: Recorder) -> None:
    release, started = threading.Event(), threading.Event()
    lc.add_wrap_up_listener(lambda: (started.set(), release.wait(BOUND)), name="drain-http")
    lc.add_shutdown_listener(lambda: None, name="close-db")
    lc.shutdown(wait=False)
    assert started.wait(BOUND)
    clock.advance(25)
    report = lc.force_quit_report or ""
    assert "wrap_up listener 'drain-http': running" in report
    assert "Not started:\n  - shutdown listener 'close-db': never started" in report
    release.set()


def test_async_listener_report_shows_the_await_chain(
    lc: Lifecycle, clock: FakeClock, exits: Recorder
) -> None:
    started = threading.Event()
    holder: dict[str, asyncio.Event] = {}

    async def wait_for_ack() -> None:
        holder["ev"] = asyncio.Event()
        started.set()
        await holder["ev"].wait()

    async def drain_queue() -> None:
        await wait_for_ack()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:

        async def register() -> None:
            lc.add_wrap_up_listener(drain_queue, name="drain-queue")

        asyncio.run_coroutine_threadsafe(register(), loop).result(BOUND)
        lc.shutdown(wait=False)
        assert started.wait(BOUND)
        clock.advance(25)
        report = lc.force_quit_report or ""
        assert "awaiting:" in report
        assert "in drain_queue" in report
        assert "in wait_for_ack" in report
    finally:
        loop.call_soon_threadsafe(holder["ev"].set)
        assert lc.wait_for_shutdown(BOUND)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(BOUND)
        loop.close()


def test_no_listener_running_still_reports(lc: Lifecycle, exits: Recorder) -> None:
    lc.force_quit_now("SIGQUIT")
    assert exits.codes == [70]
    assert "force quit: SIGQUIT" in (lc.force_quit_report or "")
    assert "No listener was still running." in (lc.force_quit_report or "")


def test_a_pause_alone_starts_no_deadline(lc: Lifecycle, clock: FakeClock, exits: Recorder) -> None:
    release = threading.Event()
    lc.add_wrap_up_listener(lambda: release.wait(BOUND))
    lc.wrap_up("SIGTSTP")
    clock.advance(10_000)
    assert exits.codes == []
    lc.shutdown("SIGTERM", wait=False)
    clock.advance(24)
    assert exits.codes == []
    clock.advance(1)
    assert exits.codes == [70]
    release.set()


def test_deadline_counts_from_the_first_trigger_and_a_new_budget_moves_it(
    lc: Lifecycle, clock: FakeClock, exits: Recorder
) -> None:
    release = threading.Event()
    lc.add_shutdown_listener(lambda: release.wait(BOUND))
    lc.shutdown("SIGTERM", wait=False)
    clock.advance(10)
    lc.shutdown("SIGTERM again", wait=False)  # a repeated trigger does not extend it
    lc.set_time_to_force_quit(12)
    assert lc.time_remaining() == 2
    clock.advance(1.9)
    assert exits.codes == []
    lc.set_time_to_force_quit(5)  # already used up: fires at once
    clock.advance(0)
    assert exits.codes == [70]
    release.set()


def test_finishing_in_time_disarms_the_deadline(lc: Lifecycle, clock: FakeClock, exits: Recorder) -> None:
    assert lc.shutdown(timeout=BOUND)
    clock.advance(1000)
    assert exits.codes == []
    assert lc.force_quit_report is None


def test_a_timer_that_fires_as_the_sequence_disarms_it_in_time_forces_nothing(exits: Recorder) -> None:
    """The timer thread woke at the deadline just as a sequence that ended in time disarmed it."""
    scheduled: list[Callable[[], None]] = []

    class Recording(FakeClock):
        def call_at(self, when: float, fn: Callable[[], None], *, name: str = "") -> TimerHandle:
            scheduled.append(fn)
            return super().call_at(when, fn, name=name)

    clock = Recording()
    lc = Lifecycle(force_quit=1, clock=clock, exit=exits)
    assert lc.shutdown(timeout=BOUND)  # in time: the fake clock has not moved
    clock.advance(1)  # disarmed: nothing comes due
    # A _ThreadTimer that checked "cancelled?" a moment before the disarm calls it anyway.
    scheduled[-1]()
    assert exits.codes == []
    assert lc.force_quit_report is None


def test_monotonic_clock_timer_fires_and_cancels() -> None:
    clock = MonotonicClock()
    fired = threading.Event()
    clock.call_at(clock.monotonic() + 0.01, fired.set, name="t")
    assert fired.wait(BOUND)
    never = threading.Event()
    handle = clock.call_at(clock.monotonic() + 0.05, never.set, name="t")
    handle.cancel()
    assert not never.wait(0.15)


def test_fake_clock_rejects_going_backwards() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        FakeClock().advance(-1)


def test_report_goes_to_stderr_when_logging_would_not_put_it_there(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = logging.getLogger("graceful")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        emit_report("REPORT-LINE")
    finally:
        logger.removeHandler(handler)
    assert "REPORT-LINE" in capsys.readouterr().err


def test_report_is_not_doubled_when_logging_prints_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("graceful")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        emit_report("ONCE-ONLY")
    finally:
        logger.removeHandler(handler)
    assert capsys.readouterr().err.count("ONCE-ONLY") == 1


def test_env_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRACEFUL_FORCE_QUIT", "7.5")
    assert read_budget() == 7.5
    monkeypatch.setenv("GRACEFUL_FORCE_QUIT", " ")
    assert read_budget() is None
    monkeypatch.setenv("GRACEFUL_FORCE_QUIT", "soon")
    with pytest.raises(ValueError, match="GRACEFUL_FORCE_QUIT='soon' is not a number"):
        read_budget()
    monkeypatch.setenv("GRACEFUL_FORCE_QUIT", "-3")
    with pytest.raises(ValueError, match="GRACEFUL_FORCE_QUIT"):
        read_budget()


def test_default_lifecycle_takes_its_budget_from_the_environment_when_armed() -> None:
    """Not at import: when the deadline is armed (no run(), no host read it before)."""
    result = run_python(
        "import graceful; print(graceful.status().force_quit); graceful.shutdown(); "
        "print(graceful.status().force_quit)",
        env={"GRACEFUL_FORCE_QUIT": "9"},
    )
    assert result.stdout.split() == ["25.0", "9.0"], result.stderr


def test_a_bad_budget_in_the_environment_fails_no_import_and_no_shutdown() -> None:
    """``import graceful`` never fails on a deployment variable; a shutdown that finds a bad one
    logs it and uses the default budget (run() and the hosts refuse it at start instead)."""
    result = run_python(
        "import logging, graceful; logging.basicConfig(); graceful.shutdown(); "
        "print(graceful.status().force_quit, graceful.get_lifecycle().exit_code)",
        env={"GRACEFUL_FORCE_QUIT": "abc", "GRACEFUL_DRAIN_DELAY": "soon", "GRACEFUL_PROBE_PORT": "80a"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["25.0", "0"]
    assert "GRACEFUL_FORCE_QUIT='abc' is not a number" in result.stderr
    assert "graceful's defaults apply" in result.stderr


def test_hung_shutdown_listener_makes_a_real_process_exit_70_with_a_report() -> None:
    """The real thing: os._exit(70), the report on stderr names the listener and its stack."""
    code = textwrap.dedent(
        """
        import threading, graceful
        def hang_forever_in_close():
            threading.Event().wait()
        graceful.set_time_to_force_quit(0.5)
        graceful.add_shutdown_listener(hang_forever_in_close, name="close-db-pool")
        graceful.shutdown("test")
        print("not reached")
        """
    )
    result = run_python(code)
    assert result.returncode == 70, result.stderr
    assert "not reached" not in result.stdout
    assert result.stderr.count("force quit: the force-quit deadline of 0.5 s passed") == 1
    assert "shutdown listener 'close-db-pool': running for" in result.stderr
    assert "in hang_forever_in_close" in result.stderr
    assert "Traceback" not in result.stderr


def test_force_quit_hooks_run_after_the_report_and_before_the_exit(
    lc: Lifecycle, exits: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def bad() -> None:
        raise RuntimeError("requeue failed")

    on_force_quit(
        lc,
        lambda: seen.append(
            f"hook sees report: {lc.force_quit_report is not None}; exited: {bool(exits.codes)}"
        ),
    )
    on_force_quit(lc, bad, name="requeue-jobs")
    on_force_quit(lc, lambda: seen.append("after the bad one"))
    lc.force_quit_now("SIGQUIT")
    assert seen == ["hook sees report: True; exited: False", "after the bad one"]
    assert exits.codes == [70]
    assert "requeue-jobs" in caplog.text
    with pytest.raises(TypeError, match="on_force_quit"):
        on_force_quit(lc, "nope")  # type: ignore[arg-type]
