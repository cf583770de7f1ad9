"""graceful.gunicorn under a real gunicorn arbiter: real workers, real signals, real requests.

Each test starts ``gunicorn`` in a subprocess (HOME in tmp_path: gunicorn 27 opens a control
socket under ~/.gunicorn), signals the arbiter itself, and reads the ``EVENT <pid> <what>`` lines
that tests/support/gunicorn_app.py prints, to check the order of things in every worker.
"""

from __future__ import annotations

import signal
import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from graceful.testing import GracefulProcess, ProcessFactory

from .conftest import BOUND, ROOT

pytest.importorskip("gunicorn")

WSGI = "tests.support.gunicorn_app:app"
ASGI = "tests.support.gunicorn_app:asgi_app"
CONF = "python:tests.support.gunicorn_conf"
PLAIN = "python:graceful.gunicorn"

Start = Callable[..., tuple[GracefulProcess, str]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def gunicorn(graceful_process: ProcessFactory, tmp_path: Path) -> Start:
    """Start gunicorn with these arguments; returns the arbiter's process and the base URL."""

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[GracefulProcess, str]:
        port = _free_port()
        argv = ["gunicorn", "--chdir", str(ROOT), "-b", f"127.0.0.1:{port}", *args]
        code = f"import sys; sys.argv = {argv!r}\nfrom gunicorn.app.wsgiapp import run\nrun()\n"
        child = graceful_process(code, env={"HOME": str(tmp_path), **(env or {})}, wait_ready=False)
        return child, f"http://127.0.0.1:{port}"

    return start


class Request(threading.Thread):
    """One GET in a thread; ``body`` once it answered, ``error`` if it failed."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body: str | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.url, timeout=2 * BOUND) as response:
                self.body = response.read().decode()
        except BaseException as exc:  # kept for the assertion
            self.error = exc


def _pid(line: str) -> int:
    return int(line.split()[1])


def _events(child: GracefulProcess) -> dict[int, list[str]]:
    by_pid: dict[int, list[str]] = {}
    for line in child.stdout.splitlines():
        if line.startswith("EVENT "):
            _, pid, what = line.split(" ", 2)
            by_pid.setdefault(int(pid), []).append(what)
    return by_pid


def _assert_in_order(events: list[str], *expected: str) -> None:
    for name in expected:
        assert events.count(name) == 1, events
    positions = [events.index(name) for name in expected]
    assert positions == sorted(positions), events


def _sigterm_with_a_request_in_flight(gunicorn: Start, *args: str, ready: str = "ready") -> None:
    child, url = gunicorn(*args)
    workers = {_pid(child.wait_for_line(ready)), _pid(child.wait_for_line(ready))}
    request = Request(url + "/slow")
    in_flight = _pid(child.wait_for_line("request-start"))
    child.send_signal(signal.SIGTERM)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    request.join(BOUND)
    assert request.error is None, child.stderr
    assert request.body == "done after wrap-up\n", child.stderr
    events = _events(child)
    assert in_flight in workers
    for pid in workers:  # each worker ran each listener once, wrap-up first
        _assert_in_order(events[pid], "wrap-up", "shutdown")
    _assert_in_order(events[in_flight], "request-start", "wrap-up", "request-end", "shutdown")
    assert "2 worker(s) stopped: 2 gracefully" in child.stderr, child.stderr


@pytest.mark.timeout(60)
def test_sync_workers_finish_the_request_in_flight_then_run_shutdown_listeners(gunicorn: Start) -> None:
    """sync, 2 workers, plain -c python:graceful.gunicorn: the SIGTERM sequence in each worker."""
    _sigterm_with_a_request_in_flight(gunicorn, "-c", PLAIN, "-w", "2", WSGI, ready="loaded")


@pytest.mark.timeout(60)
def test_gthread_workers_finish_the_request_in_flight_then_run_shutdown_listeners(gunicorn: Start) -> None:
    """gthread, 2 workers, a user's config file that redefines post_worker_init."""
    _sigterm_with_a_request_in_flight(
        gunicorn, "-c", CONF, "-w", "2", "-k", "gthread", "--threads", "4", WSGI
    )


@pytest.mark.timeout(60)
def test_uvicorn_workers_finish_the_request_in_flight_then_run_shutdown_listeners(gunicorn: Start) -> None:
    """uvicorn-worker, 2 workers: the same order, though uvicorn swaps in its own TERM handler."""
    pytest.importorskip("uvicorn_worker")
    _sigterm_with_a_request_in_flight(
        gunicorn, "-c", CONF, "-w", "2", "-k", "uvicorn_worker.UvicornWorker", ASGI
    )


@pytest.mark.timeout(60)
def test_a_max_requests_recycle_runs_the_sequence_in_the_retiring_worker(gunicorn: Start) -> None:
    """--max-requests 1: the worker that retires after its request runs wrap-up then shutdown."""
    child, url = gunicorn("-c", CONF, "-w", "1", "--max-requests", "1", WSGI)
    first = _pid(child.wait_for_line("ready"))
    request = Request(url + "/")
    request.join(BOUND)
    assert request.body == "fast\n", request.error
    second = _pid(child.wait_for_line("ready"))  # the arbiter replaced it
    child.send_signal(signal.SIGTERM)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    assert second != first
    events = _events(child)
    _assert_in_order(events[first], "ready", "wrap-up", "shutdown")
    assert "2 worker(s) stopped: 2 gracefully" in child.stderr, child.stderr


@pytest.mark.timeout(60)
def test_preloaded_listeners_run_once_in_every_worker_and_never_in_the_arbiter(gunicorn: Start) -> None:
    """--preload: the app (and its listeners) load once in the arbiter; each worker runs them once."""
    child, _ = gunicorn("-c", CONF, "-w", "2", "--preload", WSGI)
    loaded = _pid(child.wait_for_line("loaded"))
    workers = {_pid(child.wait_for_line("ready")), _pid(child.wait_for_line("ready"))}
    child.send_signal(signal.SIGTERM)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    events = _events(child)
    assert loaded == child.pid
    assert loaded not in workers
    assert events[loaded] == ["loaded"]  # the arbiter ran no listener
    for pid in workers:
        assert events[pid] == ["ready", "wrap-up", "shutdown"]


@pytest.mark.timeout(60)
def test_a_stuck_listener_is_reported_before_the_arbiter_kills_the_worker(gunicorn: Start) -> None:
    """graceful_timeout 3 s: graceful's report (listener, stack) at 2 s, exit 70, no SIGKILL."""
    child, _ = gunicorn("-c", CONF, "-w", "1", "--graceful-timeout", "3", WSGI, env={"STUCK": "1"})
    worker = _pid(child.wait_for_line("ready"))
    child.send_signal(signal.SIGTERM)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    err = child.stderr
    assert "graceful: force quit: the force-quit deadline of 2 s passed" in err, err
    assert "shutdown listener 'stuck-flush'" in err, err
    assert "in stuck_flush" in err, err
    assert f"gunicorn worker {worker}: main thread" in err, err
    assert f"Worker (pid:{worker}) exited with code 70" in err, err
    assert "SIGKILL" not in err, err
    assert err.index("graceful: force quit") < err.index("Shutting down: Master")
    assert "1 forced (graceful's report on stderr)" in err, err
    assert _events(child)[worker] == ["loaded", "ready", "wrap-up", "shutdown"]


@pytest.mark.timeout(60)
def test_a_hup_reload_runs_the_sequence_in_each_replaced_worker(gunicorn: Start) -> None:
    """SIGHUP: the arbiter boots a new worker and TERMs the old one, which runs its listeners."""
    child, _ = gunicorn("-c", CONF, "-w", "1", WSGI)
    old = _pid(child.wait_for_line("ready"))
    child.send_signal(signal.SIGHUP)
    new = _pid(child.wait_for_line("ready"))
    child.wait_for_output(f"gunicorn worker {old} stopped gracefully", stream="stderr")
    child.send_signal(signal.SIGTERM)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    assert new != old
    events = _events(child)
    _assert_in_order(events[old], "ready", "wrap-up", "shutdown")
    _assert_in_order(events[new], "ready", "wrap-up", "shutdown")


def test_the_budget_leaves_a_second_before_the_arbiter_kills() -> None:
    """budget_for: graceful_timeout - 1, or half of it when that is 2 s or less."""
    from graceful.gunicorn import budget_for

    assert budget_for(30) == 29
    assert budget_for(3) == 2
    assert budget_for(2) == 1
    assert budget_for(1) == 0.5


def test_worker_exit_in_the_arbiter_does_nothing() -> None:
    """gunicorn calls worker_exit in the arbiter for a vanished worker: graceful stays RUNNING."""
    import graceful
    from graceful.gunicorn import worker_exit

    worker_exit(object(), object())
    assert graceful.state() is graceful.State.RUNNING


@pytest.mark.timeout(60)
def test_the_example_config_file_and_app_flush_at_sigterm(gunicorn: Start) -> None:
    """examples/gunicorn.conf.py + examples/gunicorn_app.py: ready, then the buffer is flushed."""
    conf = str(ROOT / "examples" / "gunicorn.conf.py")
    child, url = gunicorn("-c", conf, "-w", "1", "--log-level", "info", "examples.gunicorn_app:app")
    child.wait_for_output(" ready", stream="stderr")
    for path, expected in (("/readyz", "ready\n"), ("/hello", "hello\n")):
        request = Request(url + path)
        request.join(BOUND)
        assert request.body == expected, (request.error, child.stderr)
    child.send_signal(signal.SIGTERM)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    assert "flushed 1 line(s)" in child.stderr, child.stderr
    assert child.stderr.index("its loop has ended") < child.stderr.index("flushed 1 line(s)")


@pytest.mark.timeout(60)
def test_a_failing_listener_is_logged_and_counted_and_the_others_still_run(gunicorn: Start) -> None:
    """A shutdown listener that raises: logged by name, counted in the arbiter's summary."""
    child, _ = gunicorn("-c", CONF, "-w", "1", WSGI, env={"FAIL": "1"})
    worker = _pid(child.wait_for_line("ready"))
    child.send_signal(signal.SIGTERM)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    assert "'failing-close'" in child.stderr, child.stderr
    assert "ZeroDivisionError" in child.stderr, child.stderr
    assert "1 worker(s) stopped: 0 gracefully, 1 with a failed listener" in child.stderr, child.stderr
    _assert_in_order(_events(child)[worker], "ready", "wrap-up", "shutdown")


@pytest.mark.timeout(60)
def test_a_quick_shutdown_still_runs_the_listeners(gunicorn: Start) -> None:
    """SIGINT to the arbiter (gunicorn's quick shutdown): the worker's fast listeners still run."""
    child, _ = gunicorn("-c", CONF, "-w", "1", WSGI)
    worker = _pid(child.wait_for_line("ready"))
    child.send_signal(signal.SIGINT)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    _assert_in_order(_events(child)[worker], "ready", "wrap-up", "shutdown")
    assert "1 worker(s) stopped: 1 gracefully" in child.stderr, child.stderr
