"""The signal table, with real signals sent to real processes, and the router on its own."""

from __future__ import annotations

import logging
import os
import signal
import threading
import types

import pytest

import graceful
from graceful import Lifecycle, State
from graceful._signals import Router, handled_signals, signal_handlers
from graceful.lowlevel import shutdown_requested

from .child import Child
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


def service(*, budget: float = 10, hold: bool = False, reload: bool = False, close_extra: str = "") -> Child:
    code = SERVICE.format(budget=budget, hold=hold, reload=reload, close_extra=close_extra or "pass")
    child = Child(code)
    child.expect("serving")
    return child


def track(children: list[Child], child: Child) -> Child:
    children.append(child)
    return child


# -- every row of the table, for real ---------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_term_and_int_shut_down_gracefully_with_exit_0(children: list[Child], sig: int) -> None:
    child = track(children, service())
    child.send(sig)
    assert child.wait() == 0
    assert child.out.splitlines()[-2:] == ["wrap-up listener ran", "shutdown listener ran"]
    assert f"received {signal.Signals(sig).name}" in child.err
    assert "Traceback" not in child.err


@pytest.mark.timeout(30)
def test_int_again_forces_quit_with_70_and_a_report(children: list[Child]) -> None:
    child = track(children, service(hold=True))
    child.send(signal.SIGINT)
    child.expect("wrap-up listener ran")
    child.send(signal.SIGINT)
    assert child.wait() == 70
    assert "force quit: SIGINT again while shutting down" in child.err
    assert "wrap_up listener 'drain': running for" in child.err
    assert "shutdown listener ran" not in child.out


@pytest.mark.timeout(30)
def test_quit_forces_quit_at_once(children: list[Child]) -> None:
    child = track(children, service())
    child.send(signal.SIGQUIT)
    assert child.wait() == 70
    assert "force quit: SIGQUIT received" in child.err
    assert "wrap-up listener ran" not in child.out


@pytest.mark.timeout(30)
def test_term_again_is_logged_and_ignored(children: list[Child]) -> None:
    child = track(children, service(hold=True))
    child.send(signal.SIGTERM)
    child.expect("wrap-up listener ran")
    child.send(signal.SIGTERM)
    child.expect_err("received SIGTERM again: already shutting down, ignored")
    child.tell("go")
    assert child.wait() == 0
    assert child.out.count("shutdown listener ran") == 1


@pytest.mark.timeout(30)
def test_tstp_wraps_up_and_stays_alive_until_term(children: list[Child]) -> None:
    child = track(children, service())
    child.send(signal.SIGTSTP)
    child.expect("wrap-up listener ran")
    child.send(signal.SIGUSR1)  # alive and answering
    child.expect_err("end of thread dump")
    assert child.proc.poll() is None
    assert "shutdown listener ran" not in child.out
    assert "state wrapping_up" in child.err
    child.send(signal.SIGTERM)
    assert child.wait() == 0
    assert child.out.splitlines()[-1] == "shutdown listener ran"


@pytest.mark.timeout(30)
def test_usr1_dumps_threads_tasks_and_status_and_keeps_running(children: list[Child]) -> None:
    child = track(children, service())
    child.send(signal.SIGUSR1)
    child.expect_err("graceful: end of thread dump")
    assert 'Thread "MainThread"' in child.err
    assert 'Thread "graceful-serve-serve"' in child.err
    assert "graceful: state running" in child.err
    assert "Traceback" not in child.err  # a dump, not an exception
    child.send(signal.SIGTERM)
    assert child.wait() == 0


@pytest.mark.timeout(30)
def test_hup_runs_reload_listeners(children: list[Child]) -> None:
    child = track(children, service(reload=True))
    child.send(signal.SIGHUP)
    child.expect("reloaded")
    child.send(signal.SIGHUP)
    child.expect("reloaded")
    child.send(signal.SIGTERM)
    assert child.wait() == 0


@pytest.mark.timeout(30)
def test_hup_without_reload_listeners_shuts_down_gracefully(children: list[Child]) -> None:
    """A closed terminal (SIGHUP, no reload listener) must not leave an orphan serving."""
    child = track(children, service())
    child.send(signal.SIGHUP)
    child.expect_err("received SIGHUP with no reload listener")
    assert child.wait() == 0
    assert "stopped (" in child.err


@pytest.mark.timeout(30)
def test_a_failing_listener_gives_exit_code_1(children: list[Child]) -> None:
    child = track(children, service(close_extra="raise RuntimeError('flush failed')"))
    child.send(signal.SIGTERM)
    assert child.wait() == 1
    assert "shutdown listener 'close' failed" in child.err
    assert "RuntimeError: flush failed" in child.err


@pytest.mark.timeout(30)
def test_deadline_gives_exit_code_70(children: list[Child]) -> None:
    child = track(children, service(budget=0.5, hold=True))
    child.send(signal.SIGTERM)
    assert child.wait() == 70
    assert "deadline of 0.5 s passed" in child.err
    assert "wrap_up listener 'drain'" in child.err


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
def test_systemd_stop_sequence_tstp_then_term(children: list[Child]) -> None:
    """ExecStop=kill -TSTP; sleep; kill -TERM: new work stops, in-flight work completes, exit 0."""
    child = track(children, Child(WORKER))
    child.expect("job 1 started")
    child.send(signal.SIGTSTP)
    child.expect("wrapped up")
    child.tell("finish")
    child.expect("job 1 done")
    child.expect("worker stopped fetching")
    child.send(signal.SIGUSR1)  # still up while paused (the unit's `sleep 10`)
    child.expect_err("end of thread dump")
    assert "closed" not in child.out
    child.send(signal.SIGTERM)
    assert child.wait() == 0
    assert "job 2 started" not in child.out
    assert child.out.splitlines()[-1] == "closed"


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


def _storm(child: Child, mix: list[int], count: int) -> int:
    sent = 0
    for i in range(count):
        try:
            os.kill(child.proc.pid, mix[i % len(mix)])
        except ProcessLookupError:
            break
        sent += 1
    return sent


@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", range(10))
def test_signal_storm_without_int_one_sequence_every_listener_once(children: list[Child], run: int) -> None:
    """2,000 TERM/TSTP/USR1 as fast as possible at a main thread busy logging."""
    child = track(children, Child(STORM))
    child.expect("ready")
    mix = [signal.SIGTSTP, signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR1]
    mix = mix[run % 4 :] + mix[: run % 4]
    assert _storm(child, mix, 2000) == 2000
    child.tell("storm over")
    assert child.wait(30) == 0
    lines = child.out.splitlines()
    assert sorted(lines[1:]) == ["close 0", "close 1", "close 2", "wrap 0", "wrap 1", "wrap 2"]
    assert child.err.count("wrapping up (") == 1
    assert child.err.count("stopped (") == 1
    assert "Traceback" not in child.err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", range(10))
def test_signal_storm_with_int_forces_once(children: list[Child], run: int) -> None:
    """With SIGINT in the mix, the second SIGINT forces: exactly one report, exit 70."""
    child = track(children, Child(STORM))
    child.expect("ready")
    mix = [signal.SIGTERM, signal.SIGINT, signal.SIGTSTP, signal.SIGUSR1]
    mix = mix[run % 4 :] + mix[: run % 4]
    _storm(child, mix, 2000)
    assert child.wait(30) == 70
    assert child.err.count("graceful: force quit:") == 1
    assert child.err.count("wrapping up (") == 1
    for n in range(3):
        assert child.out.count(f"wrap {n}") <= 1
    assert "Traceback" not in child.err


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
    children: list[Child],
) -> None:
    child = track(children, Child(LOCKS))
    child.expect("holding")
    child.send(signal.SIGTERM)
    child.expect("wrap-up ran while main holds the locks")
    assert child.wait(30) == 0
    assert "closed after main let go" in child.err


# -- platforms without some signals --------------------------------------------------------------


def test_handled_signals_skip_what_the_platform_lacks() -> None:
    windows = types.SimpleNamespace(SIGTERM=15, SIGINT=2, SIGBREAK=21)
    assert handled_signals(windows) == [15, 2, 21]
    assert handled_signals() == [
        int(getattr(signal, n))
        for n in ("SIGTERM", "SIGINT", "SIGQUIT", "SIGTSTP", "SIGUSR1", "SIGHUP", "SIGUSR2")
    ]


def test_sigbreak_acts_like_sigterm(lc: Lifecycle) -> None:
    router = Router(lc)
    router._route(21, "SIGBREAK")
    assert lc.wait_for_shutdown(BOUND)
    assert lc.status().reason == "SIGBREAK"


@pytest.mark.timeout(30)
def test_core_and_signal_routing_work_with_a_signal_module_lacking_posix_signals() -> None:
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
    child = Child(code)
    try:
        assert child.wait() == 0, child.err
        assert "exit 0 ran [1]" in child.out
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
def test_signal_is_acted_on_while_main_is_blocked(children: list[Child], blocker: str) -> None:
    """The wakeup fd reaches the coordinator whatever the main thread is blocked in."""
    child = track(children, Child(BLOCKED.format(block=BLOCKERS[blocker])))
    child.expect("blocking")
    child.send(signal.SIGTERM)
    child.expect("acted while main is blocked")
    child.expect("done")
    assert child.wait() == 0
    assert "main woke up first" not in child.out


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
def test_main_returning_mid_sequence_does_not_cut_cleanup_short(children: list[Child]) -> None:
    child = track(children, Child(MAIN_RETURNS))
    assert child.wait() == 0
    assert child.out.splitlines()[-1] == "cleanup finished"
