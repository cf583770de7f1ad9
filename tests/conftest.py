"""Shared fixtures of graceful's own suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from graceful import Lifecycle, State
from graceful._clock import FakeClock

if TYPE_CHECKING:
    from .child import Child  # child.py imports this module

ROOT = Path(__file__).resolve().parent.parent
BOUND = 10.0  # seconds: the longest any test waits for an event that should come at once


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
def fresh() -> Iterator[Lifecycle]:
    """A real-clock lifecycle installed as the default (``graceful.*`` lands on it); exit recorded."""
    lifecycle = Lifecycle(force_quit=BOUND, exit=Recorder())
    import graceful

    previous = graceful.use(lifecycle)
    yield lifecycle
    graceful.use(previous)
    if lifecycle.state() is not State.RUNNING:
        lifecycle.shutdown("test teardown", wait=False)
        assert lifecycle.wait_for_shutdown(BOUND), "the test left a listener running"


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Child processes a test starts; each is killed (if still running) at teardown."""
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


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


# -- a real redis-server for the queue-worker tests (.ci/run installs it) -----------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start redis-server on a free port with no persistence; its URL; stopped at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: .ci/run installs it (apt-get install redis-server)")
    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + BOUND
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"redis-server did not answer PING on port {port} within {BOUND} s")
            time.sleep(0.02)  # polling the port: redis-server has no readiness signal to wait on
    client.close()
    yield url
    server.terminate()
    server.wait(BOUND)


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    """A client on a flushed database."""
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=3 * BOUND)
    client.flushdb()
    yield client
    client.close()
