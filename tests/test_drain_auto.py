"""``GRACEFUL_DRAIN_DELAY=auto[:MAX]``: serve until the balancer has visibly stopped sending.

The unit tests drive a fake clock and real probe servers; the last test is a real server under
``graceful.run`` in a subprocess with a real SIGTERM, its probes asked over HTTP as a balancer
asks them.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from graceful import Lifecycle, readiness
from graceful._deadline import FakeClock
from graceful._drain_delay import AUTO_QUIET, drain_delay_of
from graceful._settings import AUTO_MAX
from graceful._settings import DrainDelaySetting as DrainDelay
from graceful.testing import ProcessFactory

from .conftest import BOUND, Recorder
from .support.web import free_port, get
from .test_readiness import SERVICE, probe


def stopping(clock: FakeClock, setting: str, *, force_quit: float = 60) -> tuple[Lifecycle, threading.Event]:
    """A lifecycle with the drain delay ``setting``, wrapping up (held open by a listener)."""
    lc = Lifecycle(force_quit=force_quit, clock=clock, exit=Recorder())
    readiness.set_drain_delay(setting, lc)
    release = threading.Event()
    lc.add_wrap_up_listener(release.wait, name="held")
    lc.shutdown("test", wait=False)
    return lc, release


def waiting(lc: Lifecycle) -> tuple[threading.Thread, list[float]]:
    """``wait_drain_delay(lc)`` on a thread; its result lands in the list."""
    waited: list[float] = []
    thread = threading.Thread(target=lambda: waited.append(readiness.wait_drain_delay(lc)), daemon=True)
    thread.start()
    return thread, waited


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auto", DrainDelay(AUTO_MAX, auto=True)),
        (" AUTO:2.5 ", DrainDelay(2.5, auto=True)),
        ("auto:30", DrainDelay(30, auto=True)),
    ],
)
def test_auto_is_taken_from_python_and_from_the_environment(
    text: str, expected: DrainDelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` and ``auto:MAX`` parse to the same setting both ways; its bound is ``drain_delay()``."""
    lc = Lifecycle()
    readiness.set_drain_delay(text, lc)
    assert readiness.drain_delay_is_auto(lc)
    assert readiness.drain_delay(lc) == expected.seconds
    monkeypatch.setenv("GRACEFUL_DRAIN_DELAY", text)
    other = Lifecycle()
    assert readiness.drain_delay_is_auto(other)
    assert readiness.drain_delay(other) == expected.seconds
    assert str(expected) == f"auto:{expected.seconds:g}"


@pytest.mark.parametrize("bad", ["auto:0", "auto:-1", "auto:x", "auto:nan", "automatic", "auto:"])
def test_a_bad_auto_is_refused_at_the_call_and_at_start(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad ``auto`` is a ValueError saying what is accepted, and the setting is unchanged."""
    lc = Lifecycle()
    readiness.set_drain_delay(3, lc)
    with pytest.raises((ValueError, TypeError), match=r"auto"):
        readiness.set_drain_delay(bad, lc)
    assert readiness.drain_delay(lc) == 3
    assert not readiness.drain_delay_is_auto(lc)
    monkeypatch.setenv("GRACEFUL_DRAIN_DELAY", bad)
    with pytest.raises(ValueError, match=r"GRACEFUL_DRAIN_DELAY=.*auto"):
        readiness.drain_delay(Lifecycle())


def test_a_number_as_text_is_taken_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GRACEFUL_DRAIN_DELAY=5`` is 5 s; ``set_drain_delay("5")`` is a TypeError, as before."""
    monkeypatch.setenv("GRACEFUL_DRAIN_DELAY", "5")
    lc = Lifecycle()
    assert readiness.drain_delay(lc) == 5
    assert not readiness.drain_delay_is_auto(lc)
    with pytest.raises(TypeError, match="auto"):
        readiness.set_drain_delay("5", lc)


@pytest.mark.timeout(30)
def test_without_probes_auto_ends_after_a_quiet_window_that_each_request_restarts() -> None:
    """No probes served: each arrival pushes the end to QUIET after it; then it ends."""
    clock = FakeClock()
    lc, release = stopping(clock, "auto:5")
    traffic = readiness.traffic(lc)
    assert readiness.drain_delay_left(lc) == pytest.approx(AUTO_QUIET)
    clock.advance(AUTO_QUIET / 2)
    traffic.arrived()  # a request: the balancer still sends
    assert readiness.drain_delay_left(lc) == pytest.approx(AUTO_QUIET)
    thread, waited = waiting(lc)
    clock.advance(AUTO_QUIET / 2)
    traffic.arrived()
    clock.advance(AUTO_QUIET / 2)
    assert thread.is_alive()
    clock.advance(AUTO_QUIET / 2)  # QUIET since the last arrival
    thread.join(BOUND)
    assert waited == [pytest.approx(AUTO_QUIET * 1.5)]
    assert drain_delay_of(lc).ended_why == f"no new request for {AUTO_QUIET:g} s (no probes served)"
    assert readiness.drain_delay_left(lc) == 0
    release.set()
    assert lc.wait_for_shutdown(BOUND)


@pytest.mark.timeout(30)
def test_with_probes_auto_waits_for_a_503_answered_then_the_quiet_window() -> None:
    """Probes served: no traffic is not enough; a /readyz answered 503 wakes it, QUIET later it ends."""
    clock = FakeClock()
    lc, release = stopping(clock, "auto:5")
    with readiness.serve_probes(0, lifecycle=lc) as probes:
        thread, waited = waiting(lc)
        clock.advance(1)  # a whole second without a request: the balancer may not know yet
        assert thread.is_alive()
        assert readiness.drain_delay_left(lc) == 4  # until the bound, unless a probe is answered
        assert probe(probes.port, "/readyz") == (503, "not ready")
        assert readiness.drain_delay_left(lc) == pytest.approx(AUTO_QUIET)
        clock.advance(AUTO_QUIET)
        thread.join(BOUND)
        assert waited == [pytest.approx(1 + AUTO_QUIET)]
    assert drain_delay_of(lc).ended_why == f"no new request for {AUTO_QUIET:g} s, a probe answered 503"
    release.set()
    assert lc.wait_for_shutdown(BOUND)


@pytest.mark.timeout(30)
def test_a_503_answered_before_the_wrap_up_does_not_count() -> None:
    """/readyz says 503 before the service is ready too: that tells the balancer nothing."""
    clock = FakeClock()
    lc = Lifecycle(force_quit=60, clock=clock, exit=Recorder())
    readiness.set_drain_delay("auto:5", lc)
    with readiness.serve_probes(0, lifecycle=lc) as probes:
        assert probe(probes.port, "/readyz") == (503, "not ready")  # start-up
        lc.shutdown("test", wait=False)
        assert readiness.drain_delay_left(lc) == 5
    assert lc.wait_for_shutdown(BOUND)


@pytest.mark.timeout(30)
def test_auto_ends_at_its_bound_and_says_so() -> None:
    """Probes served and never asked: the wait ends at MAX, and the reason says it."""
    clock = FakeClock()
    lc, release = stopping(clock, "auto:2")
    with readiness.serve_probes(0, lifecycle=lc):
        thread, waited = waiting(lc)
        clock.advance(2)
        thread.join(BOUND)
    assert waited == [2]
    assert drain_delay_of(lc).ended_why == "at its maximum of auto:2"
    release.set()
    assert lc.wait_for_shutdown(BOUND)


@pytest.mark.timeout(30)
def test_auto_is_bounded_by_the_budget_left() -> None:
    """A bound longer than the budget: the budget wins, and the reason says so."""
    clock = FakeClock()
    lc, release = stopping(clock, "auto:60", force_quit=10)
    with readiness.serve_probes(0, lifecycle=lc):
        assert readiness.drain_delay_left(lc) == 10
        clock.advance(10)
        assert readiness.drain_delay_left(lc) == 0
    assert drain_delay_of(lc).ended_why == "the force-quit budget ran out"
    release.set()


@pytest.mark.timeout(30)
def test_the_async_wait_wakes_on_a_probe_answered_503() -> None:
    """On an event loop: the wait sleeps on the loop and a 503 answered from the probe thread wakes it."""
    lc = Lifecycle(force_quit=60, exit=Recorder())
    readiness.set_drain_delay("auto:30", lc)
    release = threading.Event()
    lc.add_wrap_up_listener(release.wait, name="held")
    with readiness.serve_probes(0, lifecycle=lc) as probes:
        lc.shutdown("test", wait=False)

        async def main() -> float:
            waiting = asyncio.ensure_future(readiness.wait_drain_delay_async(lc))
            await asyncio.sleep(0)  # the wait has registered its wake-up
            assert not waiting.done()
            status = await asyncio.get_running_loop().run_in_executor(None, probe, probes.port, "/readyz")
            assert status == (503, "not ready")
            return await asyncio.wait_for(waiting, BOUND)

        waited = asyncio.run(main())
    assert 0 < waited < 30
    assert drain_delay_of(lc).ended_why == f"no new request for {AUTO_QUIET:g} s, a probe answered 503"
    release.set()
    assert lc.wait_for_shutdown(BOUND)


@pytest.mark.timeout(60)
def test_a_real_server_serves_until_its_probe_says_503_then_drains_and_exits_0(
    graceful_process: ProcessFactory,
) -> None:
    """graceful.run(ThreadingHTTPServer), auto:30, SIGTERM: still serving, then a probe's 503 ends it."""
    probe_port = free_port()
    env = {
        "GRACEFUL_PROBE_PORT": str(probe_port),
        "GRACEFUL_PROBE_HOST": "127.0.0.1",
        "GRACEFUL_DRAIN_DELAY": "auto:30",
        "GRACEFUL_FORCE_QUIT": "60",
    }
    child = graceful_process(SERVICE, env=env)
    port = int(child.wait_for_line("port").split()[1])
    child.wait_for_output("server(s) started: ready", stream="stderr")
    child.send_signal(signal.SIGTERM)
    child.wait_for_output(
        "drain delay (auto): serving until the balancer stops sending, at most 30.0 s", stream="stderr"
    )
    for _ in range(3):  # no probe answered 503 yet: the balancer may still send, so it serves
        assert get(port, "/")[:2] == (200, "ok")
    assert probe(probe_port, "/readyz") == (503, "not ready")
    child.wait_for_output("drain delay over after", stream="stderr")
    assert child.wait().returncode == 0
    assert (
        f"(no new request for {AUTO_QUIET:g} s, a probe answered 503): the servers stop accepting"
        in child.stderr
    )
