"""graceful.gunicorn when gunicorn cuts a worker's stop short (issue #27, item 5).

gunicorn has three ways to end a worker before its sequence is over: a worker timeout (the
arbiter's SIGABRT, then SIGKILL at its next tick, within about 1 s), a quick shutdown after a
TERM (SIGINT or SIGQUIT to the arbiter: SIGQUIT to the workers, SIGKILL 2 s later), and the
arbiter's SIGKILL at ``graceful_timeout``. In the first two graceful's report must be on stderr
before the SIGKILL; in every case the arbiter's summary must count the worker.
"""

from __future__ import annotations

import signal
import socket

import pytest

from .conftest import BOUND
from .test_host_gunicorn import CONF, WSGI, Start, _events, _pid, gunicorn

pytest.importorskip("gunicorn")

__all__ = ["gunicorn"]  # the fixture, imported for these tests


@pytest.mark.timeout(60)
def test_a_worker_timeout_writes_the_report_before_the_arbiter_kills_it(gunicorn: Start) -> None:
    """--timeout 2, a request that hangs, a shutdown listener of 3 s: the report comes first."""
    child, url = gunicorn("-c", CONF, "-w", "1", "--timeout", "2", WSGI, env={"SLOW": "3"})
    worker = _pid(child.wait_for_line("ready"))
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=BOUND) as client:
        client.sendall(b"GET /hang HTTP/1.0\r\n\r\n")
        child.wait_for_line("hang")
        child.wait_for_output(
            f"Worker (pid:{worker})", stream="stderr"
        )  # the arbiter reaped it: exited, or was SIGKILLed
        replacement = _pid(child.wait_for_line("ready"))
    child.send_signal(signal.SIGTERM)
    result = child.wait(2 * BOUND)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert f"WORKER TIMEOUT (pid:{worker})" in err, err
    assert "graceful: force quit: gunicorn worker timeout (SIGABRT)" in err, err
    assert f"gunicorn worker {worker}: main thread" in err, err
    assert "in hang" in err, err  # where the request hung: what a timeout needs explained
    assert f"Worker (pid:{worker}) exited with code 70" in err, err
    assert err.index("graceful: force quit") < err.index(f"Worker (pid:{worker}) exited")
    assert f"Worker (pid:{worker}) was sent SIGKILL" not in err, err
    assert "2 worker(s) stopped: 1 gracefully, 0 with a failed listener, 1 forced" in err, err
    assert replacement != worker
    assert _events(child)[worker] == ["loaded", "ready", "hang"]  # cut: no listener started


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("quick", "kind"), [(signal.SIGQUIT, "sync"), (signal.SIGINT, "gthread")])
def test_a_quick_shutdown_after_term_writes_the_report_at_once(
    gunicorn: Start, quick: int, kind: str
) -> None:
    """TERM, a shutdown listener of 8 s under way, then QUIT or INT: the report, exit 70, in 2 s."""
    child, _ = gunicorn("-c", CONF, "-w", "1", "-k", kind, WSGI, env={"SLOW": "8"})
    worker = _pid(child.wait_for_line("ready"))
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("slow-close")
    child.send_signal(quick)
    result = child.wait(2 * BOUND)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "Quick shutdown requested" in err, err
    assert "graceful: force quit: gunicorn's quick shutdown (SIGQUIT) reached worker" in err, err
    assert "shutdown listener 'slow-close': running for" in err, err
    assert "in slow_close" in err, err
    assert f"Worker (pid:{worker}) exited with code 70" in err, err
    assert "was sent SIGKILL" not in err, err
    assert "1 worker(s) stopped: 0 gracefully, 0 with a failed listener, 1 forced" in err, err
    _assert_started(_events(child)[worker], "ready", "wrap-up", "shutdown", "slow-close")


@pytest.mark.timeout(60)
def test_a_quick_shutdown_of_a_serving_worker_gives_its_sequence_a_second(gunicorn: Start) -> None:
    """SIGQUIT to the arbiter, a shutdown listener of 8 s: the sequence begins, the report at 1 s."""
    child, _ = gunicorn("-c", CONF, "-w", "1", WSGI, env={"SLOW": "8"})
    worker = _pid(child.wait_for_line("ready"))
    child.send_signal(signal.SIGQUIT)
    result = child.wait(2 * BOUND)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert f"graceful: force quit: gunicorn's quick shutdown (SIGQUIT) gives worker {worker} 1 s" in err, err
    assert "shutdown listener 'slow-close': running for" in err, err
    assert f"Worker (pid:{worker}) exited with code 70" in err, err
    assert "1 worker(s) stopped: 0 gracefully, 0 with a failed listener, 1 forced" in err, err
    _assert_started(_events(child)[worker], "ready", "wrap-up", "shutdown", "slow-close")


@pytest.mark.timeout(60)
def test_workers_the_arbiter_kills_at_graceful_timeout_are_counted(gunicorn: Start) -> None:
    """graceful_timeout 2 s, graceful's budget 6 s: the arbiter SIGKILLs both workers; counted."""
    env = {"SLOW": "8", "GRACEFUL_FORCE_QUIT": "6"}
    child, _ = gunicorn("-c", CONF, "-w", "2", "--graceful-timeout", "2", WSGI, env=env)
    workers = {_pid(child.wait_for_line("ready")), _pid(child.wait_for_line("ready"))}
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("slow-close")
    child.wait_for_line("slow-close")
    result = child.wait(2 * BOUND)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "graceful: force quit" not in err, err
    assert "2 worker(s) stopped: 0 gracefully, 0 with a failed listener, 0 forced" in err, err
    assert "2 killed without graceful's report" in err, err
    for pid in workers:  # gunicorn's last WNOHANG reap may catch a worker, or leave it to on_exit
        assert f"worker {pid} ended without graceful's report" in err, err


def _assert_started(events: list[str], *expected: str) -> None:
    assert [name for name in events if name in expected] == list(expected), events
