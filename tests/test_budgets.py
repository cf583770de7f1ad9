"""Nothing hung holds the rest hostage (contract section 10): the wrap-up timeout, per-listener
timeouts, abandonment, and the flush phase that runs even at a force quit.

The process-level promises are checked in real child processes with real signals
(``graceful_process``); the bookkeeping (status, waiters, bad input) in-process on a fake clock.
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
import threading
from pathlib import Path

import pytest

import graceful
from graceful import Lifecycle, ListenerState, Phase
from graceful._deadline import FakeClock
from graceful.testing import ProcessFactory

from .conftest import BOUND, Recorder, run_python

# A service under graceful.run() whose listeners print one line each as they run, so the test
# reads the order from stdout; STUCK names the listener that never returns.
SERVICE = """
import logging, sys, threading, time, graceful
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
graceful.set_time_to_force_quit({budget})
STUCK = {stuck!r}

def listener(name):
    def fn():
        print(name, "ran", flush=True)
        if name == STUCK:
            time.sleep(100)  # a drain that never ends
    return fn

graceful.add_wrap_up_listener(listener("drain"), name="drain")
graceful.add_shutdown_listener(listener("close-db-pool"), name="close-db-pool")
graceful.add_flush_listener(listener("flush-metrics"), name="flush-metrics")
sys.exit(graceful.run(lambda: graceful.wait_for_wrap_up()))
"""


def _ran(stdout: str) -> list[str]:
    return [line.split()[0] for line in stdout.splitlines() if line.endswith(" ran")]


# -- the wrap-up timeout ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_stuck_wrap_up_listener_no_longer_holds_the_shutdown_and_flush_listeners(
    graceful_process: ProcessFactory,
) -> None:
    """The issue's own reproduction: budget 1.5 s, one wrap-up listener stuck in a call. The
    shutdown and flush listeners run at the wrap-up timeout (1.2 s), not never; exit 1, not 70."""
    proc = graceful_process(SERVICE.format(budget=1.5, stuck="drain"))
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(BOUND)
    assert _ran(result.stdout) == ["drain", "close-db-pool", "flush-metrics"]
    assert result.returncode == 1, result.stderr  # a listener was abandoned; no deadline fired
    assert re.search(
        r"wrap_up listener 'drain' abandoned after 1\.\d+ s: the wrap-up timeout of 1\.2 s", result.stderr
    )
    assert 'File "<string>", line 11, in fn' in result.stderr  # where it is stuck (time.sleep)
    assert "force quit" not in result.stderr
    assert "never started" not in result.stderr


@pytest.mark.timeout(60)
def test_a_stuck_shutdown_listener_still_gets_the_flush_listeners_run_at_the_deadline(
    graceful_process: ProcessFactory,
) -> None:
    """No timeout on the shutdown phase: the deadline comes, the report goes out first, then the
    flush listener that never ran gets its slice, then exit 70."""
    proc = graceful_process(SERVICE.format(budget=1, stuck="close-db-pool"))
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(BOUND)
    assert result.returncode == 70
    assert _ran(result.stdout) == ["drain", "close-db-pool", "flush-metrics"]
    report = result.stderr.index("force quit: the force-quit deadline of 1 s passed")
    assert report < result.stderr.index("1 flush listener(s) ran before the exit")
    assert "flush listener 'flush-metrics': not run yet: it runs in the flush slice" in result.stderr


@pytest.mark.timeout(60)
def test_a_hung_flush_listener_cannot_hold_the_exit_past_the_slice(graceful_process: ProcessFactory) -> None:
    proc = graceful_process(
        SERVICE.format(budget=1, stuck="flush-metrics").replace(
            'graceful.add_shutdown_listener(listener("close-db-pool"), name="close-db-pool")',
            'graceful.add_shutdown_listener(lambda: time.sleep(100), name="close-db-pool")',
        )
    )
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(BOUND)  # the flush listener sleeps 100 s: only the slice ends it
    assert result.returncode == 70
    assert "flush listener(s) still running at the end of the slice: ['flush-metrics']" in result.stderr


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_still_flushes(graceful_process: ProcessFactory) -> None:
    proc = graceful_process(SERVICE.format(budget=30, stuck="drain"))
    proc.send_signal(signal.SIGINT)
    proc.wait_for_output("drain ran")
    proc.send_signal(signal.SIGINT)
    result = proc.wait(BOUND)
    assert result.returncode == 70
    assert "force quit: SIGINT again while shutting down" in result.stderr
    assert "flush-metrics ran" in result.stdout  # before the exit, after the report
    assert "close-db-pool ran" not in result.stdout  # the shutdown phase never began


QUEUE_LOG = """
import logging, logging.handlers, queue, sys, threading, time, graceful
records = queue.Queue()
handler = logging.FileHandler({path!r})
listener = logging.handlers.QueueListener(records, handler)
listener.start()
app = logging.getLogger("app")
app.addHandler(logging.handlers.QueueHandler(records))
app.propagate = False
app.setLevel(logging.INFO)
graceful.set_time_to_force_quit(1)
graceful.add_flush_listener(listener.stop, name="log queue")  # the recipe in docs/hangs.md

def drain():
    for n in range(2000):
        app.info("record %d", n)
    print("queued", flush=True)
    time.sleep(100)

graceful.add_shutdown_listener(drain, name="stuck")
sys.exit(graceful.run(lambda: graceful.wait_for_wrap_up()))
"""


@pytest.mark.timeout(60)
def test_records_queued_just_before_a_force_quit_all_reach_their_file(
    graceful_process: ProcessFactory, tmp_path: Path
) -> None:
    """2,000 records in a QueueHandler when the deadline comes: the flush listener drains them
    into the file before ``os._exit``, which would otherwise throw the queue away."""
    path = tmp_path / "app.log"
    proc = graceful_process(QUEUE_LOG.format(path=str(path)))
    proc.send_signal(signal.SIGTERM)
    proc.wait_for_output("queued")
    result = proc.wait(BOUND)
    assert result.returncode == 70
    lines = path.read_text().splitlines()
    assert len(lines) == 2000
    assert lines[-1] == "record 1999"


# -- per-listener timeouts and abandonment, in-process --------------------------------------


def _lc(budget: float = 10, **kwargs: object) -> tuple[Lifecycle, FakeClock, Recorder]:
    clock, exits = FakeClock(), Recorder()
    return Lifecycle(budget, clock=clock, exit=exits, **kwargs), clock, exits  # type: ignore[arg-type]


def test_a_listener_past_its_own_timeout_is_abandoned_and_the_phase_goes_on() -> None:
    lc, clock, _ = _lc()
    release = threading.Event()
    started = threading.Event()

    def hang() -> None:
        started.set()
        release.wait(BOUND)

    stuck = lc.add_shutdown_listener(hang, name="close-pool", timeout=2)
    flushed = lc.add_flush_listener(lambda: None, name="flush")
    lc.shutdown(wait=False)
    assert started.wait(BOUND)
    assert not stuck.done()
    clock.advance(1.9)
    assert not stuck.done()
    clock.advance(0.2)
    assert stuck.wait(BOUND)
    assert isinstance(stuck.exception(), TimeoutError)
    assert "abandoned after 2.1" in str(stuck.exception())
    assert flushed.wait(BOUND)  # the flush phase did not wait for it
    assert lc.wait_for_shutdown(BOUND)
    assert lc.exit_code == 1
    item = next(i for i in lc.status().listeners if i.name == "close-pool")
    assert item.state is ListenerState.ABANDONED
    assert item.timeout == 2
    assert item.abandoned_for == 0
    assert "timeout 2 s, abandoned" in lc.status().format()
    release.set()


def test_the_wrap_up_timeout_counts_from_the_shutdown_trigger_and_a_pause_has_none() -> None:
    lc, clock, _ = _lc(budget=10)
    release = threading.Event()
    drain = lc.add_wrap_up_listener(lambda: release.wait(BOUND), name="drain")
    close = lc.add_shutdown_listener(lambda: None, name="close")
    assert lc.wrap_up_timeout == 8  # 10 - min(5, 10 / 5)
    lc.wrap_up("SIGTSTP")
    clock.advance(100)  # a pause lasts as long as the operator wants
    assert not drain.done()
    lc.shutdown("SIGTERM", wait=False)
    clock.advance(7.9)
    assert not drain.done()
    assert not close.done()
    clock.advance(0.1)
    assert close.wait(BOUND)
    assert isinstance(drain.exception(), TimeoutError)
    assert "the wrap-up timeout of 8 s passed" in str(drain.exception())
    assert lc.wait_for_shutdown(BOUND)
    assert lc.exit_code == 1
    release.set()


@pytest.mark.parametrize(("budget", "expected"), [(25, 20), (10, 8), (2, 1.6), (100, 95)])
def test_the_default_wrap_up_timeout_leaves_a_fifth_of_the_budget_at_most_5_s(
    budget: float, expected: float
) -> None:
    lc, _, _ = _lc(budget)
    assert lc.wrap_up_timeout == pytest.approx(expected)
    assert lc.status().wrap_up_timeout == pytest.approx(expected)


def test_an_async_listener_past_its_timeout_is_cancelled_and_its_finally_runs() -> None:
    lc, clock, _ = _lc()
    began, cleaned = threading.Event(), threading.Event()

    async def drain() -> None:
        began.set()
        try:
            await asyncio.sleep(100)
        finally:
            cleaned.set()

    waiter = lc.add_wrap_up_listener(drain, name="async-drain", timeout=1)
    lc.shutdown(wait=False)
    assert began.wait(BOUND)
    clock.advance(1)
    assert cleaned.wait(BOUND)
    assert isinstance(waiter.exception(), TimeoutError)
    assert lc.wait_for_shutdown(BOUND)


def test_an_abandoned_listener_that_finishes_later_is_said_once_and_counted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lc, clock, _ = _lc()
    release = threading.Event()
    done = threading.Event()

    def slow() -> None:
        release.wait(BOUND)
        done.set()

    waiter = lc.add_shutdown_listener(slow, name="slow", timeout=1)
    lc.shutdown(wait=False)
    while not any(i.state is ListenerState.RUNNING for i in lc.status().listeners):
        threading.Event().wait(0.001)  # until the pool has started it: its timeout counts from then
    clock.advance(1)
    assert lc.wait_for_shutdown(BOUND)
    release.set()
    assert done.wait(BOUND)
    assert isinstance(waiter.exception(), TimeoutError)
    assert lc.exit_code == 1


def test_after_a_stop_with_an_abandoned_listener_still_running_the_deadline_stays_armed() -> None:
    """A thread cannot be stopped: if the process is still alive at the deadline (that thread
    may be what keeps it alive), the report names the listener again and the exit is 70."""
    lc, clock, exits = _lc(budget=4)
    release, started = threading.Event(), threading.Event()

    def stuck() -> None:
        started.set()
        release.wait(BOUND)

    lc.add_wrap_up_listener(stuck, name="drain")
    lc.shutdown(wait=False)
    assert started.wait(BOUND)
    clock.advance(3.2)
    assert lc.wait_for_shutdown(BOUND)
    assert lc.exit_code == 1
    assert not exits.codes
    clock.advance(0.8)
    assert exits.codes == [70]
    assert "wrap_up listener 'drain': running for 4.000 s, abandoned 0.800 s ago and still running" in (
        lc.force_quit_report or ""
    )
    release.set()


def test_the_force_quit_report_names_an_abandoned_listener_still_running_again() -> None:
    lc, clock, exits = _lc(budget=4)
    release = threading.Event()
    started, closing = threading.Event(), threading.Event()

    def stuck() -> None:
        started.set()
        release.wait(BOUND)

    def close() -> None:
        closing.set()
        release.wait(BOUND)

    lc.add_wrap_up_listener(stuck, name="drain")
    lc.add_shutdown_listener(close, name="close")
    lc.shutdown(wait=False)
    assert started.wait(BOUND)
    clock.advance(3.2)  # the wrap-up timeout: 4 - 0.8
    assert closing.wait(BOUND)  # the sequence went on (on its own thread)
    clock.advance(0.8)  # the deadline
    assert exits.called.wait(BOUND)
    report = lc.force_quit_report or ""
    assert "wrap_up listener 'drain': running for" in report
    assert "abandoned 0.800 s ago and still running" in report
    assert "shutdown listener 'close': running for" in report
    assert lc.exit_code == 70
    release.set()


# -- bad input, before any state changes ----------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, 25, 30])
def test_a_wrap_up_timeout_not_below_the_budget_or_not_finite_is_a_value_error(bad: float) -> None:
    lc, _, _ = _lc(budget=25)
    with pytest.raises(ValueError, match=r"wrap-up timeout|number of seconds"):
        lc.set_wrap_up_timeout(bad)
    assert lc.wrap_up_timeout == 20
    with pytest.raises(ValueError, match=r"wrap-up timeout|number of seconds"):
        Lifecycle(25, wrap_up_timeout=bad)


def test_a_budget_at_or_below_a_wrap_up_timeout_set_before_is_a_value_error() -> None:
    lc, _, _ = _lc(budget=25)
    lc.set_wrap_up_timeout(15)
    with pytest.raises(ValueError, match="wrap-up timeout set before"):
        lc.set_time_to_force_quit(10)
    assert lc.status().force_quit == 25


@pytest.mark.parametrize("add", ["add_wrap_up_listener", "add_shutdown_listener", "add_flush_listener"])
@pytest.mark.parametrize(
    ("bad", "error"),
    [(0, ValueError), (-1, ValueError), (math.nan, ValueError), ("5", TypeError), (True, TypeError)],
)
def test_a_listener_timeout_that_is_not_a_positive_number_is_refused_at_registration(
    add: str, bad: object, error: type
) -> None:
    lc, _, _ = _lc()
    with pytest.raises(error, match="timeout"):
        getattr(lc, add)(lambda: None, timeout=bad)
    assert lc.status().listeners == ()
    with pytest.raises(TypeError, match="seconds"):
        lc.set_wrap_up_timeout("5")  # type: ignore[arg-type]


def test_a_bad_wrap_up_timeout_in_the_environment_stops_run_at_start_naming_it() -> None:
    result = run_python(
        "import graceful; print('imported', flush=True); graceful.run(lambda: None)",
        env={"GRACEFUL_WRAP_UP_TIMEOUT": "soon"},
    )
    assert result.stdout == "imported\n"
    assert "ValueError: GRACEFUL_WRAP_UP_TIMEOUT='soon' is not a number" in result.stderr
    result = run_python(
        "import graceful; graceful.run(lambda: None)",
        env={"GRACEFUL_WRAP_UP_TIMEOUT": "30", "GRACEFUL_FORCE_QUIT": "25"},
    )
    assert "below the force-quit budget (25 s)" in result.stderr


def test_flush_listeners_run_after_the_shutdown_phase_in_order(fresh: Lifecycle) -> None:
    seen: list[str] = []
    graceful.add_flush_listener(lambda: seen.append("flush"))
    graceful.add_shutdown_listener(lambda: seen.append("shutdown"))
    graceful.add_wrap_up_listener(lambda: seen.append("wrap_up"))
    assert graceful.shutdown(timeout=BOUND)
    assert seen == ["wrap_up", "shutdown", "flush"]
    assert [i.phase for i in graceful.status().listeners] == [Phase.WRAP_UP, Phase.SHUTDOWN, Phase.FLUSH]


STUCK_SERVICE = """
import sys, threading, time, graceful

class Stuck:
    name = "stuck"

    def __init__(self):
        self.stop = threading.Event()

    def serve(self, ctx):
        ctx.started()
        self.stop.wait()

    def wrap_up(self, ctx):
        time.sleep(3600)  # a hand-written drain that never ends

    def close(self, ctx):
        self.stop.set()

graceful.add_shutdown_listener(lambda: print("pool closed", flush=True), name="close pool")
sys.exit(graceful.run(Stuck(), force_quit=2.0))
"""


@pytest.mark.timeout(60)
def test_a_hand_written_service_whose_wrap_up_hangs_is_abandoned_at_the_wrap_up_timeout(
    graceful_process: ProcessFactory,
) -> None:
    """Only graceful's own adapters bound their own drain (``bounds_its_drain``); a user's
    Service is abandoned like any wrap-up listener, and the shutdown listeners still run."""
    proc = graceful_process(STUCK_SERVICE)
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(BOUND)
    assert result.returncode == 1, result.stderr
    assert "pool closed" in result.stdout
    assert "wrap_up listener 'wrap up stuck' abandoned after" in result.stderr
    assert "force quit" not in result.stderr
