"""Readiness, the probe endpoint, the drain delay and the platform-grace warning."""

from __future__ import annotations

import http.client
import logging
import re
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import graceful
from graceful import Lifecycle, readiness
from graceful._deadline import FakeClock
from graceful._settings import Settings
from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT, Recorder
from .support.web import free_port, get, refused_within


def probe(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """One probe on a new connection, as the kubelet sends it: status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    try:
        conn.request(method, path)
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
    graceful_process: ProcessFactory,
) -> None:
    probe_port = free_port()
    env = {
        "GRACEFUL_PROBE_PORT": str(probe_port),
        "GRACEFUL_PROBE_HOST": "127.0.0.1",
        "GRACEFUL_DRAIN_DELAY": "3",
    }
    child = graceful_process(SERVICE, env=env)
    port = int(child.wait_for_line("port").split()[1])
    child.wait_for_output("server(s) started: ready", stream="stderr")
    assert probe(probe_port, "/readyz") == (200, "ready")
    assert probe(probe_port, "/livez") == (200, "live")
    assert probe(probe_port, "/other")[0] == 404
    child.send_signal(signal.SIGTERM)
    child.wait_for_output("wrapping up", stream="stderr")
    assert probe(probe_port, "/readyz") == (503, "not ready")  # from the start of wrap-up
    assert probe(probe_port, "/livez") == (200, "live")  # draining is alive
    assert get(port, "/")[:2] == (200, "ok")  # still serving during the drain delay
    child.wait_for_output("stopped accepting", stream="stderr")
    refused_within(port)
    assert child.wait().returncode == 0


@pytest.mark.timeout(30)
def test_run_is_ready_before_it_logs_that_it_is(fresh: Lifecycle) -> None:
    """Whoever reads the "ready" line and probes at once gets ready, never the flag not yet set."""
    seen: list[bool] = []

    class AtTheReadyLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "started: ready" in record.getMessage():
                seen.append(readiness.is_ready(fresh))
                fresh.shutdown("test", wait=False)

    logger, handler = logging.getLogger("graceful"), AtTheReadyLine()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        assert graceful.run(lambda: fresh.wait_for_wrap_up(BOUND), handle_signals=False) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == [True]


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
    refused_within(server.port)


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
    with pytest.raises(ValueError, match="finite number of seconds 0 or more"):
        readiness.set_drain_delay(bad, Lifecycle())
    with pytest.raises(TypeError, match="number of seconds"):
        readiness.set_drain_delay("5", Lifecycle())  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_the_probes_example_turns_not_ready_keeps_serving_through_the_delay_then_drains(
    graceful_process: ProcessFactory,
) -> None:
    code = f"import runpy; runpy.run_path({str(ROOT / 'examples' / 'probes.py')!r}, run_name='__main__')"
    child = graceful_process(code, env={"PORT": "0", "PROBE_PORT": "0", "DRAIN_DELAY": "2"})
    child.wait_for_output("server(s) started: ready", stream="stderr")
    found = re.search(
        r"app on http://127.0.0.1:(\d+)/, probes on http://127.0.0.1:(\d+)/readyz", child.stderr
    )
    assert found is not None, child.stderr
    port, probe_port = int(found.group(1)), int(found.group(2))
    assert probe(probe_port, "/readyz") == (200, "ready")
    assert probe(probe_port, "/readyz", "HEAD") == (200, "")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get, port, "/slow")
        child.wait_for_output("working on /slow", stream="stderr")  # in flight
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("wrapping up", stream="stderr")
        assert probe(probe_port, "/readyz") == (503, "not ready")  # from the start of wrap-up
        assert probe(probe_port, "/livez") == (200, "live")
        for _ in range(3):  # the drain delay: new connections are still answered
            assert get(port, "/")[:2] == (200, "hello from /\n")
        child.wait_for_output("stopped accepting", stream="stderr")
        refused_within(port)
        assert slow.result(BOUND)[:2] == (200, "hello from /slow\n")  # in flight: finished
    assert child.wait().returncode == 0
    refused_within(probe_port)  # closed once run() returned


def test_probes_answer_from_the_state_at_each_request() -> None:
    lc = Lifecycle(force_quit=BOUND, exit=Recorder())
    with readiness.serve_probes(0, lifecycle=lc) as server:
        assert probe(server.port, "/readyz") == (503, "not ready")  # not started yet
        assert probe(server.port, "/livez?verbose") == (200, "live")
        readiness.set_ready(lc)
        assert probe(server.port, "/readyz?verbose") == (200, "ready")
        lc.wrap_up("pause")  # a pause: not ready, alive
        assert probe(server.port, "/readyz") == (503, "not ready")
        assert probe(server.port, "/livez", "HEAD") == (200, "")
        assert lc.shutdown("test", timeout=BOUND)
        assert probe(server.port, "/livez") == (503, "stopped")
        assert repr(server) == f"<graceful.readiness.ProbeServer 127.0.0.1:{server.port}>"


def test_a_probe_port_in_use_is_a_runtime_error_that_says_what_to_do() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match=r"cannot answer probes on 127\.0\.0\.1:.*GRACEFUL_PROBE_PORT"):
            readiness.serve_probes(taken.getsockname()[1])


def test_a_grace_shorter_than_the_budget_and_the_flush_slice_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lc = Lifecycle(force_quit=25)
    monkeypatch.setenv("GRACEFUL_DRAIN_DELAY", "10")
    monkeypatch.setenv("GRACEFUL_TERMINATION_GRACE", "25")
    warning = readiness.check_platform_grace(lc)
    assert warning is not None
    assert "end 26 s after SIGTERM, not before the platform's grace of 25 s" in caplog.text
    monkeypatch.setenv("GRACEFUL_TERMINATION_GRACE", "27")  # the drain delay is inside the budget
    assert readiness.check_platform_grace(lc) is None
    monkeypatch.setenv("GRACEFUL_TIMEOUT_STOP_SEC", "20")  # the shorter of the two counts
    assert readiness.check_platform_grace(lc) is not None
    monkeypatch.delenv("GRACEFUL_TERMINATION_GRACE")
    monkeypatch.delenv("GRACEFUL_TIMEOUT_STOP_SEC")
    assert readiness.check_platform_grace(lc) is None


@pytest.mark.parametrize(
    ("timeout_stop_sec", "warned"),
    [("20", True), ("1min 30s", False), ("25s", True), ("500ms", True), ("infinity", False), ("0", False)],
)
def test_timeout_stop_sec_takes_systemds_time_spans(
    monkeypatch: pytest.MonkeyPatch, timeout_stop_sec: str, *, warned: bool
) -> None:
    monkeypatch.delenv("GRACEFUL_DRAIN_DELAY", raising=False)
    monkeypatch.delenv("GRACEFUL_TERMINATION_GRACE", raising=False)
    monkeypatch.setenv("GRACEFUL_TIMEOUT_STOP_SEC", timeout_stop_sec)
    warning = readiness.check_platform_grace(Lifecycle(force_quit=25))
    assert (warning is not None) is warned
    if warning is not None:
        assert "systemd's TimeoutStopSec (GRACEFUL_TIMEOUT_STOP_SEC)" in warning


def test_a_zero_termination_grace_is_always_too_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRACEFUL_TIMEOUT_STOP_SEC", raising=False)
    monkeypatch.setenv("GRACEFUL_TERMINATION_GRACE", "0")
    warning = readiness.check_platform_grace(Lifecycle(force_quit=1))
    assert warning is not None
    assert "Kubernetes' terminationGracePeriodSeconds" in warning


@pytest.mark.timeout(60)
def test_run_warns_once_at_start_when_the_grace_is_too_short(graceful_process: ProcessFactory) -> None:
    env = {"GRACEFUL_TERMINATION_GRACE": "20", "GRACEFUL_DRAIN_DELAY": "1", "GRACEFUL_FORCE_QUIT": "25"}
    child = graceful_process(SERVICE, env=env)
    child.wait_for_output("server(s) started: ready", stream="stderr")
    assert (
        child.stderr.count("WARNING graceful the force-quit budget (25 s) and the last flush slice (1 s)")
        == 1
    )
    assert "not before the platform's grace of 20 s" in child.stderr
    assert child.stderr.index("platform's grace") < child.stderr.index("server(s) started")  # at start
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    assert child.stderr.count("platform's grace") == 1


def test_bad_probe_settings_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="port number"):
        readiness.serve_probes(70000)
    monkeypatch.setenv("GRACEFUL_PROBE_PORT", "http")
    with pytest.raises(ValueError, match="GRACEFUL_PROBE_PORT"):
        Settings.read()
    monkeypatch.delenv("GRACEFUL_PROBE_PORT")
    monkeypatch.setenv("GRACEFUL_TERMINATION_GRACE", "half a minute")
    with pytest.raises(ValueError, match=r"GRACEFUL_TERMINATION_GRACE.*terminationGracePeriodSeconds"):
        readiness.check_platform_grace(Lifecycle())
    monkeypatch.delenv("GRACEFUL_TERMINATION_GRACE")
    monkeypatch.setenv("GRACEFUL_TIMEOUT_STOP_SEC", "90 parsecs")
    with pytest.raises(ValueError, match=r"GRACEFUL_TIMEOUT_STOP_SEC.*1min 30s, infinity"):
        readiness.check_platform_grace(Lifecycle())


def test_the_default_lifecycle_is_used_when_none_is_given(fresh: Lifecycle) -> None:
    readiness.set_ready()
    assert readiness.is_ready() is graceful.readiness.is_ready(fresh) is True
