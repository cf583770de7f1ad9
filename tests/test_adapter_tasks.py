"""Threads, executors and child processes under graceful.run()."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import graceful
from graceful import Lifecycle
from graceful.adapters import adapt
from graceful.adapters.process import ProcessService
from graceful.adapters.tasks import ExecutorService, ThreadService, cancel_at_shutdown

from .conftest import BOUND, ROOT


def test_adapt_recognises_threads_executors_and_children() -> None:
    thread = threading.Thread(target=lambda: None)
    assert isinstance(adapt(thread), ThreadService)
    with ThreadPoolExecutor(1) as pool:
        assert isinstance(adapt(pool), ExecutorService)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert isinstance(adapt(child), ProcessService)
    finally:
        child.wait(BOUND)


@pytest.mark.timeout(30)
def test_a_cooperative_thread_is_started_and_joined(fresh: Lifecycle) -> None:
    rounds: list[int] = []

    def work() -> None:
        while not graceful.is_stopping():
            rounds.append(1)
            if len(rounds) == 3:
                graceful.shutdown("enough", wait=False)
            threading.Event().wait(0.001)

    thread = threading.Thread(target=work, name="poller")
    assert graceful.run(thread) == 0
    assert not thread.is_alive()
    assert len(rounds) >= 3


@pytest.mark.timeout(30)
def test_a_thread_that_ignores_is_stopping_is_named_at_the_deadline(fresh: Lifecycle) -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, args=(BOUND,), name="stubborn", daemon=True)
    service = ThreadService(thread)
    ctx = graceful.Context(fresh, "stubborn")
    thread.start()
    fresh.set_time_to_force_quit(0.05)
    fresh.shutdown(wait=False)
    service.wrap_up(ctx)  # returns after the remaining budget
    assert thread.is_alive()
    release.set()
    thread.join(BOUND)


@pytest.mark.timeout(30)
def test_an_executor_takes_no_work_after_wrap_up_and_cancels_what_never_started(
    fresh: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    gate = threading.Event()
    running = pool.submit(gate.wait, BOUND)
    queued = [pool.submit(lambda: None) for _ in range(3)]
    refused: list[BaseException] = []

    def late_work() -> None:
        try:
            pool.submit(lambda: None)
        except RuntimeError as exc:
            refused.append(exc)
        gate.set()

    fresh.add_shutdown_listener(late_work)  # runs after the executor's wrap-up, before its close
    code = graceful.run([pool, lambda: graceful.shutdown(wait=False)])
    assert code == 0
    assert refused
    assert running.result(BOUND) is True
    assert all(f.done() for f in queued)


@pytest.mark.timeout(30)
def test_executor_close_logs_cancelled_work(fresh: Lifecycle, caplog: pytest.LogCaptureFixture) -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    gate = threading.Event()
    pool.submit(gate.wait, BOUND)
    queued = [pool.submit(lambda: None) for _ in range(3)]
    service = ExecutorService(pool)
    ctx = graceful.Context(fresh, "pool")
    service.wrap_up(ctx)
    queued[-1].add_done_callback(lambda _: gate.set())  # the running job ends once all are cancelled
    service.close(ctx)
    assert all(f.cancelled() for f in queued)
    assert "cancelled 3 queued work item(s)" in caplog.text


CHILD = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import threading, graceful
stop = threading.Event()
graceful.add_wrap_up_listener(stop.set)
graceful.add_wrap_up_listener(lambda: print("child wrapped up", flush=True))
graceful.add_shutdown_listener(lambda: print("child cleaned up", flush=True))
def serve():
    print("child ready", flush=True)
    stop.wait()
sys.exit(graceful.run(serve))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_soon(lifecycle: Lifecycle) -> object:
    """A second server that asks for shutdown once running, so the stop never races run()'s start."""

    def serve() -> None:
        lifecycle.shutdown("parent stops", wait=False)

    return serve


@pytest.mark.timeout(30)
def test_a_child_using_graceful_is_stopped_gracefully_and_reaped(fresh: Lifecycle) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.readline().strip() == "child ready"
        assert graceful.run([child, _stop_soon(fresh)]) == 0
        assert "child cleaned up" in child.stdout.read()
    assert child.returncode == 0
    assert not _alive(child.pid)  # reaped: no zombie


@pytest.mark.timeout(30)
def test_a_child_that_ignores_sigterm_is_killed_at_the_deadline_and_reaped(
    fresh: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.readline().strip() == "up"
        fresh.set_time_to_force_quit(0.5)
        assert graceful.run([child, _stop_soon(fresh)]) == 70
    assert child.returncode == -signal.SIGKILL
    assert "sending SIGKILL" in caplog.text


@pytest.mark.timeout(30)
def test_a_child_that_crashes_stops_the_others_with_exit_code_1(fresh: Lifecycle) -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    stop = threading.Event()
    fresh.add_wrap_up_listener(stop.set)
    assert graceful.run([stop.wait, child]) == 1


@pytest.mark.timeout(30)
def test_a_stop_that_arrives_while_the_child_starts_is_not_lost(fresh: Lifecycle) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fresh.shutdown("stop before serve", wait=False)  # the child service has not started serving yet
    service = ProcessService(child)
    ctx = graceful.Context(fresh, "child")
    service.serve(ctx)  # sends SIGTERM at once instead of waiting for ever
    assert child.returncode == -signal.SIGTERM


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pause_signal", [None, signal.SIGTSTP])
def test_a_pause_reaches_a_child_only_with_a_pause_signal(fresh: Lifecycle, pause_signal: int | None) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.readline().strip() == "child ready"
        service = ProcessService(child, pause_signal=pause_signal)
        ctx = graceful.Context(fresh, "child")
        fresh.wrap_up("pause")
        service.wrap_up(ctx)
        if pause_signal is not None:  # the child wraps up and stays alive
            assert child.stdout.readline().strip() == "child wrapped up"
            assert child.poll() is None
        fresh.shutdown("stop", wait=False)
        service.close(ctx)
        rest = child.stdout.read()
    assert child.returncode == 0
    assert ("child wrapped up" in rest) is (pause_signal is None)  # without one, it wraps up at SIGTERM


TREE = """
import signal, subprocess, sys, time
if sys.argv[1:] == ["ignore"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; "
    + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if sys.argv[1:] == ["ignore"] else "")
    + "print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
grandchild.stdout.readline()
print(grandchild.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie that is no longer ours to reap."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] in {"Z", "X"} and int(fields[1]) != os.getpid()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("mode", "code"), [("obey", 0), ("ignore", 70)])
def test_a_child_process_tree_is_stopped_whole(fresh: Lifecycle, mode: str, code: int) -> None:
    """SIGTERM, and SIGKILL at force quit, reach the grandchildren of a child that leads a group."""
    child = subprocess.Popen(
        [sys.executable, "-c", TREE, mode], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert child.stdout is not None
    with child.stdout:
        grandchild = int(child.stdout.readline())
        fresh.set_time_to_force_quit(1)
        assert graceful.run([child, _stop_soon(fresh)]) == code
    assert child.returncode == (-signal.SIGTERM if mode == "obey" else -signal.SIGKILL)
    deadline = time.monotonic() + BOUND
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the kernel's process table: there is no event to wait on
    assert _gone(grandchild)


@pytest.mark.timeout(30)
def test_an_asyncio_task_is_cancelled_with_a_reason_at_shutdown(fresh: Lifecycle) -> None:
    import asyncio

    reasons: list[tuple[object, ...]] = []

    async def background() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            reasons.append(exc.args)
            raise

    async def main() -> None:
        task = asyncio.create_task(background(), name="refresher")
        waiter = cancel_at_shutdown(task)
        assert not waiter.done()
        fresh.shutdown("test", wait=False)
        await asyncio.Event().wait()  # the server itself is cancelled at wrap-up

    assert graceful.run(main()) == 0
    assert reasons == [("graceful: shutdown",)]
    assert [s.state for s in fresh.status().listeners if s.name == "cancel task refresher"] == ["done"]


def test_cancel_at_shutdown_takes_only_tasks() -> None:
    with pytest.raises(TypeError, match=r"asyncio\.Task"):
        cancel_at_shutdown(object())  # type: ignore[arg-type]
