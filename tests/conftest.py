"""Shared fixtures of graceful's own suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import graceful
from graceful import Lifecycle, State
from graceful._deadline import FakeClock

# A real redis-server for the queue-worker tests (the test extra brings the binary): the fixtures.
from .support.redis_server import rdb, redis_url  # noqa: F401 - fixtures, found by pytest here
from .support.stale_coverage import ERASED, erase_stale_coverage_data

ROOT = Path(__file__).resolve().parent.parent
BOUND = 10.0  # seconds: the longest any test waits for an event that should come at once


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "never_forced: the ``fresh`` lifecycle must end without a force quit")


@pytest.fixture(autouse=True, scope="session")
def _children_import_this_checkout() -> Iterator[None]:
    """The programs the tests start import this checkout's graceful, whatever is installed.

    ``graceful_process`` (like any subprocess) passes the environment through, and a child's
    ``sys.path`` does not have the checkout on it: with graceful installed from a wheel, or
    editable from another checkout, the child would run other code than the test process.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(ROOT), prepend=os.pathsep)
        yield


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under ``coverage run``: erase the data files a failed run left (tests/support/stale_coverage.py)."""
    erase_stale_coverage_data(session.config)


def pytest_report_header(config: pytest.Config) -> str | None:
    erased = config.stash.get(ERASED, [])
    return f"coverage: erased {len(erased)} data file(s) an earlier run left behind" if erased else None


_WATCHED = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGQUIT", "SIGTSTP", "SIGUSR1", "SIGHUP", "SIGUSR2")
    if hasattr(signal, name)
)


@pytest.fixture(autouse=True)
def _signals_left_as_found() -> Iterator[None]:
    """Every test leaves the signal handlers and the wakeup fd as it found them.

    A handler left behind breaks a later test far from its cause (a stale graceful handler
    turns a Ctrl-C into a byte nobody reads): the test that leaves one fails here, by name,
    and the state is put back.
    """
    before = {signum: signal.getsignal(signum) for signum in _WATCHED}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    after = {signum: signal.getsignal(signum) for signum in _WATCHED}
    now = signal.set_wakeup_fd(wakeup)
    changed = {signal.Signals(s).name: after[s] for s in _WATCHED if after[s] != before[s]}
    for signum, handler in before.items():
        signal.signal(signum, handler)  # type: ignore[arg-type]
    assert not changed, f"signal handlers left behind: {changed}"
    assert now == wakeup, f"signal wakeup fd left behind: {now} (was {wakeup})"


@pytest.fixture
def python_ctrl_c() -> None:
    """Python's own Ctrl-C handler for the test (KeyboardInterrupt in the main thread).

    A process started in the background by a shell without job control (``cmd &`` in a
    script) begins with SIGINT ignored, and Python then installs no handler for it: a test of
    what a Ctrl-C does would fail for a reason outside graceful. ``_signals_left_as_found`` puts
    the state back afterwards.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)


class Recorder:
    """An ``exit`` for a Lifecycle that records the code instead of exiting."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def exits() -> Recorder:
    return Recorder()


@pytest.fixture
def lc(clock: FakeClock, exits: Recorder) -> Iterator[Lifecycle]:
    """A fresh lifecycle with a fake clock and a recorded exit; its sequence ends with the test."""
    lifecycle = Lifecycle(force_quit=25, clock=clock, exit=exits)
    yield lifecycle
    if lifecycle.state() is not State.RUNNING:
        # Finish a paused sequence too: its driver thread would keep the interpreter alive.
        lifecycle.shutdown("test teardown", wait=False)
        assert lifecycle.wait_for_shutdown(BOUND), "the test left a listener running"


@pytest.fixture
def fresh(exits: Recorder, request: pytest.FixtureRequest) -> Iterator[Lifecycle]:
    """A real-clock lifecycle installed as the default (``graceful.*`` lands on it).

    Its exit is recorded in ``exits`` (a test that asks for both reads the codes). Its
    sequence ends with the test. In a module marked ``never_forced``, a test whose lifecycle
    was forced fails at teardown.
    """
    lifecycle = Lifecycle(force_quit=BOUND, exit=exits)
    previous = graceful.use(lifecycle)
    yield lifecycle
    graceful.use(previous)
    forced = lifecycle.force_quit_report
    if lifecycle.state() is not State.RUNNING:
        lifecycle.shutdown("test teardown", wait=False)
        assert lifecycle.wait_for_shutdown(BOUND), "the test left a listener running"
    if request.node.get_closest_marker("never_forced") is not None:
        assert forced is None, forced


def run_python(
    code: str, *, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` with this checkout importable; bounded."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )
