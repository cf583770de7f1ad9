"""sd_notify against a real datagram socket peer: the exact messages, in order, and the watchdog."""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import graceful
from graceful import systemd

from .child import Child
from .conftest import BOUND

SERVICE = r"""
import logging, sys, threading
import graceful

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
stop = threading.Event()
graceful.add_wrap_up_listener(stop.set, name="stop-serving")
graceful.add_shutdown_listener(lambda: None, name="close-pool")

def reload():
    if "block-reload" in sys.argv:
        sys.stdin.readline()  # the coordinator thread runs reload listeners: it is stuck here
    print("reloaded", flush=True)

graceful.add_reload_listener(reload, name="reload-config")

def serve():
    stop.wait()

sys.exit(graceful.run(serve))
"""


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

    def expect(self, prefix: str) -> tuple[float, str]:
        """The next message, which must start with ``prefix`` (WATCHDOG=1 pings skipped)."""
        while True:
            try:
                item = self.messages.get(timeout=BOUND)
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} within {BOUND} s; got {self.seen}") from None
            if item[1] == "WATCHDOG=1" and not prefix.startswith("WATCHDOG"):
                continue
            assert item[1].startswith(prefix), (prefix, self.seen)
            return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(BOUND)
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Peer, str]]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        env_value = address
    else:
        name = f"graceful-test-{os.getpid()}-{time.monotonic_ns()}"
        address, env_value = "\0" + name, "@" + name
    p = Peer(address)
    yield p, env_value
    p.close()


@pytest.mark.timeout(60)
def test_start_reload_shutdown_messages_in_order(children: list[Child], peer: tuple[Peer, str]) -> None:
    p, notify_socket = peer
    child = Child(SERVICE, env={"NOTIFY_SOCKET": notify_socket})
    children.append(child)
    assert p.expect("READY=1")[1] == "READY=1\nSTATUS=serving (1 server(s))"
    child.send(signal.SIGHUP)
    reloading = p.expect("RELOADING=1")[1].split("\n")
    monotonic_usec = int(reloading[1].removeprefix("MONOTONIC_USEC="))
    assert abs(monotonic_usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < BOUND
    assert p.expect("READY=1")[1] == "READY=1\nSTATUS=serving (reloaded)"
    child.expect("reloaded")
    child.send(signal.SIGTERM)
    assert p.expect("STOPPING=1")[1] == "STOPPING=1\nSTATUS=wrapping up (SIGTERM)"
    extend = int(p.expect("EXTEND_TIMEOUT_USEC=")[1].split("=")[1])
    assert 25e6 < extend <= 30e6  # the 25 s budget left, plus the margin for the report
    assert p.expect("STATUS=shutting down")[1] == "STATUS=shutting down"
    assert p.expect("STATUS=stopped")[1].startswith("STATUS=stopped (")
    assert child.wait() == 0


@pytest.mark.timeout(60)
def test_watchdog_pings_at_half_the_interval(children: list[Child], peer: tuple[Peer, str]) -> None:
    p, notify_socket = peer
    child = Child(SERVICE, env={"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000"})
    children.append(child)
    p.expect("READY=1")
    pings = [p.expect("WATCHDOG=1")[0] for _ in range(10)]
    mean = (pings[-1] - pings[0]) / (len(pings) - 1)
    assert 0.05 < mean < 0.3  # every 0.1 s, on a noisy machine
    child.send(signal.SIGTERM)
    assert child.wait() == 0


@pytest.mark.timeout(60)
def test_watchdog_stops_while_the_coordinator_is_stuck(children: list[Child], peer: tuple[Peer, str]) -> None:
    p, notify_socket = peer
    code = "import sys; sys.argv.append('block-reload')\n" + SERVICE
    child = Child(code, env={"NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": "200000"})
    children.append(child)
    p.expect("READY=1")
    p.expect("WATCHDOG=1")
    child.send(signal.SIGHUP)  # the reload listener blocks the coordinator thread
    child.expect_err("has not answered")
    pings_then = sum(1 for _, m in p.seen if m == "WATCHDOG=1")
    stuck_lines = child.err.count("has not answered")
    deadline = time.monotonic() + BOUND
    while child.err.count("has not answered") < stuck_lines + 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # waiting for three more watchdog ticks (log lines): no event to wait on
    assert sum(1 for _, m in p.seen if m == "WATCHDOG=1") == pings_then  # no ping while stuck
    child.tell("go on")
    child.expect("reloaded")
    p.expect("RELOADING=1")
    p.expect("READY=1")
    p.expect("WATCHDOG=1")  # the pings resume
    child.send(signal.SIGTERM)
    assert child.wait() == 0


def test_notify_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert systemd.notify("READY=1") is False  # logged at DEBUG, never raised


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


def test_a_notifier_extends_the_timeout_only_while_the_drain_progresses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In-process: two listeners finish one check apart, then one is stuck."""
    address = str(tmp_path / "n.sock")
    p = Peer(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setattr(systemd, "EXTEND_EVERY", 0.05)
    lifecycle = graceful.Lifecycle(force_quit=BOUND)
    first, second, stuck = threading.Event(), threading.Event(), threading.Event()
    lifecycle.add_wrap_up_listener(first.wait, name="first")
    lifecycle.add_wrap_up_listener(second.wait, name="second")
    lifecycle.add_wrap_up_listener(stuck.wait, name="stuck")
    notifier = systemd.SystemdNotifier(lifecycle)
    try:
        lifecycle.shutdown("test", wait=False)
        p.expect("STOPPING=1")
        p.expect("EXTEND_TIMEOUT_USEC=")  # at the start of the shutdown
        first.set()
        p.expect("EXTEND_TIMEOUT_USEC=")  # progress
        second.set()
        p.expect("EXTEND_TIMEOUT_USEC=")  # progress again
        extends = sum(1 for _, m in p.seen if m.startswith("EXTEND"))
        time.sleep(0.3)  # six progress checks with nothing finishing: the window is the point
        assert sum(1 for _, m in p.seen if m.startswith("EXTEND")) == extends
    finally:
        for event in (first, second, stuck):
            event.set()
        assert lifecycle.wait_for_shutdown(BOUND)
        notifier.close()
        p.close()
