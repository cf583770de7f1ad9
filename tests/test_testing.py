"""graceful.testing, through the installed fixtures and directly: what a user's test relies on."""

from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import graceful
from graceful import State
from graceful._deadline import FakeClock as CoreFakeClock
from graceful.lowlevel import join
from graceful.testing import (
    FakeClock,
    LifecycleHarness,
    NotReadyError,
    ProcessFactory,
    ProcessResult,
)

from .conftest import BOUND

SERVER = """
import logging, socketserver, sys
import graceful
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())
server = socketserver.TCPServer(("127.0.0.1", 0), Echo)
print("port", server.server_address[1], flush=True)
graceful.add_shutdown_listener(lambda: print("db closed", flush=True), name="close-db")
raise SystemExit(graceful.run(server))
"""


def _wakeup_fd() -> int:
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd


@pytest.fixture
def handlers() -> Iterator[dict[int, object]]:
    """The process-wide signal handlers and wakeup fd, checked unchanged after the test."""
    before: dict[int, object] = {sig: signal.getsignal(sig) for sig in graceful._signals.handled_signals()}
    before[-1] = _wakeup_fd()
    yield before
    after: dict[int, object] = {sig: signal.getsignal(sig) for sig in graceful._signals.handled_signals()}
    after[-1] = _wakeup_fd()
    assert after == before


# -- graceful_lifecycle -----------------------------------------------------------------------


def test_module_level_calls_land_on_the_fixture_lifecycle(graceful_lifecycle: LifecycleHarness) -> None:
    """The fixture's lifecycle is the default while the test runs."""
    assert graceful.get_lifecycle() is graceful_lifecycle.lifecycle
    graceful.add_shutdown_listener(lambda: None, name="flush")
    graceful.set_time_to_force_quit(3)
    status = graceful_lifecycle.lifecycle.status()
    assert [item.name for item in status.listeners] == ["flush"]
    assert status.force_quit == 3
    assert graceful_lifecycle.force_quit_report is None
    assert isinstance(graceful_lifecycle.clock, CoreFakeClock)
    assert FakeClock is CoreFakeClock


@pytest.mark.timeout(30)
def test_sigterm_runs_wrap_up_then_shutdown_and_touches_no_handler(
    handlers: dict[int, object], graceful_lifecycle: LifecycleHarness
) -> None:
    """SIGTERM goes through the signal table; the process's handlers and wakeup fd stay as they were."""
    order: list[str] = []
    graceful.add_wrap_up_listener(lambda: order.append("stop accepting"), name="stop")
    graceful.add_shutdown_listener(lambda: order.append("close db"), name="close")
    graceful_lifecycle.send_signal(signal.SIGTERM)
    assert graceful_lifecycle.wait_for_shutdown(BOUND)
    assert order == ["stop accepting", "close db"]
    assert graceful.state() is State.STOPPED
    assert graceful_lifecycle.lifecycle.status().reason == "SIGTERM"
    assert graceful_lifecycle.exit_codes == []


@pytest.mark.timeout(30)
def test_sigterm_again_is_ignored_and_sigint_after_it_forces(graceful_lifecycle: LifecycleHarness) -> None:
    """The table's second-signal rows, with the exit recorded instead of taken."""
    release = threading.Event()
    graceful.add_wrap_up_listener(lambda: release.wait(BOUND), name="drain")
    graceful_lifecycle.send_signal(signal.SIGTERM)
    graceful_lifecycle.send_signal(signal.SIGTERM)
    assert graceful_lifecycle.force_quit_report is None
    graceful_lifecycle.send_signal(signal.SIGINT)
    assert graceful_lifecycle.force_quit_report is not None
    assert "SIGINT again" in graceful_lifecycle.force_quit_report
    assert graceful_lifecycle.exit_codes == [70]
    release.set()
    assert graceful_lifecycle.wait_for_shutdown(BOUND)


@pytest.mark.timeout(30)
def test_clock_advance_fires_the_force_quit_and_the_report_names_the_stuck_listener(
    graceful_lifecycle: LifecycleHarness,
) -> None:
    """The deadline fires when the test says so, not a moment before, in the test's thread."""
    started, release = threading.Event(), threading.Event()

    def drain() -> None:
        started.set()
        release.wait(BOUND)

    graceful.add_wrap_up_listener(drain, name="drain-requests")
    graceful_lifecycle.send_signal(signal.SIGTERM)
    assert started.wait(BOUND)
    graceful_lifecycle.clock.advance(24.9)
    assert graceful_lifecycle.force_quit_report is None
    graceful_lifecycle.clock.advance(0.1)
    assert graceful_lifecycle.force_quit_report is not None
    assert "'drain-requests'" in graceful_lifecycle.force_quit_report
    assert graceful_lifecycle.exit_codes == [70]
    release.set()
    assert graceful_lifecycle.wait_for_shutdown(BOUND)


@pytest.mark.timeout(30)
def test_sigtstp_pauses_and_a_later_sigterm_continues(graceful_lifecycle: LifecycleHarness) -> None:
    """SIGTSTP runs only the wrap-up phase and starts no deadline."""
    wrapped, closed = threading.Event(), threading.Event()
    graceful.add_wrap_up_listener(wrapped.set, name="stop-fetching")
    graceful.add_shutdown_listener(closed.set, name="close")
    graceful_lifecycle.send_signal(signal.SIGTSTP)
    assert wrapped.wait(BOUND)
    assert graceful.is_stopping()
    assert graceful_lifecycle.lifecycle.time_remaining() is None
    assert not closed.is_set()
    graceful_lifecycle.send_signal(signal.SIGTERM)
    assert graceful_lifecycle.wait_for_shutdown(BOUND)
    assert closed.is_set()


def test_sigusr1_writes_a_thread_dump_to_stderr_and_keeps_running(
    graceful_lifecycle: LifecycleHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    """What SIGUSR1 writes goes to sys.stderr, where capsys sees it."""
    graceful.add_shutdown_listener(lambda: None, name="flush-metrics")
    graceful_lifecycle.send_signal(signal.SIGUSR1)
    err = capsys.readouterr().err
    assert "thread dump" in err
    assert "'flush-metrics'" in err
    assert graceful.state() is State.RUNNING


def test_sighup_runs_reload_listeners_off_the_test_thread_like_a_real_signal(
    graceful_lifecycle: LifecycleHarness,
) -> None:
    """SIGHUP reloads (an async listener too, as no loop runs there) and the process keeps running."""
    seen: list[str] = []

    async def reload_async() -> None:
        seen.append("async")

    graceful.add_reload_listener(lambda: seen.append(threading.current_thread().name), name="reload-config")
    graceful.add_reload_listener(reload_async, name="reload-async")
    graceful_lifecycle.send_signal(signal.SIGHUP)
    assert seen == ["graceful-signals", "async"]
    assert graceful.state() is State.RUNNING


def test_sigquit_forces_at_once(graceful_lifecycle: LifecycleHarness) -> None:
    """SIGQUIT: report and exit 70, recorded."""
    graceful_lifecycle.send_signal(signal.SIGQUIT)
    assert graceful_lifecycle.force_quit_report is not None
    assert "SIGQUIT received" in graceful_lifecycle.force_quit_report
    assert graceful_lifecycle.exit_codes == [70]


def test_send_signal_rejects_what_it_cannot_simulate(graceful_lifecycle: LifecycleHarness) -> None:
    """A name instead of a number, or a signal graceful does not route: a sentence, not a no-op."""
    with pytest.raises(TypeError, match=r"signal\.SIGTERM"):
        graceful_lifecycle.send_signal("SIGTERM")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        graceful_lifecycle.send_signal(True)
    with pytest.raises(ValueError, match="graceful_process"):
        graceful_lifecycle.send_signal(signal.SIGKILL)
    assert graceful.state() is State.RUNNING


# -- LifecycleHarness directly ------------------------------------------------------------------


def test_harness_restores_the_previous_default_and_serves_one_test() -> None:
    """install/close swap the default and back; close twice is harmless; reuse is an error."""
    before = graceful.get_lifecycle()
    harness = LifecycleHarness()
    harness.install()
    assert graceful.get_lifecycle() is harness.lifecycle
    with pytest.raises(RuntimeError, match="installed"):
        harness.install()
    assert harness.close() is None
    assert harness.close() is None
    assert graceful.get_lifecycle() is before
    with pytest.raises(RuntimeError, match="new one"):
        harness.install()
    with pytest.raises(ValueError, match="teardown_timeout"):
        LifecycleHarness(teardown_timeout=-1)


@pytest.mark.timeout(30)
def test_close_leaves_an_untriggered_lifecycle_alone() -> None:
    """Listeners of a test that never shut down are not run behind its back."""
    ran: list[str] = []
    with LifecycleHarness() as harness:
        graceful.add_shutdown_listener(lambda: ran.append("x"), name="x")
    assert ran == []
    assert harness.lifecycle.state() is State.RUNNING


@pytest.mark.timeout(30)
def test_close_finishes_a_paused_sequence_so_its_thread_ends() -> None:
    """After SIGTSTP only, teardown runs the shutdown phase and joins the sequence's thread."""
    closed = threading.Event()
    harness = LifecycleHarness().install()
    graceful.add_shutdown_listener(closed.set, name="close")
    harness.send_signal(signal.SIGTSTP)
    assert harness.close() is None
    assert closed.is_set()
    assert harness.lifecycle.state() is State.STOPPED
    assert join(harness.lifecycle, 0)  # the sequence's thread has ended


@pytest.mark.timeout(30)
def test_close_names_listeners_left_running_and_restores_the_default_anyway() -> None:
    """A stuck wrap-up listener is named as running, the shutdown listener behind it as never started."""
    before = graceful.get_lifecycle()
    started, release = threading.Event(), threading.Event()

    def stuck() -> None:
        started.set()
        release.wait(BOUND)

    harness = LifecycleHarness(teardown_timeout=0.2).install()
    graceful.add_wrap_up_listener(stuck, name="drain-forever")
    graceful.add_shutdown_listener(lambda: None, name="close-pool")
    harness.send_signal(signal.SIGTERM)
    assert started.wait(BOUND)
    try:
        problem = harness.close()
        assert graceful.get_lifecycle() is before
    finally:
        release.set()
    assert problem is not None
    assert "wrap_up listener 'drain-forever' is still running" in problem
    assert "shutdown listener 'close-pool' never started" in problem
    assert "Release what it waits on" in problem
    assert harness.lifecycle.wait_for_shutdown(BOUND)


@pytest.mark.timeout(30)
def test_a_listener_added_after_stopped_is_waited_for_and_named() -> None:
    """A late listener runs on its own after STOPPED; teardown still sees it."""
    started, release = threading.Event(), threading.Event()

    def late() -> None:
        started.set()
        release.wait(BOUND)

    harness = LifecycleHarness(teardown_timeout=0.2).install()
    harness.send_signal(signal.SIGTERM)
    assert harness.wait_for_shutdown(BOUND)
    graceful.add_shutdown_listener(late, name="late-flush")
    assert started.wait(BOUND)
    try:
        problem = harness.close()
    finally:
        release.set()
    assert problem is not None
    assert "'late-flush' is still running" in problem


@pytest.mark.timeout(30)
def test_context_manager_raises_on_leftovers_but_never_masks_the_body_error() -> None:
    """``with LifecycleHarness()`` is the unittest way: an AssertionError names the leftover."""
    release = threading.Event()

    def leave_one_stuck(name: str, then: BaseException | None = None) -> None:
        with LifecycleHarness(teardown_timeout=0.1) as harness:
            graceful.add_wrap_up_listener(lambda: release.wait(BOUND), name=name)
            harness.send_signal(signal.SIGTERM)
            if then is not None:
                raise then

    try:
        with pytest.raises(AssertionError, match="'stuck'"):
            leave_one_stuck("stuck")
        with pytest.raises(KeyError, match="the test's own failure"):
            leave_one_stuck("stuck-too", KeyError("the test's own failure"))
    finally:
        release.set()


# -- graceful_process ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ready_means_serving_then_sigterm_exits_0_with_output_and_notifications(
    graceful_process: ProcessFactory,
) -> None:
    """The factory returns once READY=1 arrived: the server answers a real client at once."""
    proc = graceful_process(SERVER)
    assert proc.returncode is None
    match = re.search(r"port (\d+)", proc.stdout)
    assert match is not None
    with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=BOUND) as conn:
        conn.sendall(b"ping\n")
        assert conn.makefile("rb").readline() == b"ping\n"
    assert proc.send_signal(signal.SIGTERM)
    result = proc.wait(BOUND)
    assert isinstance(result, ProcessResult)
    assert result.returncode == 0, result.stderr
    assert "db closed" in result.stdout
    assert "received SIGTERM" in result.stderr
    assert result.notifications[0] == "READY=1"
    assert proc.wait(BOUND) is result
    assert proc.send_signal(signal.SIGTERM) is False


@pytest.mark.timeout(60)
def test_notifications_are_one_entry_per_line_in_order(graceful_process: ProcessFactory) -> None:
    """Three datagrams, one of two lines: four entries; the ones sent just before exit are kept."""
    proc = graceful_process(
        """
        from graceful.systemd import notify
        notify("READY=1")
        notify("STATUS=draining", "STOPPING=1")
        notify("STATUS=bye")
        """
    )
    result = proc.wait(BOUND)
    assert result.returncode == 0, result.stderr
    assert result.notifications == ["READY=1", "STATUS=draining", "STOPPING=1", "STATUS=bye"]


@pytest.mark.timeout(60)
def test_a_child_that_exits_before_ready_raises_with_its_stderr(graceful_process: ProcessFactory) -> None:
    """The error says it exited, with which code, and shows what it wrote."""
    with pytest.raises(NotReadyError, match=r"(?s)exited with code 3 before it sent READY=1.*config missing"):
        graceful_process("import sys; sys.stderr.write('config missing\\n'); sys.exit(3)")


@pytest.mark.timeout(60)
def test_a_silent_child_is_killed_after_ready_timeout() -> None:
    """No READY=1 within the bound: NotReadyError, and the child is gone, not left behind."""
    factory = ProcessFactory()
    with pytest.raises(NotReadyError, match=r"no READY=1 within 0.3 s") as caught:
        factory(
            "import sys, threading; print('booting', file=sys.stderr); threading.Event().wait()",
            ready_timeout=0.3,
        )
    assert "booting" in str(caught.value)
    pid = re.search(r"pid (\d+)", str(caught.value))
    assert pid is not None
    assert factory.close() is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid.group(1)), 0)


@pytest.mark.timeout(60)
def test_wait_times_out_without_killing_then_sigterm_ends_the_child(graceful_process: ProcessFactory) -> None:
    """After SIGTSTP the service stays up: wait() says so and leaves it running."""
    proc = graceful_process(SERVER)
    proc.send_signal(signal.SIGTSTP)
    proc.wait_for_output("wrapping up")
    with pytest.raises(TimeoutError, match="still running"):
        proc.wait(0.2)
    assert proc.returncode is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(BOUND).returncode == 0


@pytest.mark.timeout(60)
def test_script_path_args_and_env_reach_the_child_which_imports_graceful_without_pythonpath(
    graceful_process: ProcessFactory, tmp_path: Path
) -> None:
    """A Path or a str path; args; env on top of ours; graceful importable as installed."""
    script = tmp_path / "svc.py"
    script.write_text(
        "import os, sys, graceful\n"
        "from graceful.systemd import notify\n"
        "print(sys.argv[1:], os.environ['GREETING'], bool(os.environ.get('PYTHONPATH')))\n"
        "notify('READY=1')\n"
    )
    for target in (script, str(script)):
        proc = graceful_process(target, env={"GREETING": "hi", "PYTHONPATH": ""}, args=["--x"])
        result = proc.wait(BOUND)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "['--x'] hi False\n"


def test_bad_arguments_are_refused_with_a_sentence(graceful_process: ProcessFactory, tmp_path: Path) -> None:
    """Nothing is started for a typo."""
    with pytest.raises(ValueError, match="no script at"):
        graceful_process(str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="no script at"):
        graceful_process(tmp_path / "missing.txt")
    with pytest.raises(TypeError, match="code"):
        graceful_process(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        graceful_process("pass", env={"NOTIFY_SOCKET": "/tmp/x"})
    with pytest.raises(ValueError, match="ready_timeout"):
        graceful_process("pass", ready_timeout=-1)


@pytest.mark.timeout(60)
def test_wait_for_output_is_bounded(graceful_process: ProcessFactory) -> None:
    """It returns when the text comes, and says what the child wrote when it does not."""
    proc = graceful_process(
        """
        import threading
        from graceful.systemd import notify
        notify("READY=1")
        print("hello", flush=True)
        threading.Event().wait()
        """
    )
    proc.wait_for_output("hello")
    with pytest.raises(TimeoutError, match=r"(?s)did not write 'nope'.*hello"):
        proc.wait_for_output("nope", timeout=0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(BOUND).returncode == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_factory_close_kills_and_names_a_child_left_running() -> None:
    """What the fixture reports at teardown: which child, that it was killed, its stderr."""
    factory = ProcessFactory()
    proc = factory(
        "import sys, threading; from graceful.systemd import notify; notify('READY=1'); "
        "print('still serving', file=sys.stderr, flush=True); threading.Event().wait()"
    )
    proc.wait_for_output("still serving")
    problem = factory.close()
    assert problem is not None
    assert f"pid {proc.pid}" in problem
    assert "was still running at the end of the test: killed it" in problem
    assert "still serving" in problem
    assert proc.returncode == -signal.SIGKILL
    assert factory.close() is None


@pytest.mark.timeout(60)
def test_wait_for_output_from_a_child_that_exits_without_writing_it(graceful_process: ProcessFactory) -> None:
    """The exit ends the wait at once, and the error says so; repr names the child."""
    proc = graceful_process("from graceful.systemd import notify; notify('READY=1'); print('bye')")
    assert f"pid {proc.pid}" in repr(proc)
    with pytest.raises(TimeoutError, match=r"(?s)\(it exited\).*bye"):
        proc.wait_for_output("never written", timeout=BOUND)
    assert proc.returncode == 0


def test_a_child_that_cannot_start_leaves_nothing_behind(graceful_process: ProcessFactory) -> None:
    """Popen's own error comes through; the socket's directory is removed at once."""
    before = set(Path(tempfile.gettempdir()).glob("graceful-*"))
    with pytest.raises(ValueError, match="null byte"):
        graceful_process("pass", env={"BAD": "a\0b"})
    assert set(Path(tempfile.gettempdir()).glob("graceful-*")) <= before


ECHO = """
import sys
from graceful.systemd import notify
print("in 1", flush=True)
print("noise", flush=True)
print("in 2", flush=True)
print("warming up", file=sys.stderr, flush=True)
notify("READY=1")
for line in sys.stdin:
    if line == "bye\\n":
        break
    print("got", line.strip(), flush=True)
    print("logged", line.strip(), file=sys.stderr, flush=True)
sys.stdout.write("bye, no newline")
"""


@pytest.mark.timeout(60)
def test_wait_for_line_returns_each_next_matching_line_and_send_line_feeds_stdin(
    graceful_process: ProcessFactory,
) -> None:
    """Two calls find two lines; each stream has its own place; the last line needs no newline."""
    proc = graceful_process(ECHO, stdin=True)
    assert proc.wait_for_line("in ") == "in 1"
    assert proc.wait_for_line("in ") == "in 2"
    assert proc.wait_for_line("warming", stream="stderr") == "warming up"
    for word in ("one", "two"):
        assert proc.send_line(word) is True
        assert proc.wait_for_line("got") == f"got {word}"
        assert proc.wait_for_line("logged", stream="stderr") == f"logged {word}"
    with pytest.raises(TimeoutError, match=r"(?s)did not write a line with 'got' on stdout.*got two"):
        proc.wait_for_line("got", timeout=0.2)  # "got two" was found already: none is next
    proc.send_line("bye")
    assert proc.wait_for_line("bye") == "bye, no newline"  # whole: the child has exited
    assert proc.wait(BOUND).returncode == 0
    assert proc.send_line("too late") is False
    with pytest.raises(TimeoutError, match=r"\(it exited\)"):
        proc.wait_for_line("in ", timeout=BOUND)  # both were read: the exit ends the wait at once


@pytest.mark.timeout(60)
def test_wait_for_output_can_look_at_one_stream(graceful_process: ProcessFactory) -> None:
    """Text on stdout does not end a wait on stderr; a stream that is neither is refused."""
    proc = graceful_process(ECHO, stdin=True)
    proc.wait_for_output("noise", stream="stdout")
    with pytest.raises(TimeoutError, match="did not write 'noise'"):
        proc.wait_for_output("noise", timeout=0.2, stream="stderr")
    proc.wait_for_output("warming up", stream="stderr")
    with pytest.raises(ValueError, match="stream is 'stdout' or 'stderr'"):
        proc.wait_for_output("noise", stream="stdin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream is 'stdout' or 'stderr'"):
        proc.wait_for_line("noise", stream=None)  # type: ignore[arg-type]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(BOUND).returncode == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_without_stdin_true_send_line_says_how(graceful_process: ProcessFactory) -> None:
    """The default stdin is /dev/null: a program reading it sees the end at once."""
    proc = graceful_process(ECHO)
    with pytest.raises(RuntimeError, match=r"stdin=True"):
        proc.send_line("hello")
    result = proc.wait(BOUND)
    assert result.returncode == 0
    assert "got" not in result.stdout


@pytest.mark.timeout(60)
def test_wait_ready_false_returns_at_once_and_lets_env_name_the_notify_peer(
    graceful_process: ProcessFactory, tmp_path: Path
) -> None:
    """A program that never sends READY=1; a test that is the notify peer itself."""
    proc = graceful_process(
        "import os, sys; print(os.environ.get('NOTIFY_SOCKET'), flush=True); sys.stdin.readline()",
        wait_ready=False,
        stdin=True,
    )
    assert proc.wait_for_line("graceful-").endswith("/notify")  # the factory's own socket
    assert proc.returncode is None
    proc.send_line("")
    assert proc.wait(BOUND).notifications == []

    peer = str(tmp_path / "peer.sock")
    proc = graceful_process(
        "import os; print(os.environ['NOTIFY_SOCKET'])", env={"NOTIFY_SOCKET": peer}, wait_ready=False
    )
    result = proc.wait(BOUND)
    assert result.stdout == f"{peer}\n"
    assert result.notifications == []
    with pytest.raises(ValueError, match="wait_ready=False"):
        graceful_process("pass", env={"NOTIFY_SOCKET": peer})
