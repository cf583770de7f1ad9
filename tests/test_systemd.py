"""sd_notify against a real datagram socket peer: the exact messages, in order, and the watchdog."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import graceful
from graceful import systemd
from graceful._deadline import FakeClock
from graceful.lowlevel import progress
from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT, Recorder

SERVICE = r"""
import logging, sys, threading
import graceful

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
stop = threading.Event()

# The test's words on stdin, one reader: each waiting thread waits for its own word, so two
# threads blocked at once (a stuck coordinator and a held drain) never take each other's line.
said, said_lock = {}, threading.Lock()

def word(text):
    with said_lock:
        return said.setdefault(text, threading.Event())

def read_stdin():
    for line in sys.stdin:
        word(line.strip()).set()

threading.Thread(target=read_stdin, name="test-stdin", daemon=True).start()

def stop_serving():
    stop.set()
    if "hold-drain" in sys.argv:
        print("draining", flush=True)
        word("drained").wait()  # the drain goes on until the test says so

graceful.add_wrap_up_listener(stop_serving, name="stop-serving")
def close_pool():
    if "hold-close" in sys.argv:
        word("closed").wait()  # past the wrap-up timeout, a stuck close is what meets the deadline

graceful.add_shutdown_listener(close_pool, name="close-pool")

def reload():
    if "block-reload" in sys.argv:
        print("reload blocking", flush=True)
        word("unblock").wait()  # the coordinator thread runs reload listeners: it is stuck here
    print("reloaded", flush=True)

if "no-reload" not in sys.argv:
    graceful.add_reload_listener(reload, name="reload-config")

class StuckFilter(logging.Filter):
    # blocks the signal coordinator's first log line, as a log handler that hangs would
    # (a filter, not a handler: it holds no lock the other threads' lines need)
    done = False

    def filter(self, record):
        if threading.current_thread().name == "graceful-signals" and not self.done:
            self.done = True
            print("coordinator stuck in logging", flush=True)
            word("go on").wait()
        return True

if "stuck-log" in sys.argv:
    logging.getLogger("graceful").addFilter(StuckFilter())

def serve():
    stop.wait()

sys.exit(graceful.run(serve, force_quit=float(sys.argv[-1]) if sys.argv[-1][0].isdigit() else None))
"""


def service(*flags: str) -> str:
    """SERVICE with these flags; the tests start it with ``graceful_process(..., wait_ready=False)``
    and ``NOTIFY_SOCKET`` in ``env``: the peer its messages go to is the test's own."""
    return f"import sys; sys.argv.extend({list(flags)!r})\n" + SERVICE


class Peer:
    """A systemd stand-in: a datagram socket that records every message with its arrival time."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            item = (time.monotonic(), data.decode())
            self.seen.append(item)
            self.messages.put(item)

    def next(self, *, pings: bool = False, timeout: float = BOUND) -> tuple[float, str]:
        """The next message other than a ``WATCHDOG=1`` ping; with ``pings``, the next ping."""
        while True:
            try:
                item = self.messages.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no message within {timeout} s; got {self.seen}") from None
            if pings == (item[1] == "WATCHDOG=1"):
                return item

    def expect(self, prefix: str) -> tuple[float, str]:
        """The next message, which must start with ``prefix`` (pings and the rest kept apart)."""
        item = self.next(pings=prefix.startswith("WATCHDOG"))
        assert item[1].startswith(prefix), (prefix, self.seen)
        return item

    def wait_for(self, prefix: str) -> None:
        """Skip messages until one starting with ``prefix`` has come (then ``seen`` has it)."""
        while not self.next(pings=prefix.startswith("WATCHDOG"))[1].startswith(prefix):
            pass

    def none_within(self, seconds: float, *, pings: bool = False) -> None:
        """Assert that no message (no ping, with ``pings``) arrives for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                _, message = self.messages.get(timeout=left)
            except queue.Empty:
                return
            is_ping = message == "WATCHDOG=1"
            assert is_ping != pings, f"unexpected {message!r} within {seconds} s"

    def drain(self) -> None:
        """Forget the messages received so far (they stay in ``seen``)."""
        while not self.messages.empty():
            self.messages.get_nowait()

    def pings(self) -> list[float]:
        return [at for at, message in self.seen if message == "WATCHDOG=1"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(BOUND)
        self.sock.close()


def _abstract_name() -> str:
    return f"graceful-test-{os.getpid()}-{time.monotonic_ns()}"


@pytest.fixture(params=["path", "abstract"])
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Peer, str]]:
    """A peer on a filesystem path or an abstract address, and the NOTIFY_SOCKET value for it."""
    if request.param == "path":
        address = env_value = str(tmp_path / "notify.sock")
    else:
        name = _abstract_name()
        address, env_value = "\0" + name, "@" + name
    p = Peer(address)
    yield p, env_value
    p.close()


@pytest.fixture
def path_peer(tmp_path: Path) -> Iterator[tuple[Peer, str]]:
    p = Peer(str(tmp_path / "notify.sock"))
    yield p, str(tmp_path / "notify.sock")
    p.close()


def _messages(p: Peer) -> list[str]:
    return [m for _, m in p.seen if m != "WATCHDOG=1"]


@pytest.mark.timeout(60)
def test_start_reload_shutdown_messages_in_order(
    graceful_process: ProcessFactory, peer: tuple[Peer, str]
) -> None:
    p, notify_socket = peer
    child = graceful_process(service(), env={"NOTIFY_SOCKET": notify_socket}, wait_ready=False, stdin=True)
    p.expect("READY=1")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    child.send_signal(signal.SIGHUP)
    reloading = p.expect("RELOADING=1")[1]
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    p.expect("READY=1")
    child.wait_for_line("reloaded")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    p.wait_for("STATUS=stopped")
    monotonic_usec = int(reloading.split("\n")[1].removeprefix("MONOTONIC_USEC="))
    assert before <= monotonic_usec <= after  # CLOCK_MONOTONIC, in µs, taken after SIGHUP came
    stopped = _messages(p)[-1]
    assert re.fullmatch(r"STATUS=stopped \(\d+\.\d{3} s after SIGTERM\)", stopped), stopped
    assert _messages(p) == [
        "READY=1\nSTATUS=serving (1 server(s))",
        f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS=reloading (SIGHUP)",
        "READY=1\nSTATUS=serving (reloaded)",
        "STOPPING=1\nSTATUS=wrapping up (SIGTERM)",
        "EXTEND_TIMEOUT_USEC=10000000",  # twice EXTEND_EVERY: the start counts as progress
        "STATUS=shutting down",
        stopped,
    ]


@pytest.mark.timeout(60)
def test_a_pause_is_not_stopping_until_the_shutdown_comes(
    graceful_process: ProcessFactory, path_peer: tuple[Peer, str]
) -> None:
    """TSTP, HUP, TERM (the worker unit's ExecStop): STOPPING=1 only with TERM.

    From a running service STOPPING=1 means "as if SIGTERMed" to systemd, which would SIGKILL
    the paused process when TimeoutStopSec ran out.
    """
    p, notify_socket = path_peer
    child = graceful_process(service(), env={"NOTIFY_SOCKET": notify_socket}, wait_ready=False, stdin=True)
    p.expect("READY=1")
    child.send_signal(signal.SIGTSTP)
    assert p.expect("STATUS=paused")[1] == (
        "STATUS=paused (SIGTSTP): not taking new work; SIGTERM stops the service"
    )
    child.wait_for_output("wrap_up phase done", stream="stderr")
    child.send_signal(signal.SIGHUP)  # a reload while paused (Type=notify-reload)
    assert p.expect("RELOADING=1")[1].endswith("\nSTATUS=reloading (SIGHUP)")
    assert p.expect("READY=1")[1] == "READY=1\nSTATUS=paused (reloaded)"
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    p.wait_for("STATUS=stopped")
    assert _messages(p)[4:-1] == [
        "STOPPING=1\nSTATUS=wrapping up (SIGTERM)",
        "EXTEND_TIMEOUT_USEC=10000000",
        "STATUS=shutting down",
    ]
    assert not any(m.startswith("STOPPING=1") for m in _messages(p)[:4])


@pytest.mark.timeout(60)
def test_hup_without_reload_listeners_is_a_graceful_stop(
    graceful_process: ProcessFactory, path_peer: tuple[Peer, str]
) -> None:
    """No reload listener: SIGHUP (a closed terminal) stops the service, STOPPING=1 first."""
    p, notify_socket = path_peer
    child = graceful_process(
        service("no-reload"), env={"NOTIFY_SOCKET": notify_socket}, wait_ready=False, stdin=True
    )
    p.expect("READY=1")
    child.send_signal(signal.SIGHUP)
    assert p.expect("STOPPING=1")[1] == "STOPPING=1\nSTATUS=wrapping up (SIGHUP)"
    assert child.wait().returncode == 0
    assert not any(m.startswith("RELOADING=1") for m in _messages(p))


@pytest.mark.timeout(60)
def test_a_forced_exit_says_why_in_the_status(
    graceful_process: ProcessFactory, path_peer: tuple[Peer, str]
) -> None:
    p, notify_socket = path_peer
    child = graceful_process(
        service("hold-drain", "hold-close", "0.5"),
        env={"NOTIFY_SOCKET": notify_socket},
        wait_ready=False,
        stdin=True,
    )
    p.expect("READY=1")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 70
    p.wait_for("STATUS=forced")
    messages = _messages(p)
    stopping, extend, forced = messages[1], messages[2], messages[-1]
    assert "STATUS=shutting down" in messages  # the stuck drain was abandoned; the close is stuck
    assert stopping == "STOPPING=1\nSTATUS=wrapping up (SIGTERM)"
    assert 5_000_000 < int(extend.removeprefix("EXTEND_TIMEOUT_USEC=")) <= 5_500_000  # never past
    assert forced == "STATUS=forced: the force-quit deadline of 0.5 s passed"  # the deadline + 5 s


@pytest.mark.timeout(60)
def test_watchdog_pings_at_half_the_interval_and_through_a_drain(
    graceful_process: ProcessFactory, path_peer: tuple[Peer, str]
) -> None:
    p, notify_socket = path_peer
    child = graceful_process(
        service("hold-drain"),
        env={"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000"},
        wait_ready=False,
        stdin=True,
    )
    p.expect("READY=1")
    first = p.expect("WATCHDOG=1")[0]
    while p.expect("WATCHDOG=1")[0] < first + 1.0:  # a one-second window, by the peer's clock
        pass
    in_window = [at for at in p.pings() if first <= at <= first + 1.0]
    assert 5 <= len(in_window) <= 12, in_window  # one every 0.1 s: 11 counting both ends
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("draining")  # a healthy drain: the coordinator answers, the pings go on
    start = p.expect("WATCHDOG=1")[0]
    while p.expect("WATCHDOG=1")[0] < start + 0.5:
        pass
    child.send_line("drained")
    assert child.wait().returncode == 0


@pytest.mark.timeout(60)
def test_watchdog_honours_watchdog_pid(graceful_process: ProcessFactory, path_peer: tuple[Peer, str]) -> None:
    """WATCHDOG_PID names another process: this one does not ping."""
    p, notify_socket = path_peer
    env = {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    child = graceful_process(service(), env=env, wait_ready=False, stdin=True)
    p.expect("READY=1")
    p.none_within(1.0, pings=True)  # ten intervals
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    assert p.pings() == []


@pytest.mark.timeout(60)
def test_watchdog_stops_while_the_coordinator_is_stuck(
    graceful_process: ProcessFactory, path_peer: tuple[Peer, str]
) -> None:
    """A coordinator stuck in a log handler stops WATCHDOG=1 until it answers again."""
    p, notify_socket = path_peer
    env = {"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000"}
    child = graceful_process(service("stuck-log", "hold-drain"), env=env, wait_ready=False, stdin=True)
    p.expect("READY=1")
    p.expect("WATCHDOG=1")
    child.send_signal(signal.SIGTERM)  # the coordinator logs "received SIGTERM": the handler blocks it
    child.wait_for_line("coordinator stuck in logging")
    child.wait_for_output("has not answered", stream="stderr")
    p.drain()  # the pings sent before the coordinator got stuck
    p.none_within(1.0, pings=True)  # five times WATCHDOG_USEC: systemd would have acted
    child.send_line("go on")
    child.wait_for_output("answers again: WATCHDOG=1 resumes", stream="stderr")
    p.expect("WATCHDOG=1")  # the pings resume
    child.send_line("drained")
    assert child.wait().returncode == 0


@pytest.mark.timeout(60)
def test_the_docs_own_loop_program_tells_systemd_the_same(
    graceful_process: ProcessFactory, path_peer: tuple[Peer, str]
) -> None:
    """docs/systemd.md's program without run(): SystemdNotifier inside signal_handlers()."""
    page = (ROOT / "docs" / "systemd.md").read_text()
    found = re.search(r"```python\n# own_loop.py\n(.*?)```", page, flags=re.DOTALL)
    assert found is not None
    p, notify_socket = path_peer
    child = graceful_process(
        found.group(1), env={"NOTIFY_SOCKET": notify_socket}, wait_ready=False, stdin=True
    )
    p.expect("READY=1")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    p.wait_for("STATUS=stopped")
    assert _messages(p)[:-1] == [
        "READY=1\nSTATUS=working",
        "STOPPING=1\nSTATUS=wrapping up (SIGTERM)",
        "EXTEND_TIMEOUT_USEC=10000000",
        "STATUS=shutting down",
    ]
    assert re.fullmatch(r"STATUS=stopped \(\d+\.\d{3} s after SIGTERM\)", _messages(p)[-1])


def test_notify_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert systemd.notify("READY=1") is False  # logged at DEBUG, never raised


def test_notify_sends_one_datagram_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = _abstract_name()
    p = Peer("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STATUS=one", "STATUS=two") is True
        assert p.next()[1] == "STATUS=one\nSTATUS=two"
        assert systemd.notify() is False  # nothing to say
    finally:
        p.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [("", "", None), ("2000000", "", 1.0), ("2000000", "1", None), ("abc", "", None), ("0", "", None)],
)
def test_watchdog_interval_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, usec: str, pid: str, expected: float | None
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.setenv("WATCHDOG_PID", pid)
    assert systemd.watchdog_interval() == expected
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == (expected if pid == "" else 1.0)


def test_the_timeout_is_extended_only_while_the_drain_progresses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In-process, checks every 0.05 s: listeners finishing and report_progress() are progress."""
    address = str(tmp_path / "n.sock")
    p = Peer(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.setattr(systemd, "EXTEND_EVERY", 0.05)
    lifecycle = graceful.Lifecycle(force_quit=BOUND, exit=Recorder())
    first, second, stuck = threading.Event(), threading.Event(), threading.Event()
    lifecycle.add_wrap_up_listener(first.wait, name="first")
    lifecycle.add_wrap_up_listener(second.wait, name="second")
    lifecycle.add_wrap_up_listener(stuck.wait, name="stuck")
    notifier = systemd.SystemdNotifier(lifecycle)
    try:
        lifecycle.shutdown("test", wait=False)
        p.expect("STOPPING=1")
        assert p.next()[1] == "EXTEND_TIMEOUT_USEC=100000"  # at the start of the shutdown
        p.none_within(0.3)  # six checks, nothing finished: no extension
        first.set()
        assert p.next()[1] == "EXTEND_TIMEOUT_USEC=100000\nSTATUS=wrapping up: 1 of 3 listener(s) done"
        p.none_within(0.3)
        systemd.report_progress(lifecycle)  # a request answered, say
        assert p.next()[1] == "EXTEND_TIMEOUT_USEC=100000\nSTATUS=wrapping up: 1 of 3 listener(s) done"
        p.none_within(0.3)
        second.set()
        assert p.next()[1].endswith("\nSTATUS=wrapping up: 2 of 3 listener(s) done")
        p.none_within(0.3)
    finally:
        for event in (first, second, stuck):
            event.set()
        assert lifecycle.wait_for_shutdown(BOUND)
        notifier.close()
        notifier.close()  # idempotent
        p.close()
    systemd.report_progress(lifecycle)  # no notifier any more: a no-op


def test_an_extension_never_reaches_past_the_deadline_plus_the_margin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    address = str(tmp_path / "n.sock")
    p = Peer(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    clock = FakeClock()
    lifecycle = graceful.Lifecycle(force_quit=3, clock=clock, exit=Recorder())
    release = threading.Event()
    lifecycle.add_wrap_up_listener(release.wait, name="held")
    with systemd.SystemdNotifier(lifecycle):
        lifecycle.shutdown("test", wait=False)
        p.expect("STOPPING=1")
        assert p.next()[1] == "EXTEND_TIMEOUT_USEC=8000000"  # 3 s left + 5 s margin < 10 s
        release.set()
        assert lifecycle.wait_for_shutdown(BOUND)
    p.close()


def test_report_progress_without_a_notifier_is_a_no_op(fresh: graceful.Lifecycle) -> None:
    systemd.report_progress()  # the default lifecycle, not under systemd
    systemd.report_progress(fresh)


def test_a_request_ending_during_the_drain_is_reported_as_progress(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The web and gRPC adapters' in-flight registry tells the notifier as each request ends."""
    from graceful.adapters._inflight import InFlight, Request

    address = str(tmp_path / "progress.sock")
    p = Peer(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    lifecycle = graceful.Lifecycle(force_quit=BOUND, exit=Recorder())
    notifier = systemd.SystemdNotifier(lifecycle)
    in_flight = InFlight("web")
    in_flight.lifecycle = lifecycle
    try:
        in_flight.add("before", Request("GET", "/", "test"))
        in_flight.discard("before")
        assert progress(lifecycle) == 0  # serving as usual: nothing to report
        lifecycle.wrap_up("drain")
        in_flight.add("during", Request("GET", "/", "test"))
        in_flight.discard("during")
        in_flight.discard("during")  # gone already: no second report
        assert progress(lifecycle) == 1
    finally:
        lifecycle.shutdown("test", wait=False)
        assert lifecycle.wait_for_shutdown(BOUND)
        notifier.close()
        p.close()
