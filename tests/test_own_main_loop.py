"""Issue #15: a program with its own main loop (``signal_handlers()``) finishes the job in hand
before the shutdown listeners close what the job uses (the pattern of docs/concepts.md)."""

from __future__ import annotations

import signal

import pytest

from graceful.testing import ProcessFactory

from .support.preamble import PREAMBLE

PROGRAM = (
    PREAMBLE
    + r"""
import os
import graceful

WAIT_FOR_THE_JOB = os.environ["WAIT_FOR_THE_JOB"] == "1"
in_hand = threading.Lock()  # held for the whole of one job


def close_connection():
    say("connection closed")


def finish_the_job_in_hand():
    with in_hand:  # the loop checks is_stopping() under the same lock: it takes no other job
        pass


def job(n):
    say(f"job {n} started")
    release.wait()  # the test says when the work is over
    say(f"job {n} done")


if WAIT_FOR_THE_JOB:
    graceful.add_wrap_up_listener(finish_the_job_in_hand, name="finish the job in hand")
graceful.add_shutdown_listener(close_connection, name="close the connection")
with graceful.signal_handlers():
    n = 0
    while True:
        with in_hand:
            if graceful.is_stopping():
                break
            n += 1
            job(n)
    graceful.wait_for_shutdown()
say("exit")
sys.exit(graceful.get_lifecycle().exit_code)
"""
)


@pytest.mark.timeout(30)
def test_the_job_in_hand_completes_before_its_connection_closes(graceful_process: ProcessFactory) -> None:
    """SIGTERM mid-job: job done, then the connection closed, exit 0; no second job started."""
    child = graceful_process(PROGRAM, env={"WAIT_FOR_THE_JOB": "1"}, wait_ready=False, stdin=True)
    try:
        child.wait_for_line("job 1 started")
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("wrapping up", stream="stderr")
        assert "connection closed" not in child.stdout
        child.send_line("go")
        assert child.wait().returncode == 0, child.stderr
        lines = child.stdout.splitlines()
        assert lines == ["job 1 started", "job 1 done", "connection closed", "exit"], lines
    finally:
        child.kill()


@pytest.mark.timeout(30)
def test_without_the_wrap_up_listener_the_connection_closes_under_the_job(
    graceful_process: ProcessFactory,
) -> None:
    """The control: without the listener, the shutdown phase closes the connection mid-job."""
    child = graceful_process(PROGRAM, env={"WAIT_FOR_THE_JOB": "0"}, wait_ready=False, stdin=True)
    try:
        child.wait_for_line("job 1 started")
        child.send_signal(signal.SIGTERM)
        child.wait_for_line("connection closed")
        child.send_line("go")
        child.wait()
        lines = child.stdout.splitlines()
        assert lines.index("connection closed") < lines.index("job 1 done"), lines
    finally:
        child.kill()
