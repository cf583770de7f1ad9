"""graceful.gunicorn's probes and drain delay under a real gunicorn arbiter (issue #19).

Each test starts ``gunicorn`` in a subprocess with ``GRACEFUL_PROBE_PORT`` and
``GRACEFUL_DRAIN_DELAY`` set, sends the arbiter a real SIGTERM, and asks the probe port and the
app over real HTTP: the probe must say 503 while the app still answers 200, then the workers
must stop and the arbiter exit 0.
"""

from __future__ import annotations

import http.client
import signal
import urllib.error
import urllib.request

import pytest

from graceful.testing import GracefulProcess

from .conftest import BOUND
from .test_host_gunicorn import ASGI, CONF, WSGI, Start, _events, _free_port, _pid, gunicorn

pytest.importorskip("gunicorn")

__all__ = ["gunicorn"]  # the fixture, imported for these tests


def _get(url: str) -> tuple[int, str]:
    """GET url (a fresh connection each time): its status and body; 503 is an answer too."""
    try:
        with urllib.request.urlopen(url, timeout=BOUND) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _start_two_workers(
    gunicorn: Start, delay: str, *args: str, kind: str = "gthread", app: str = WSGI
) -> tuple[GracefulProcess, str, str]:
    probe = _free_port()
    env = {
        "GRACEFUL_PROBE_PORT": str(probe),
        "GRACEFUL_PROBE_HOST": "127.0.0.1",
        "GRACEFUL_DRAIN_DELAY": delay,
    }
    child, url = gunicorn("-c", CONF, "-k", kind, "-w", "2", *args, app, env=env)
    workers = {_pid(child.wait_for_line("ready")), _pid(child.wait_for_line("ready"))}
    assert len(workers) == 2
    return child, url, f"http://127.0.0.1:{probe}"


def _term_and_wait_for_wrap_up(child: GracefulProcess) -> None:
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("wrap-up")  # readiness turns 503 before the wrap-up listeners run
    child.wait_for_line("wrap-up")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["gthread", "sync"])
def test_a_fixed_drain_delay_keeps_serving_after_the_probe_turned_503(gunicorn: Start, kind: str) -> None:
    """Both workers answer the probe port; after TERM /readyz is 503, / still 200, then exit 0."""
    child, url, probes = _start_two_workers(gunicorn, "6", "--graceful-timeout", "12", kind=kind)
    assert _get(probes + "/readyz") == (200, "ready\n")
    _term_and_wait_for_wrap_up(child)
    for _ in range(4):  # fresh connections: the kernel spreads them over both workers
        assert _get(probes + "/readyz") == (503, "not ready\n")
        assert _get(probes + "/livez") == (200, "live\n")
        assert _get(url + "/") == (200, "fast\n"), child.stderr
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    assert child.stderr.count("its drain delay is over") == 2, child.stderr
    assert "2 worker(s) stopped: 2 gracefully" in child.stderr, child.stderr


@pytest.mark.timeout(90)
def test_auto_ends_in_every_worker_once_one_probe_answered_503(gunicorn: Start) -> None:
    """auto:60: / is served after TERM until /readyz answers 503; then both workers stop, exit 0."""
    child, url, probes = _start_two_workers(gunicorn, "auto:60", "--graceful-timeout", "90")
    _term_and_wait_for_wrap_up(child)
    for _ in range(4):  # no probe answered 503 yet: the delay cannot end, whatever the pause
        assert _get(url + "/") == (200, "fast\n"), child.stderr
    assert "stops accepting" not in child.stderr, child.stderr
    assert _get(probes + "/readyz") == (503, "not ready\n")  # one worker tells the balancer
    assert child.wait(2 * BOUND).returncode == 0, child.stderr  # long before auto's bound of 60 s
    assert child.stderr.count("its drain delay is over") == 1, child.stderr
    assert child.stderr.count("a sibling worker's auto drain delay ended") == 1, child.stderr
    assert "2 worker(s) stopped: 2 gracefully" in child.stderr, child.stderr


@pytest.mark.timeout(60)
def test_the_quick_shutdown_does_not_wait_for_the_drain_delay(gunicorn: Start) -> None:
    """SIGINT to the arbiter: the workers stop at once, though the drain delay is 60 s."""
    child, _, _ = _start_two_workers(gunicorn, "60", "--graceful-timeout", "90")
    child.send_signal(signal.SIGINT)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    assert "stops accepting" not in child.stderr, child.stderr


def _still_ready_then_quit(child: GracefulProcess, probes: str) -> None:
    """Every worker answers /readyz 200 and none held a TERM; then SIGINT, and exit 0."""
    for _ in range(4):
        assert _get(probes + "/readyz") == (200, "ready\n")
    assert "stops accepting" not in child.stderr, child.stderr
    child.send_signal(signal.SIGINT)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr


@pytest.mark.timeout(60)
def test_a_worker_recycled_alone_leaves_the_probe_to_its_siblings_and_does_not_drain(gunicorn: Start) -> None:
    """max_requests: the retiring worker stops without the 60 s delay; /readyz stays 200."""
    child, url, probes = _start_two_workers(gunicorn, "60", "--max-requests", "2", "--graceful-timeout", "90")
    for _ in range(4):  # 4 requests over 2 workers: one of them reaches max_requests
        assert _get(url + "/") == (200, "fast\n"), child.stderr
    retired = _pid(child.wait_for_line("shutdown"))  # within BOUND: it did not wait the 60 s delay
    replacement = _pid(child.wait_for_line("ready"))
    assert replacement != retired
    _still_ready_then_quit(child, probes)


@pytest.mark.timeout(60)
def test_a_hup_reload_is_no_instance_stop_the_old_workers_do_not_drain(gunicorn: Start) -> None:
    """SIGHUP: old workers stop without the 60 s delay; the new ones answer /readyz 200."""
    child, _, probes = _start_two_workers(gunicorn, "60", "--graceful-timeout", "90")
    old = {pid for pid, events in _events(child).items() if "ready" in events}
    child.send_signal(signal.SIGHUP)
    for pid in old:  # within BOUND, not after the 60 s delay
        child.wait_for_output(f"gunicorn worker {pid} stopped gracefully", stream="stderr")
    child.wait_for_line("ready")  # the new workers answer the probes
    child.wait_for_line("ready")
    _still_ready_then_quit(child, probes)


@pytest.mark.timeout(60)
def test_the_uvicorn_worker_answers_probes_but_holds_no_term(gunicorn: Start) -> None:
    """uvicorn-worker: /readyz 200 from both workers; at TERM they stop at once (no 60 s delay)."""
    pytest.importorskip("uvicorn_worker")
    child, _, probes = _start_two_workers(
        gunicorn, "60", "--graceful-timeout", "90", kind="uvicorn_worker.UvicornWorker", app=ASGI
    )
    assert _get(probes + "/readyz") == (200, "ready\n")
    child.send_signal(signal.SIGTERM)
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    assert "stops accepting" not in child.stderr, child.stderr
    assert "2 worker(s) stopped: 2 gracefully" in child.stderr, child.stderr


@pytest.mark.timeout(90)
def test_after_the_drain_delay_idle_keep_alive_connections_are_closed_not_left_to_linger(
    gunicorn: Start,
) -> None:
    """gthread keeps idle kept-alive connections 2 s at its stop: after the delay graceful closes them."""
    child, url, _ = _start_two_workers(gunicorn, "0.5", "--graceful-timeout", "12", "--keep-alive", "30")
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"fast\n")  # kept alive, now idle
        assert conn.sock is not None
        idle = conn.sock
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("closed 1 idle keep-alive connection(s)", stream="stderr")
        assert idle.recv(1) == b""  # closed by the server, not left open
    finally:
        conn.close()
    assert child.wait(2 * BOUND).returncode == 0, child.stderr
    assert "2 worker(s) stopped: 2 gracefully" in child.stderr, child.stderr


@pytest.mark.timeout(90)
def test_a_term_before_the_uvicorn_worker_serves_still_stops_it(gunicorn: Start) -> None:
    """uvicorn-worker: a TERM between graceful's hook and uvicorn's own handler is sent on to uvicorn."""
    pytest.importorskip("uvicorn_worker")
    env = {"TEST_SLOW_BOOT": "1"}  # the worker waits 1 s after post_worker_init, before it serves
    child, _ = gunicorn(
        "-c", CONF, "-k", "uvicorn_worker.UvicornWorker", "-w", "1", "--graceful-timeout", "60", ASGI, env=env
    )
    child.wait_for_line("ready")  # graceful's hook ran; uvicorn has not taken SIGTERM yet
    child.send_signal(signal.SIGTERM)
    assert child.wait(2 * BOUND).returncode == 0, (
        child.stderr
    )  # before: SIG_DFL was not chained, the TERM lost
    assert "1 worker(s) stopped: 1 gracefully" in child.stderr, child.stderr
