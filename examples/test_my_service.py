"""Tests of my_service's shutdown. Copy this file next to your service and adapt it.

The fixtures come with graceful: installing it registers its pytest plugin, nothing to add
to ``conftest.py``.

* ``graceful_lifecycle`` (in-process, fast): a fresh lifecycle for the test, signals simulated
  through graceful's real signal table, a fake clock for the force-quit deadline.
* ``graceful_process`` (a real process): starts the program, waits for its READY=1, sends
  real signals and hands back the exit code, the output and the notify messages.
"""

from __future__ import annotations

import re
import signal
import threading
import urllib.request
from pathlib import Path

import my_service

from graceful.testing import LifecycleHarness, ProcessFactory

SERVICE = Path(__file__).with_name("my_service.py")


def test_sigterm_flushes_the_outbox(graceful_lifecycle: LifecycleHarness) -> None:
    sent: list[str] = []
    outbox = my_service.Outbox(send=sent.append)
    outbox.add("order-1")
    my_service.install(outbox)  # registers on the fixture's lifecycle, the default for this test

    graceful_lifecycle.send_signal(signal.SIGTERM)

    assert graceful_lifecycle.wait_for_shutdown(timeout=5)
    assert sent == ["order-1"]
    assert graceful_lifecycle.force_quit_report is None


def test_a_stuck_broker_is_named_in_the_force_quit_report(graceful_lifecycle: LifecycleHarness) -> None:
    sending, broker_back = threading.Event(), threading.Event()

    def send(event: str) -> None:
        sending.set()
        broker_back.wait(timeout=10)  # the broker does not answer

    outbox = my_service.Outbox(send=send)
    outbox.add("order-1")
    my_service.install(outbox)

    graceful_lifecycle.send_signal(signal.SIGTERM)
    assert sending.wait(timeout=5)
    graceful_lifecycle.clock.advance(25)  # the force-quit budget passes, at once

    assert graceful_lifecycle.force_quit_report is not None
    assert "'flush-outbox'" in graceful_lifecycle.force_quit_report
    assert graceful_lifecycle.exit_codes == [70]  # recorded: nothing exited
    broker_back.set()  # let the listener finish: the fixture fails a test that leaves one running


def test_the_real_service_flushes_and_exits_0_on_sigterm(graceful_process: ProcessFactory) -> None:
    proc = graceful_process(SERVICE, env={"PORT": "0"})  # returns once READY=1 has arrived
    proc.wait_for_output("listening on")
    url = re.search(r"listening on (\S+)", proc.stdout)
    assert url is not None
    request = urllib.request.Request(url.group(1) + "/order-7", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 202

    proc.send_signal(signal.SIGTERM)
    result = proc.wait(timeout=10)

    assert result.returncode == 0, result.stderr
    assert "outbox flushed: 1 event(s) sent" in result.stderr
    assert result.notifications[0] == "READY=1"
