"""Issue #14: the deadline is final, and the signal coordinator can never be silenced.

Each test runs a real child process and sends it real signals: a force quit ends the process
(``os._exit``), and what the coordinator can be blocked by (a stuck reload listener, a stderr
pipe nobody reads, a listener holding a logging lock) only shows in a real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import pytest

import graceful
from graceful.testing import GracefulProcess, ProcessFactory

from .conftest import BOUND, ROOT
from .support.preamble import PREAMBLE

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

REPORT = "graceful: force quit:"


def start(graceful_process: ProcessFactory, code: str, **env: str) -> GracefulProcess:
    """``code`` after the PREAMBLE, started at once (some tests act before it is ready)."""
    return graceful_process(PREAMBLE + textwrap.dedent(code), env=env, wait_ready=False, stdin=True)


# -- 1. once the deadline has passed, the force quit owns the end ------------------------------


@pytest.mark.timeout(60)
def test_blocking_callable_at_the_deadline_exits_70_and_claims_no_clean_stop(
    graceful_process: ProcessFactory,
) -> None:
    """run(fn) whose fn never returns: SIGTERM, then exit 70 and no "stopped (" after the report."""
    child = start(
        graceful_process,
        """
        import graceful, graceful.lowlevel
        # A force-quit hook that takes its time: the window in which a clean stop was claimed.
        graceful.lowlevel.on_force_quit(graceful.get_lifecycle(), lambda: threading.Event().wait(1.5))
        def serve():
            say("serving")
            threading.Event().wait()
        sys.exit(graceful.run(serve))
        """,
        GRACEFUL_FORCE_QUIT="1",
    )
    child.wait_for_line("serving")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 70
    assert REPORT in child.stderr
    after = child.stderr.split(REPORT, 1)[1]
    assert "stopped (" not in after, child.stderr


# -- 2. the report gets out past a stuck logging lock ------------------------------------------

HOLD_MODULE_LOCK = "logging._lock.acquire()"
HOLD_HANDLER_LOCK = "logging.getLogger().handlers[0].acquire()"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hold", [HOLD_MODULE_LOCK, HOLD_HANDLER_LOCK], ids=["module-lock", "handler-lock"])
def test_report_is_written_while_a_listener_holds_a_logging_lock(
    graceful_process: ProcessFactory, hold: str
) -> None:
    """A shutdown listener stuck holding logging's lock or the stderr handler's: exit 70, report on stderr."""
    child = start(
        graceful_process,
        f"""
        import graceful
        graceful.set_time_to_force_quit(1)
        def stuck():
            {hold}
            say("holding")
            threading.Event().wait()
        graceful.add_shutdown_listener(stuck)
        with graceful.signal_handlers():
            say("ready")
            graceful.wait_for_shutdown()
        """,
    )
    child.wait_for_line("ready")
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("holding")
    assert child.wait().returncode == 70
    assert REPORT in child.stderr, child.stderr
    assert "stuck" in child.stderr.split(REPORT, 1)[1]


# -- 3. the coordinator is never silenced ------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_is_acted_on_while_a_reload_listener_blocks(graceful_process: ProcessFactory) -> None:
    """A reload listener that never returns: SIGTERM still wraps up, and the process exits."""
    child = start(
        graceful_process,
        """
        import graceful
        graceful.set_time_to_force_quit(2)
        def reload():
            say("reloading")
            threading.Event().wait()
        graceful.add_reload_listener(reload)
        graceful.add_wrap_up_listener(lambda: say("wrapping up"))
        with graceful.signal_handlers():
            say("ready")
            graceful.wait_for_shutdown()
        say("main done")
        """,
    )
    child.wait_for_line("ready")
    child.send_signal(signal.SIGHUP)
    child.wait_for_line("reloading")
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("wrapping up")
    child.wait_for_line("main done")
    assert child.wait(8.0).returncode == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc", ["SystemExit(3)", "KeyboardInterrupt()", "BaseException('odd')"])
def test_a_reload_listener_raising_base_exception_leaves_signals_working(
    graceful_process: ProcessFactory, exc: str
) -> None:
    """A reload listener raising SystemExit/KeyboardInterrupt/BaseException: SIGTERM still exits 0."""
    child = start(
        graceful_process,
        f"""
        import graceful
        def reload():
            say("reloading")
            raise {exc}
        graceful.add_reload_listener(reload)
        with graceful.signal_handlers():
            say("ready")
            graceful.wait_for_shutdown()
        say("main done")
        sys.exit(graceful.get_lifecycle().exit_code)
        """,
    )
    child.wait_for_line("ready")
    child.send_signal(signal.SIGHUP)
    child.wait_for_line("reloading")
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("main done")
    assert child.wait().returncode == 0


@pytest.mark.timeout(60)
def test_sigusr1_storm_into_an_unread_stderr_pipe_does_not_block_sigterm() -> None:
    """400 SIGUSR1 dumps into a stderr pipe nobody reads, then SIGTERM: the process still exits."""
    code = textwrap.dedent(
        """
        import sys, graceful
        with graceful.signal_handlers():
            print("ready", flush=True)
            graceful.wait_for_shutdown()
        print("main done", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(400):
            proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail("the process did not exit after SIGTERM: the coordinator is blocked")
        assert "main done" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(BOUND)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# -- 4. removed and finished listeners are let go ----------------------------------------------


@pytest.mark.timeout(120)
def test_add_and_remove_cycles_do_not_grow_the_registry() -> None:
    """100,000 add+remove cycles: no listener left in status(), and under 1 MiB of growth."""
    lifecycle = graceful.Lifecycle()

    def cycle(n: int) -> None:
        for _ in range(n):
            lifecycle.add_shutdown_listener(lambda: None).remove()

    cycle(1000)  # warm caches first
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cycle(100_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert lifecycle.status().listeners == ()
    assert grown < 1024 * 1024, f"{grown} bytes kept by 100,000 removed listeners"


# -- 5. the report shows the user's code ------------------------------------------------------


@pytest.mark.timeout(60)
def test_force_quit_report_shows_the_stack_of_a_server_that_never_returns(
    graceful_process: ProcessFactory,
) -> None:
    """run(fn) stuck in fn: the report names fn's own frame, not only graceful's waiting one."""
    child = start(
        graceful_process,
        """
        import graceful
        def user_code_that_never_returns():
            say("serving")
            threading.Event().wait()
        sys.exit(graceful.run(user_code_that_never_returns))
        """,
        GRACEFUL_FORCE_QUIT="1",
    )
    child.wait_for_line("serving")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 70
    report = child.stderr.split(REPORT, 1)[1]
    assert "Server threads still running:" in report, child.stderr
    assert "in user_code_that_never_returns" in report, child.stderr


# -- 6. SIGTERM while run() is starting its servers -------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_during_startup_stops_every_started_server_and_exits_promptly(
    graceful_process: ProcessFactory,
) -> None:
    """run([s0..s19]), s0's start() sends SIGTERM: every server started is stopped, exit 0 at once."""
    child = start(
        graceful_process,
        """
        import os, signal, graceful
        class Server:
            def __init__(self, i):
                self.i = i
            def start(self):
                say(f"start {self.i}")
                if self.i == 0:
                    os.kill(os.getpid(), signal.SIGTERM)
            def stop(self):
                say(f"stop {self.i}")
        code = graceful.run([Server(i) for i in range(20)])
        say(f"run returned {code}")
        sys.exit(code)
        """,
    )
    child.wait_for_line("run returned 0")
    assert child.wait().returncode == 0
    started = {line.split()[1] for line in child.stdout.splitlines() if line.startswith("start ")}
    stopped = {line.split()[1] for line in child.stdout.splitlines() if line.startswith("stop ")}
    assert "0" in started
    assert started <= stopped, f"started but never stopped: {sorted(started - stopped)}"
    assert "still running after shutdown" not in child.stderr


@pytest.mark.timeout(60)
def test_a_stop_that_overtakes_a_start_under_way_waits_for_it(graceful_process: ProcessFactory) -> None:
    """SIGTERM while start() runs: stop() comes only after start() returned, so nothing keeps running."""
    child = start(
        graceful_process,
        """
        import threading, graceful
        stop_called = threading.Event()
        class Server:
            running = False
            def start(self):
                say("starting")
                graceful.wait_for_wrap_up(10)  # the test's SIGTERM lands while start() runs
                # A stop that overtook this start would come now; it must not (0.5 s window).
                stop_called.wait(0.5)
                self.running = True
                say("start returned")
            def stop(self):
                stop_called.set()
                say(f"stop (running={self.running})")
                self.running = False
        server = Server()
        code = graceful.run(server)
        say(f"run returned {code}, running={server.running}")
        sys.exit(code)
        """,
    )
    child.wait_for_line("starting")
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("run returned 0, running=False")
    assert child.wait().returncode == 0
    lines = [line for line in child.stdout.splitlines() if line in ("start returned", "stop (running=True)")]
    assert lines == ["start returned", "stop (running=True)"]


# -- 7. run() from inside a listener ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_run_called_from_inside_a_listener_raises_at_once(graceful_process: ProcessFactory) -> None:
    """graceful.run(..., handle_signals=False) in a listener: a clear RuntimeError, no hang."""
    child = start(
        graceful_process,
        """
        import graceful
        def listener():
            try:
                graceful.run(lambda: None, handle_signals=False)
            except RuntimeError as exc:
                say(f"raised: {exc}")
        graceful.add_shutdown_listener(listener)
        graceful.set_time_to_force_quit(5)
        graceful.shutdown("test")
        say("shut down")
        sys.exit(graceful.get_lifecycle().exit_code)
        """,
    )
    line = child.wait_for_line("raised: ")
    assert "inside the listener 'listener'" in line
    child.wait_for_line("shut down")
    assert child.wait().returncode == 0


# -- 8. nested signal_handlers() blocks left out of order -------------------------------------


@pytest.mark.timeout(60)
def test_nested_signal_handlers_left_out_of_order_restore_the_previous_handler(
    graceful_process: ProcessFactory,
) -> None:
    """Outer block left before the inner one: afterwards SIGTERM reaches the handler from before."""
    child = start(
        graceful_process,
        """
        import signal, graceful
        got = threading.Event()
        def previous(signum, frame):
            got.set()
        signal.signal(signal.SIGTERM, previous)
        outer = graceful.signal_handlers(lifecycle=graceful.Lifecycle())
        inner = graceful.signal_handlers(lifecycle=graceful.Lifecycle())
        outer.__enter__()
        inner.__enter__()
        outer.__exit__(None, None, None)
        inner.__exit__(None, None, None)
        say(f"restored {signal.getsignal(signal.SIGTERM) is previous} {signal.set_wakeup_fd(-1)}")
        say("got SIGTERM" if got.wait(10) else "no SIGTERM")
        """,
    )
    assert child.wait_for_line("restored") == "restored True -1"
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("got SIGTERM")
    assert child.wait().returncode == 0
