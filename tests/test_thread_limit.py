"""A process at its thread limit still stops, reports and exits with the true code (issue #27).

A container's pids limit, or ``RLIMIT_NPROC``, can leave a process unable to start one more
thread; before, SIGTERM then failed outright ("can't start new thread": the sequence's thread
and the deadline's timer were started only then), the deadline never fired and no listener ran.
``run()`` now starts both ahead, and the listener pool runs listeners one by one in the
sequence's thread when it cannot grow. The limit is made for real: once the service runs, the
child caps its own address space (``RLIMIT_AS``) so that no new thread stack fits (root is not
bound by ``RLIMIT_NPROC``, the address space cap binds everyone), and checks that a new thread
really fails.
"""

from __future__ import annotations

import signal

import pytest

from graceful import _listeners
from graceful.testing import ProcessFactory

from .conftest import BOUND

SERVICE = """
import logging, resource, sys, threading, graceful
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
graceful.set_time_to_force_quit(1)

def no_more_threads():
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    # A thread's stack is 8 MiB: 4 MiB of room is enough for objects, not for one more stack.
    resource.setrlimit(resource.RLIMIT_AS, (size + 4 * 1024 * 1024, resource.RLIM_INFINITY))
    forever = threading.Event()
    try:
        for _ in range(1000):  # the stacks glibc keeps from threads that ended are taken too
            threading.Thread(target=forever.wait, daemon=True).start()
    except RuntimeError as exc:
        sys.stdout.write(f"at the thread limit: {{exc}}\\n")  # one write: no other line cuts into it
        sys.stdout.flush()

graceful.add_wrap_up_listener(lambda: print("drained", flush=True), name="drain")
graceful.add_shutdown_listener(lambda: {close}, name="close-pool")
graceful.add_flush_listener(lambda: print("flushed", flush=True), name="flush")

def serve():
    no_more_threads()
    graceful.wait_for_wrap_up()

sys.exit(graceful.run(serve))
"""


@pytest.mark.timeout(60)
def test_at_the_thread_limit_sigterm_still_runs_every_listener_and_exits_0(
    graceful_process: ProcessFactory,
) -> None:
    proc = graceful_process(SERVICE.format(close='print("pool closed", flush=True)'))
    proc.wait_for_output("at the thread limit: can't start new thread")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(BOUND)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["drained", "pool closed", "flushed"]
    assert "handling SIGTERM failed" not in result.stderr
    # Most often the pool could not grow and ran the listeners one by one; when a thread that
    # ended gave its stack back in between, it could: either way, every listener ran.


def test_a_pool_that_cannot_start_a_thread_runs_the_jobs_in_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool's side alone, made certain: no thread at all, and the jobs still run, in order."""
    monkeypatch.setattr(_listeners, "_start_daemon", lambda target, name: False)
    pool = _listeners.Pool()
    ran: list[int] = []
    pool.submit(*(lambda n=n: ran.append(n) for n in range(3)))
    assert ran == [0, 1, 2]


@pytest.mark.timeout(60)
def test_at_the_thread_limit_the_deadline_still_fires_with_its_report(
    graceful_process: ProcessFactory,
) -> None:
    proc = graceful_process(SERVICE.format(close="threading.Event().wait()"))
    proc.wait_for_output("at the thread limit")
    proc.send_signal(signal.SIGTERM)
    result = proc.wait(BOUND)
    assert result.returncode == 70
    assert "force quit: the force-quit deadline of 1 s passed" in result.stderr
    assert "shutdown listener 'close-pool': running for" in result.stderr
