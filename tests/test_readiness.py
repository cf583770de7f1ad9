"""Readiness, the probe endpoint, the drain delay and the platform-grace warning."""

from __future__ import annotations

import http.client
import signal
import threading

import pytest

import graceful
from graceful import Lifecycle, readiness
from graceful._clock import FakeClock

from .child import Child
from .conftest import BOUND, Recorder
from .web import free_port, get, refused_within


def probe(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode().strip()
    finally:
        conn.close()


SERVICE = r"""
import logging, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import graceful

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
print("port", server.server_address[1], flush=True)
sys.exit(graceful.run(server))
"""


@pytest.mark.timeout(60)
def test_probes_say_ready_then_not_ready_from_wrap_up_and_serving_goes_on_during_the_delay(
    children: list[Child],
) -> None:
    probe_port = free_port()
    env = {
        "GRACEFUL_PROBE_PORT": str(probe_port),
        "GRACEFUL_PROBE_HOST": "127.0.0.1",
        "GRACEFUL_DRAIN_DELAY": "3",
    }
    child = Child(SERVICE, env=env)
    children.append(child)
    port = int(child.expect("port").split()[1])
    child.expect_err("server(s) started: ready")
    assert probe(probe_port, "/readyz") == (200, "ready")
    assert probe(probe_port, "/livez") == (200, "live")
    assert probe(probe_port, "/other")[0] == 404
    child.send(signal.SIGTERM)
    child.expect_err("wrapping up")
    assert probe(probe_port, "/readyz") == (503, "not ready")  # from the start of wrap-up
    assert probe(probe_port, "/livez") == (200, "live")  # draining is alive
    assert get(port, "/")[:2] == (200, "ok")  # still serving during the drain delay
    child.expect_err("stopped accepting")
    assert refused_within(port) < 0.1
    assert child.wait() == 0


def test_ready_and_live_follow_the_lifecycle() -> None:
    lc = Lifecycle(force_quit=BOUND, exit=Recorder())
    assert not readiness.is_ready(lc)  # nothing said it is up yet
    readiness.set_ready(lc)
    assert readiness.is_ready(lc)
    assert readiness.is_live(lc)
    lc.shutdown("test")
    assert not readiness.is_ready(lc)
    assert not readiness.is_live(lc)


def test_serve_probes_on_a_free_port_answers_and_closes() -> None:
    lc = Lifecycle(force_quit=BOUND, exit=Recorder())
    server = readiness.serve_probes(0, lifecycle=lc)
    try:
        assert probe(server.port, "/readyz") == (503, "not ready")
        readiness.set_ready(lc)
        assert probe(server.port, "/readyz") == (200, "ready")
    finally:
        server.close()
        server.close()  # idempotent
    assert refused_within(server.port) < 0.1


def test_the_drain_delay_counts_from_the_first_wrap_up_and_is_bounded_by_the_budget() -> None:
    clock = FakeClock()
    lc = Lifecycle(force_quit=10, clock=clock, exit=Recorder())
    readiness.set_drain_delay(4, lc)
    assert readiness.drain_delay(lc) == 4
    assert readiness.drain_delay_left(lc) == 0  # no wrap-up yet
    release = threading.Event()
    lc.add_wrap_up_listener(release.wait, name="held")
    lc.shutdown("test", wait=False)
    clock.advance(1)
    assert readiness.drain_delay_left(lc) == 3
    waited: list[float] = []
    waiter = threading.Thread(target=lambda: waited.append(readiness.wait_drain_delay(lc)))
    waiter.start()
    clock.advance(3)  # the fake clock fires the delay's timer
    waiter.join(BOUND)
    assert waited == [3]
    readiness.set_drain_delay(60, lc)  # longer than the 10 s budget: the budget wins
    assert readiness.drain_delay_left(lc) == 6
    release.set()
    assert lc.wait_for_shutdown(BOUND)


def test_the_drain_delay_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRACEFUL_DRAIN_DELAY", "2.5")
    assert readiness.drain_delay(Lifecycle()) == 2.5
    monkeypatch.setenv("GRACEFUL_DRAIN_DELAY", "soon")
    with pytest.raises(ValueError, match="GRACEFUL_DRAIN_DELAY"):
        readiness.drain_delay(Lifecycle())


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_a_bad_drain_delay_says_what_is_accepted(bad: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds, 0 or more"):
        readiness.set_drain_delay(bad, Lifecycle())
    with pytest.raises(TypeError, match="number of seconds"):
        readiness.set_drain_delay("5", Lifecycle())  # type: ignore[arg-type]


def test_a_grace_shorter_than_delay_plus_budget_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lc = Lifecycle(force_quit=25)
    monkeypatch.setenv("GRACEFUL_DRAIN_DELAY", "10")
    monkeypatch.setenv("GRACEFUL_TERMINATION_GRACE", "30")
    warning = readiness.check_platform_grace(lc)
    assert warning is not None
    assert "35 s, not less than the platform's grace of 30 s" in caplog.text
    monkeypatch.setenv("GRACEFUL_TERMINATION_GRACE", "60")
    assert readiness.check_platform_grace(lc) is None
    monkeypatch.setenv("GRACEFUL_TIMEOUT_STOP_SEC", "20")  # the shorter of the two counts
    assert readiness.check_platform_grace(lc) is not None
    monkeypatch.delenv("GRACEFUL_TERMINATION_GRACE")
    monkeypatch.delenv("GRACEFUL_TIMEOUT_STOP_SEC")
    assert readiness.check_platform_grace(lc) is None


def test_bad_probe_settings_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="port number"):
        readiness.serve_probes(70000)
    monkeypatch.setenv("GRACEFUL_PROBE_PORT", "http")
    with pytest.raises(ValueError, match="GRACEFUL_PROBE_PORT"):
        readiness.probe_port_from_env()
    monkeypatch.setenv("GRACEFUL_TERMINATION_GRACE", "half a minute")
    with pytest.raises(ValueError, match="GRACEFUL_TERMINATION_GRACE"):
        readiness.check_platform_grace(Lifecycle())


def test_the_default_lifecycle_is_used_when_none_is_given(fresh: Lifecycle) -> None:
    readiness.set_ready()
    assert readiness.is_ready() is graceful.readiness.is_ready(fresh) is True
