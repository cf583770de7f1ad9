"""The signal table, with real signals sent to real processes, and the router on its own."""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
import types

import pytest

import graceful
from graceful import Lifecycle, State
from graceful._signals import Router, _name, handled_signals, signal_handlers
from graceful.lowlevel import shutdown_requested
from graceful.testing import GracefulProcess, ProcessFactory

from .conftest import BOUND, Recorder

SERVICE = """
import logging, sys, threading, graceful
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
graceful.set_time_to_force_quit({budget})
go = threading.Event()
stop = threading.Event()

def drain():
    print("wrap-up listener ran", flush=True)
    stop.set()
    if {hold}:
        go.wait(); print("drain released", flush=True)

def close():
    print("shutdown listener ran", flush=True)
    {close_extra}

graceful.add_wrap_up_listener(drain, name="drain")
graceful.add_shutdown_listener(close, name="close")
if {reload}:
    graceful.add_reload_listener(lambda: print("reloaded", flush=True), name="reload-config")

def stdin_commands():
    for line in sys.stdin:
        if line.strip() == "go":
            go.set()
threading.Thread(target=stdin_commands, daemon=True).start()

def serve():
    print("serving", flush=True)
    stop.wait()

sys.exit(graceful.run(serve))
"""


def service(
    graceful_process: ProcessFactory,
    *,
    budget: float = 10,
    hold: bool = False,
    reload: bool = False,
    close_extra: str = "",
) -> GracefulProcess:
    code = SERVICE.format(budget=budget, hold=hold, reload=reload, close_extra=close_extra or "pass")
    child = graceful_process(code, stdin=True)
    child.wait_for_line("serving")
    return child


# -- every row of the table, for real ---------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_term_and_int_shut_down_gracefully_with_exit_0(graceful_process: ProcessFactory, sig: int) -> None:
    child = service(graceful_process)
    child.send_signal(sig)
    assert child.wait().returncode == 0
    assert child.stdout.splitlines()[-2:] == ["wrap-up listener ran", "shutdown listener ran"]
    assert f"received {signal.Signals(sig).name}" in child.stderr
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(30)
def test_int_again_forces_quit_with_70_and_a_report(graceful_process: ProcessFactory) -> None:
    child = service(graceful_process, hold=True)
    child.send_signal(signal.SIGINT)
    child.wait_for_line("wrap-up listener ran")
    child.send_signal(signal.SIGINT)
    assert child.wait().returncode == 70
    assert "force quit: SIGINT again while shutting down" in child.stderr
    assert "wrap_up listener 'drain': running for" in child.stderr
    assert "shutdown listener ran" not in child.stdout


@pytest.mark.timeout(30)
def test_quit_forces_quit_at_once(graceful_process: ProcessFactory) -> None:
    child = service(graceful_process)
    child.send_signal(signal.SIGQUIT)
    assert child.wait().returncode == 70
    assert "force quit: SIGQUIT received" in child.stderr
    assert "wrap-up listener ran" not in child.stdout


@pytest.mark.timeout(30)
def test_term_again_is_logged_and_ignored(graceful_process: ProcessFactory) -> None:
    child = service(graceful_process, hold=True)
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("wrap-up listener ran")
    child.send_signal(signal.SIGTERM)
    child.wait_for_output("received SIGTERM again: already shutting down, ignored", stream="stderr")
    child.send_line("go")
    assert child.wait().returncode == 0
    assert child.stdout.count("shutdown listener ran") == 1


@pytest.mark.timeout(30)
def test_tstp_wraps_up_and_stays_alive_until_term(graceful_process: ProcessFactory) -> None:
    child = service(graceful_process)
    child.send_signal(signal.SIGTSTP)
    child.wait_for_line("wrap-up listener ran")
    child.send_signal(signal.SIGUSR1)  # alive and answering
    child.wait_for_output("end of thread dump", stream="stderr")
    assert child.returncode is None
    assert "shutdown listener ran" not in child.stdout
    assert "state wrapping_up" in child.stderr
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    assert child.stdout.splitlines()[-1] == "shutdown listener ran"


@pytest.mark.timeout(30)
def test_usr1_dumps_threads_tasks_and_status_and_keeps_running(graceful_process: ProcessFactory) -> None:
    child = service(graceful_process)
    child.send_signal(signal.SIGUSR1)
    child.wait_for_output("graceful: end of thread dump", stream="stderr")
    assert 'Thread "MainThread"' in child.stderr
    assert 'Thread "graceful-serve-serve"' in child.stderr
    assert "graceful: state running" in child.stderr
    assert "Traceback" not in child.stderr  # a dump, not an exception
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0


@pytest.mark.timeout(30)
def test_usr1_dump_lists_the_asyncio_tasks_of_the_loop_run_drives(graceful_process: ProcessFactory) -> None:
    code = """
import asyncio, graceful, sys
async def pump_messages():
    print("serving", flush=True)
    await asyncio.sleep(60)
sys.exit(graceful.run(pump_messages()))
"""
    child = graceful_process(code)
    try:
        child.wait_for_line("serving")
        child.send_signal(signal.SIGUSR1)
        child.wait_for_output("end of thread dump", stream="stderr")
        assert "asyncio tasks of" in child.stderr
        assert "in pump_messages" in child.stderr
        child.send_signal(signal.SIGTERM)
        assert child.wait().returncode == 0
    finally:
        child.kill()


@pytest.mark.timeout(30)
def test_hup_runs_reload_listeners(graceful_process: ProcessFactory) -> None:
    child = service(graceful_process, reload=True)
    child.send_signal(signal.SIGHUP)
    child.wait_for_line("reloaded")
    child.send_signal(signal.SIGHUP)
    child.wait_for_line("reloaded")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0


@pytest.mark.timeout(30)
def test_hup_without_reload_listeners_shuts_down_gracefully(graceful_process: ProcessFactory) -> None:
    """A closed terminal (SIGHUP, no reload listener) must not leave an orphan serving."""
    child = service(graceful_process)
    child.send_signal(signal.SIGHUP)
    child.wait_for_output("received SIGHUP with no reload listener", stream="stderr")
    assert child.wait().returncode == 0
    assert "stopped (" in child.stderr


@pytest.mark.timeout(30)
def test_a_failing_listener_gives_exit_code_1(graceful_process: ProcessFactory) -> None:
    child = service(graceful_process, close_extra="raise RuntimeError('flush failed')")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 1
    assert "shutdown listener 'close' failed" in child.stderr
    assert "RuntimeError: flush failed" in child.stderr


@pytest.mark.timeout(30)
def test_deadline_gives_exit_code_70(graceful_process: ProcessFactory) -> None:
    """A stuck drain is abandoned at the wrap-up timeout; a stuck close holds until the deadline."""
    child = service(graceful_process, budget=0.5, hold=True, close_extra="go.wait()")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 70
    assert "deadline of 0.5 s passed" in child.stderr
    assert "wrap_up listener 'drain'" in child.stderr


# -- Ctrl-C without graceful's handlers: run(handle_signals=False) ---------------------------


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("python_ctrl_c")
def test_keyboard_interrupt_in_main_without_our_handlers_shuts_down_then_forces(
    fresh: Lifecycle, exits: Recorder
) -> None:
    """handle_signals=False: Python's own KeyboardInterrupt in the main thread is honoured."""
    lifecycle = fresh
    release = threading.Event()
    wrapping = threading.Event()
    lifecycle.add_wrap_up_listener(lambda: (wrapping.set(), release.wait(BOUND)), name="slow")

    main = threading.main_thread().ident
    assert main is not None

    sent_at: list[str] = []  # the main thread's stack as each Ctrl-C was sent: said on failure

    def stack() -> str:
        frame, names = sys._current_frames().get(main), []
        while frame is not None:
            names.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            frame = frame.f_back
        return " < ".join(names)

    def main_thread_is_blocked_in_run() -> bool:
        """Waiting in run()'s final wait: not starting up, not handling the last Ctrl-C."""
        frame = sys._current_frames().get(main)
        if frame is None or frame.f_code.co_name != "wait":
            return False
        while frame is not None and frame.f_code.co_name in {"wait", "wait_for_shutdown"}:
            frame = frame.f_back
        return frame is not None and frame.f_code.co_name == "_block"

    def ctrl_c() -> None:
        """A real Ctrl-C at the main thread, once it waits in run(), as an operator's finds it.

        Python's KeyboardInterrupt lands wherever the main thread is: sent the moment serve()
        runs, it could land in the instant between run()'s start-up and its wait, and
        propagate out of run() instead of starting the shutdown.
        """
        pause = threading.Event()
        for _ in range(int(BOUND / 0.005)):
            if main_thread_is_blocked_in_run():
                break
            pause.wait(0.005)  # polling a stack: there is no event to wait on
        else:
            raise AssertionError("the main thread never waited in run()")
        sent_at.append(stack())
        signal.pthread_kill(main, signal.SIGINT)

    def interrupter() -> None:
        ctrl_c()  # the first shuts down gracefully
        assert wrapping.wait(BOUND)
        ctrl_c()  # the second one forces
        assert exits.called.wait(BOUND), sent_at
        release.set()

    def serve() -> None:
        threading.Thread(target=interrupter).start()
        assert release.wait(BOUND)

    code = graceful.run(serve, handle_signals=False)
    assert exits.codes == [70]
    assert code == 70
    assert "KeyboardInterrupt again" in (lifecycle.force_quit_report or ""), sent_at


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("python_ctrl_c")
def test_a_ctrl_c_pending_while_the_main_thread_is_blocked_is_not_lost(
    fresh: Lifecycle,
) -> None:
    """handle_signals=False: a Ctrl-C whose Python handler is pending while the main thread is
    blocked in run()'s wait still shuts down (within a slice of the wait).

    CPython runs a signal's Python handler only between bytecodes: a SIGINT landing after the
    last check and before the lock wait blocks stays pending until the lock is acquired.
    ``_thread.interrupt_main()`` makes exactly that state (the handler pending, no signal to
    interrupt the wait); with one endless wait, run() never saw it.
    """
    lifecycle = fresh
    wrapping = threading.Event()
    release = threading.Event()
    lifecycle.add_wrap_up_listener(lambda: (wrapping.set(), release.set()), name="note")
    main = threading.main_thread().ident

    def main_waits_in_run() -> bool:
        frame = sys._current_frames().get(main or -1)
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        return bool(names) and names[0] == "wait" and "_block" in names

    def interrupter() -> None:
        pause = threading.Event()
        for _ in range(int(BOUND / 0.005)):
            if main_waits_in_run():
                break
            pause.wait(0.005)  # polling a stack: there is no event to wait on
        _thread.interrupt_main()  # the handler is pending; nothing interrupts the wait

    def serve() -> None:
        threading.Thread(target=interrupter).start()
        assert release.wait(BOUND)

    assert graceful.run(serve, handle_signals=False) == 0
    assert wrapping.is_set()
    assert lifecycle.status().reason == "KeyboardInterrupt"


# -- the systemd stop sequence ------------------------------------------------------------------

WORKER = """
import sys, threading, graceful
jobs = iter(range(1, 100))
release = threading.Event()

def stdin_commands():
    for line in sys.stdin:
        if line.strip() == "finish":
            release.set()
threading.Thread(target=stdin_commands, daemon=True).start()

def worker():
    while not graceful.is_stopping():
        job = next(jobs)
        print(f"job {job} started", flush=True)
        release.wait()
        print(f"job {job} done", flush=True)
    print("worker stopped fetching", flush=True)

graceful.add_wrap_up_listener(lambda: print("wrapped up", flush=True), name="note")
graceful.add_shutdown_listener(lambda: print("closed", flush=True), name="close")
sys.exit(graceful.run(worker))
"""


@pytest.mark.timeout(30)
def test_systemd_stop_sequence_tstp_then_term(graceful_process: ProcessFactory) -> None:
    """ExecStop=kill -TSTP; sleep; kill -TERM: new work stops, in-flight work completes, exit 0."""
    child = graceful_process(WORKER, stdin=True)
    child.wait_for_line("job 1 started")
    child.send_signal(signal.SIGTSTP)
    child.wait_for_line("wrapped up")
    child.send_line("finish")
    child.wait_for_line("job 1 done")
    child.wait_for_line("worker stopped fetching")
    child.send_signal(signal.SIGUSR1)  # still up while paused (the unit's `sleep 10`)
    child.wait_for_output("end of thread dump", stream="stderr")
    assert "closed" not in child.stdout
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    assert "job 2 started" not in child.stdout
    assert child.stdout.splitlines()[-1] == "closed"


# -- storms and locks ----------------------------------------------------------------------------

STORM = """
import logging, os, sys, threading, graceful
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
log = logging.getLogger("busy")
graceful.set_time_to_force_quit(20)
storm_over = threading.Event()

def stdin_commands():
    for line in sys.stdin:
        storm_over.set()
threading.Thread(target=stdin_commands, daemon=True).start()

for n in range(3):
    # one os.write per line: print() from three threads at once can interleave
    graceful.add_wrap_up_listener(lambda n=n: (os.write(1, f"wrap {n}\\n".encode()), storm_over.wait(15)), name=f"wrap{n}")
    graceful.add_shutdown_listener(lambda n=n: os.write(1, f"close {n}\\n".encode()), name=f"close{n}")

with graceful.signal_handlers():
    print("ready", flush=True)
    i = 0
    while not graceful.get_lifecycle().wait_for_shutdown(0):
        i += 1
        log.info("main thread busy logging %d", i)
sys.exit(graceful.get_lifecycle().exit_code)
"""


def _storm(child: GracefulProcess, mix: list[int], count: int) -> int:
    sent = 0
    for i in range(count):
        try:
            os.kill(child.pid, mix[i % len(mix)])
        except ProcessLookupError:
            break
        sent += 1
    return sent


@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", range(10))
def test_signal_storm_without_int_one_sequence_every_listener_once(
    graceful_process: ProcessFactory, run: int
) -> None:
    """2,000 TERM/TSTP/USR1 as fast as possible at a main thread busy logging."""
    child = graceful_process(STORM, wait_ready=False, stdin=True)
    child.wait_for_line("ready")
    mix = [signal.SIGTSTP, signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR1]
    mix = mix[run % 4 :] + mix[: run % 4]
    assert _storm(child, mix, 2000) == 2000
    child.send_line("storm over")
    assert child.wait(30).returncode == 0
    lines = child.stdout.splitlines()
    assert sorted(lines[1:]) == ["close 0", "close 1", "close 2", "wrap 0", "wrap 1", "wrap 2"]
    assert child.stderr.count("wrapping up (") == 1
    assert child.stderr.count("stopped (") == 1
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", range(10))
def test_signal_storm_with_int_forces_once(graceful_process: ProcessFactory, run: int) -> None:
    """With SIGINT in the mix, the second SIGINT forces: exactly one report, exit 70."""
    child = graceful_process(STORM, wait_ready=False, stdin=True)
    child.wait_for_line("ready")
    mix = [signal.SIGTERM, signal.SIGINT, signal.SIGTSTP, signal.SIGUSR1]
    mix = mix[run % 4 :] + mix[: run % 4]
    _storm(child, mix, 2000)
    assert child.wait(30).returncode == 70
    assert child.stderr.count("graceful: force quit:") == 1
    assert child.stderr.count("wrapping up (") == 1
    for n in range(3):
        assert child.stdout.count(f"wrap {n}") <= 1
    assert "Traceback" not in child.stderr


LOCKS = """
import logging, sys, threading, graceful
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
user_lock = threading.Lock()
release = threading.Event()
graceful.add_wrap_up_listener(lambda: (print("wrap-up ran while main holds the locks", flush=True), release.set()), name="release")
graceful.add_shutdown_listener(lambda: logging.getLogger("app").info("closed after main let go"), name="close")
handler = logging.getLogger().handlers[0]
with graceful.signal_handlers():
    with user_lock:
        handler.acquire()  # the logging handler's lock, held by the main thread
        try:
            print("holding", flush=True)
            release.wait(20)
        finally:
            handler.release()
    graceful.wait_for_shutdown(20)
sys.exit(graceful.get_lifecycle().exit_code)
"""


@pytest.mark.timeout(40)
def test_a_signal_while_main_holds_the_logging_lock_and_a_user_lock_does_not_deadlock(
    graceful_process: ProcessFactory,
) -> None:
    child = graceful_process(LOCKS, wait_ready=False)
    child.wait_for_line("holding")
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("wrap-up ran while main holds the locks")
    assert child.wait(30).returncode == 0
    assert "closed after main let go" in child.stderr


# -- platforms without some signals --------------------------------------------------------------


def test_handled_signals_skip_what_the_platform_lacks() -> None:
    windows = types.SimpleNamespace(SIGTERM=15, SIGINT=2, SIGBREAK=21)
    assert handled_signals(windows) == [15, 2, 21]
    assert handled_signals() == [
        int(getattr(signal, n))
        for n in ("SIGTERM", "SIGINT", "SIGQUIT", "SIGTSTP", "SIGUSR1", "SIGHUP", "SIGUSR2")
    ]


def test_unknown_signal_numbers_get_a_readable_name() -> None:
    assert _name(signal.SIGTERM) == "SIGTERM"
    assert _name(250) == "signal 250"


def test_sigbreak_acts_like_sigterm(lc: Lifecycle) -> None:
    router = Router(lc)
    router._route(21, "SIGBREAK")
    assert lc.wait_for_shutdown(BOUND)
    assert lc.status().reason == "SIGBREAK"


@pytest.mark.timeout(30)
def test_core_and_signal_routing_work_with_a_signal_module_lacking_posix_signals(
    graceful_process: ProcessFactory,
) -> None:
    code = """
import signal, sys
for name in ("SIGTSTP", "SIGUSR1", "SIGHUP", "SIGQUIT"):
    delattr(signal, name)
import graceful
ran = []
graceful.add_shutdown_listener(lambda: ran.append(1))
def serve():
    signal.raise_signal(signal.SIGTERM)
    graceful.get_lifecycle().wrap_up()
code = graceful.run(serve)
print("exit", code, "ran", ran, flush=True)
sys.exit(code)
"""
    child = graceful_process(code, wait_ready=False)
    try:
        assert child.wait().returncode == 0, child.stderr
        assert "exit 0 ran [1]" in child.stdout
    finally:
        child.kill()


# -- the router on its own ----------------------------------------------------------------------


def test_router_table_with_a_fake_clock(lc: Lifecycle, exits: Recorder) -> None:
    written: list[str] = []
    router = Router(lc, stderr=written.append, offload=False)
    router.dispatch(signal.SIGUSR1)
    assert "graceful: thread dump (SIGUSR1)" in written[0]
    router.dispatch(signal.SIGTSTP)
    assert lc.is_stopping()
    router.dispatch(signal.SIGTSTP)  # already stopping: ignored
    assert lc.state() is State.WRAPPING_UP or lc.state() is State.WRAPPING_UP
    router.dispatch(signal.SIGTERM)
    assert lc.wait_for_shutdown(BOUND)
    router.dispatch(signal.SIGTERM)  # again: ignored
    assert exits.codes == []
    router.dispatch(signal.SIGINT)  # any SIGINT once shutting down forces
    assert exits.codes == [70]
    router.dispatch(signal.SIGALRM)  # not routed


def test_router_survives_a_failing_action(lc: Lifecycle, caplog: pytest.LogCaptureFixture) -> None:
    def broken(text: str) -> None:
        raise OSError("stderr closed")

    Router(lc, stderr=broken, offload=False).dispatch(signal.SIGUSR1)
    assert "handling SIGUSR1 failed" in caplog.text


def test_hup_with_and_without_reload_listeners(lc: Lifecycle, caplog: pytest.LogCaptureFixture) -> None:
    router = Router(lc, offload=False)
    calls: list[int] = []
    handle = lc.add_reload_listener(lambda: calls.append(1))
    router.dispatch(signal.SIGHUP)
    assert calls == [1]
    assert lc.state() is State.RUNNING
    assert handle.remove()
    with caplog.at_level(logging.INFO, logger="graceful"):
        router.dispatch(signal.SIGHUP)
    assert "with no reload listener" in caplog.text
    assert shutdown_requested(lc)


# -- installation: main thread only, restore everything, survive a takeover -------------------------


def test_signal_handlers_off_the_main_thread_is_a_runtime_error_that_says_what_to_do() -> None:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with graceful.signal_handlers():
                pass
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(BOUND)
    assert "must be called from the main thread" in str(errors[0])
    assert "handle_signals=False" in str(errors[0])


@pytest.mark.timeout(30)
def test_handlers_and_wakeup_fd_are_restored_and_replacements_logged(
    lc: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    def mine(signum: int, frame: object) -> None:
        return None

    previous_usr1 = signal.signal(signal.SIGUSR1, mine)
    try:
        before = {s: signal.getsignal(s) for s in handled_signals()}
        with caplog.at_level(logging.DEBUG, logger="graceful"), signal_handlers(lc):
            assert all(signal.getsignal(s) is not before[s] for s in handled_signals())
        assert {s: signal.getsignal(s) for s in handled_signals()} == before
        assert "replaced the SIGUSR1 handler" in caplog.text
        fd = signal.set_wakeup_fd(-1)
        assert fd == -1
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)


@pytest.mark.timeout(30)
def test_a_real_signal_wakes_the_coordinator_while_main_is_blocked(lc: Lifecycle) -> None:
    wrapped = threading.Event()
    lc.add_wrap_up_listener(wrapped.set)
    with signal_handlers(lc):
        os.kill(os.getpid(), signal.SIGTSTP)
        assert wrapped.wait(BOUND)  # main thread blocked in a C-level wait all along
    assert lc.is_stopping()


@pytest.mark.timeout(30)
def test_a_takeover_of_the_wakeup_fd_is_detected_and_the_signal_still_routed(lc: Lifecycle) -> None:
    wrapped = threading.Event()
    lc.add_wrap_up_listener(wrapped.set)
    theirs_r, theirs_w = os.pipe()
    os.set_blocking(theirs_w, False)
    try:
        with signal_handlers(lc):
            ours = signal.set_wakeup_fd(theirs_w)  # another library takes the fd over
            os.kill(os.getpid(), signal.SIGTSTP)
            assert wrapped.wait(BOUND)
            assert signal.set_wakeup_fd(ours) == theirs_w  # it was given back to them
            assert os.read(theirs_r, 16) == bytes([signal.SIGTSTP])
    finally:
        os.close(theirs_r)
        os.close(theirs_w)


def test_signal_handlers_defaults_to_the_default_lifecycle(lc: Lifecycle) -> None:
    previous = graceful.use(lc)
    try:
        with graceful.signal_handlers() as router:
            assert router.lifecycle is lc
    finally:
        graceful.use(previous)


# -- the coordinator acts while the main thread stays blocked in C ------------------------------

BLOCKED = """
import os, select, socket, sys, threading, time, graceful
graceful.add_wrap_up_listener(lambda: os.write(1, b"acted while main is blocked\\n"), name="note")
graceful.add_shutdown_listener(lambda: (os.write(1, b"done\\n"), os._exit(0)), name="exit")
with graceful.signal_handlers():
    print("blocking", flush=True)
    {block}
print("main woke up first: the coordinator did not act", flush=True)
"""

BLOCKERS = {
    "time.sleep": "time.sleep(60)",
    "Event.wait": "threading.Event().wait(60)",
    "select": "r, w = os.pipe(); select.select([r], [], [], 60)",
    "socket.accept": (
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); s.settimeout(60)\n    "
        "try:\n        s.accept()\n    except TimeoutError:\n        pass"
    ),
    "asyncio loop": "import asyncio; asyncio.run(asyncio.sleep(60))",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("blocker", sorted(BLOCKERS))
def test_signal_is_acted_on_while_main_is_blocked(graceful_process: ProcessFactory, blocker: str) -> None:
    """The wakeup fd reaches the coordinator whatever the main thread is blocked in."""
    child = graceful_process(BLOCKED.format(block=BLOCKERS[blocker]), wait_ready=False)
    child.wait_for_line("blocking")
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("acted while main is blocked")
    child.wait_for_line("done")
    assert child.wait().returncode == 0
    assert "main woke up first" not in child.stdout


@pytest.mark.timeout(30)
def test_the_sequence_started_by_a_signal_runs_on_a_non_daemon_thread(lc: Lifecycle) -> None:
    """The coordinator is a daemon; the driver it starts must not be, or exit cuts cleanup short."""
    seen: list[bool] = []
    lc.add_wrap_up_listener(
        lambda: seen.extend(t.daemon for t in threading.enumerate() if t.name == "graceful-lifecycle")
    )
    with signal_handlers(lc):
        os.kill(os.getpid(), signal.SIGTERM)
        assert lc.wait_for_shutdown(BOUND)
    assert seen == [False]


MAIN_RETURNS = """
import os, signal, graceful, threading
def slow_close():
    threading.Event().wait(0.3)
    os.write(1, b"cleanup finished\\n")
graceful.add_shutdown_listener(slow_close, name="slow-close")
with graceful.signal_handlers():
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
print("main returns without waiting", flush=True)
"""


@pytest.mark.timeout(30)
def test_main_returning_mid_sequence_does_not_cut_cleanup_short(graceful_process: ProcessFactory) -> None:
    child = graceful_process(MAIN_RETURNS, wait_ready=False)
    assert child.wait().returncode == 0
    assert child.stdout.splitlines()[-1] == "cleanup finished"
