"""graceful.asgi.lifespan() under real ASGI servers it does not start, with real SIGTERMs.

Each server runs its own CLI (``python -m uvicorn``, ``hypercorn``, ``granian``) on
tests/support/asgi_app.py in a child process; the test talks to it with a real HTTP client and reads
the lines the app and graceful's listeners print. The in-process tests at the end drive the
lifespan protocol by hand, as a server would, for the edge cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import graceful
import graceful.asgi
from graceful import Lifecycle, readiness
from graceful.testing import GracefulProcess, ProcessFactory

from .conftest import BOUND, ROOT, Recorder
from .support.web import free_port, get

pytest.importorskip("hypercorn")
pytest.importorskip("granian")

# What each CLI looks like, and how it exits after a clean SIGTERM. uvicorn's CLI restores the
# default handler and re-raises the signal it caught (uvicorn #1600): the process dies of
# SIGTERM, -15 here (143 in a shell). hypercorn and granian return 0.
SERVERS: dict[str, tuple[Callable[[int], list[str]], int]] = {
    "uvicorn": (lambda port: ["uvicorn", "tests.support.asgi_app:app", "--port", str(port)], -15),
    # hypercorn's 3 s drain would be tight on a loaded machine: 20 s, the test releases at once
    "hypercorn": (
        lambda port: [
            "hypercorn",
            "tests.support.asgi_app:app",
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "20",
        ],
        0,
    ),
    # --workers 0: hypercorn serves in its own process, no worker process (what docs/hosts/asgi.md advises)
    "hypercorn-w0": (
        lambda port: [
            "hypercorn",
            "tests.support.asgi_app:app",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "0",
        ],
        0,
    ),
    "granian": (
        lambda port: [
            "granian",
            "--interface",
            "asgi",
            "--port",
            str(port),
            "--workers-kill-timeout",
            "30",  # the host's own bound: graceful's report must come well before it
            "tests.support.asgi_app:app",
        ],
        0,
    ),
}


def serve(graceful_process: ProcessFactory, server: str, port: int, **env: str) -> GracefulProcess:
    """Start ``server``'s CLI (as ``python -m``) on the test app; return once lifespan startup ran."""
    argv = SERVERS[server][0](port)
    code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_module({argv[0]!r}, run_name='__main__', alter_sys=True)"
    return graceful_process(code, env=env, wait_ready=False)


def wait_until(check: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    """Poll ``check`` (bounded) until it is True."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def probe(port: int) -> int | None:
    """The status of ``GET /readyz`` on the probe port, or None if nothing answers yet."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
        conn.request("GET", "/readyz")
        status = conn.getresponse().status
        conn.close()
        return status
    except ConnectionRefusedError:
        return None


def refused(port: int) -> bool:
    """True once a new connection to ``port`` is refused (the server stopped accepting).

    A connection that reached the accept queue just before the server closed its listening
    socket is reset instead of refused: the same answer, one instant earlier."""
    with socket.socket() as sock:
        sock.settimeout(BOUND)
        try:
            sock.connect(("127.0.0.1", port))
        except (ConnectionRefusedError, ConnectionResetError):
            return True
    return False


def lines(child: GracefulProcess) -> list[str]:
    return child.stdout.splitlines()


def index(child: GracefulProcess, text: str) -> int:
    found = [i for i, line in enumerate(lines(child)) if text in line]
    assert found, f"no line with {text!r} in:\n{child.stdout}\nstderr:\n{child.stderr}"
    return found[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", list(SERVERS))
def test_sigterm_mid_request_drains_then_runs_the_sequence(
    server: str, graceful_process: ProcessFactory, tmp_path: Path
) -> None:
    """Ready after the app's startup; at SIGTERM the request completes, then wrap-up, then shutdown."""
    port, probes = free_port(), free_port()
    release = tmp_path / "release"
    child = serve(graceful_process, server, port, GRACEFUL_PROBE_PORT=str(probes), RELEASE_FILE=str(release))
    assert child.wait_for_line("inner startup") == "inner startup ready=False"  # the app's startup first
    wait_until(lambda: probe(probes) == 200, "/readyz answering 200")
    wait_until(lambda: not refused(port), "the server accepting")
    assert get(port, "/")[:2] == (200, "ready=True")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, port, "/slow")
        child.wait_for_line("in slow")
        child.send_signal(signal.SIGTERM)
        if server != "hypercorn":  # its main process keeps the socket: new connections hang
            wait_until(lambda: refused(port), "new connections refused after SIGTERM")
            assert "wrap-up listener" not in child.stdout  # lifespan shutdown waits for the drain
        release.touch()
        assert future.result(BOUND)[:2] == (200, "slow done")
    assert child.wait(30).returncode == SERVERS[server][1]
    out_slow, wrap_up = index(child, "out slow"), index(child, "wrap-up listener stopping=True")
    assert out_slow < wrap_up < index(child, "shutdown listener")
    assert wrap_up < index(child, "inner shutdown stopping=True")
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", list(SERVERS))
def test_a_stuck_listener_is_reported_before_the_host_gives_up(
    server: str, graceful_process: ProcessFactory
) -> None:
    """A shutdown listener that never returns: the report names it at graceful's 1 s deadline."""
    port = free_port()
    child = serve(graceful_process, server, port, STUCK="1", GRACEFUL_FORCE_QUIT="1")
    child.wait_for_line("inner startup")
    wait_until(lambda: not refused(port), "the server accepting")
    child.send_signal(signal.SIGTERM)
    code = child.wait(30).returncode
    assert "graceful: force quit: the force-quit deadline of 1 s passed" in child.stderr
    assert "shutdown listener 'stuck-listener': running for" in child.stderr
    assert "wrap-up listener" in child.stdout
    # uvicorn (and hypercorn --workers 0) run the app in their own process: 70 is the exit code.
    # hypercorn and granian run it in a worker whose exit code their main process drops.
    assert code == (70 if server in ("uvicorn", "hypercorn-w0") else 0)
    assert "Killing worker" not in child.stdout + child.stderr  # granian's kill timeout never came


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["raises", "silent"])
def test_an_app_without_lifespan_support_still_gets_the_sequence(
    mode: str, graceful_process: ProcessFactory
) -> None:
    """The inner app raises on (or ignores) the lifespan scope: ready, listeners, a clean exit."""
    port = free_port()
    child = serve(graceful_process, "uvicorn", port, INNER=mode)
    wait_until(lambda: not refused(port), "the server accepting")
    assert get(port, "/")[:2] == (200, "ready=True")
    child.send_signal(signal.SIGTERM)
    assert child.wait(30).returncode == -15
    assert index(child, "wrap-up listener") < index(child, "shutdown listener")
    assert "inner shutdown" not in child.stdout
    assert "Application shutdown complete" in child.stderr  # uvicorn heard the answer
    assert "Traceback" not in child.stderr


# -- a start that cannot succeed is refused, under each CLI (issue #27, 2 and 6) ------------------

# How each CLI ends when the lifespan startup fails. uvicorn exits 3 (and prints the message);
# hypercorn --workers 0 and granian exit 1. hypercorn with its worker process stops serving too,
# but its main process exits 0: its run() overwrites the worker's code (hypercorn #269).
REFUSED = {"uvicorn": 3, "hypercorn": 0, "hypercorn-w0": 1, "granian": 1}


def refusing(server: str, port: int, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``server``'s CLI, which must refuse to start: it exits by itself, within 20 s.

    In a session of its own: if it keeps serving instead (the bug), the whole process group is
    killed, so that no worker process (hypercorn's, granian's, uvicorn's) outlives the test.
    """
    argv = SERVERS[server][0](port)
    code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_module({argv[0]!r}, run_name='__main__', alter_sys=True)"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=BOUND)
        raise AssertionError(f"{server} did not refuse to start: it kept running\n{out}\n{err}") from None
    finally:
        if proc.poll() is None:  # interrupted otherwise (the test's timeout): leave nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(BOUND)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


BAD_SETTINGS = [
    ("uvicorn", {"GRACEFUL_PROBE_PORT": "abc"}, "GRACEFUL_PROBE_PORT='abc' is not a port number"),
    ("uvicorn", {"GRACEFUL_PROBE_PORT": "80a"}, "GRACEFUL_PROBE_PORT='80a' is not a port number"),
    ("uvicorn", {"GRACEFUL_TERMINATION_GRACE": "x"}, "GRACEFUL_TERMINATION_GRACE='x' is not a number"),
    ("hypercorn", {"GRACEFUL_TIMEOUT_STOP_SEC": "5q"}, "GRACEFUL_TIMEOUT_STOP_SEC='5q' is not a time span"),
    (
        "hypercorn-w0",
        {"GRACEFUL_DRAIN_DELAY": "soon", "GRACEFUL_TERMINATION_GRACE": "30"},
        "GRACEFUL_DRAIN_DELAY='soon': set it to",
    ),
    ("granian", {"GRACEFUL_PROBE_PORT": "abc"}, "GRACEFUL_PROBE_PORT='abc' is not a port number"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("server", "env", "message"), BAD_SETTINGS, ids=[f"{s}-{'+'.join(e)}" for s, e, _ in BAD_SETTINGS]
)
def test_a_bad_setting_makes_the_server_refuse_to_start(
    server: str, env: dict[str, str], message: str
) -> None:
    """The server exits by itself, printing the variable and what to set; the app never starts."""
    result = refusing(server, free_port(), **env)
    assert result.returncode == REFUSED[server], result.stderr
    assert message in result.stdout + result.stderr
    assert "inner startup" not in result.stdout  # graceful refused before the app's own startup


@pytest.mark.timeout(60)
def test_a_taken_probe_port_makes_the_server_refuse_to_start() -> None:
    """A port held by another program: the start fails, naming the port and the variable."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        result = refusing(
            "uvicorn", free_port(), GRACEFUL_PROBE_PORT=str(taken), GRACEFUL_PROBE_HOST="127.0.0.1"
        )
    assert result.returncode == REFUSED["uvicorn"], result.stderr
    assert f"graceful cannot answer probes on 127.0.0.1:{taken}" in result.stderr
    assert "GRACEFUL_PROBE_PORT" in result.stderr
    assert "inner startup" not in result.stdout


@pytest.mark.timeout(60)
def test_every_worker_of_a_multi_process_server_answers_on_the_probe_port(tmp_path: Path) -> None:
    """uvicorn --workers 2: both workers bind the probe port (SO_REUSEPORT), none is refused, and
    graceful's lines reach stderr though only uvicorn configured logging (issue #27, 12)."""
    port, probes = free_port(), free_port()
    argv = ["uvicorn", "tests.support.asgi_app:app", "--port", str(port), "--workers", "2"]
    code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_module('uvicorn', run_name='__main__', alter_sys=True)"
    out, err = tmp_path / "out", tmp_path / "err"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRACEFUL_PROBE_PORT": str(probes)}
    with out.open("w") as stdout, err.open("w") as stderr:  # files: the workers may outlive a failure
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=stdout, stderr=stderr, env=env, start_new_session=True
        )
    try:
        wait_until(
            lambda: err.read_text().count("lifespan startup complete: ready") == 2, "both workers ready"
        )
        assert err.read_text().count(f"INFO graceful: answering probes on port {probes}") == 2
        assert probe(probes) == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: no worker left behind
        proc.wait(BOUND)
    assert "cannot answer probes" not in err.read_text()
    assert out.read_text().count("shutdown listener") == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["uvicorn", "granian"])
def test_an_app_whose_own_startup_raises_is_a_failed_start(server: str) -> None:
    """It received lifespan.startup, then raised: not "no lifespan support" but a failed startup,
    as the bare app under ``uvicorn --lifespan on`` (rc 3); graceful logs the traceback."""
    result = refusing(server, free_port(), INNER="startup-raises")
    assert result.returncode == REFUSED[server], result.stderr
    both = result.stdout + result.stderr
    assert "the app's lifespan startup raised RuntimeError('the database is not there')" in both
    assert "RuntimeError: the database is not there" in result.stderr  # the traceback, graceful's log
    assert "does not speak the lifespan protocol" not in result.stderr
    out = result.stdout
    assert out.index("wrap-up listener") < out.index("shutdown listener")  # the sequence ran


# -- the protocol, driven by hand -----------------------------------------------------------------


class Server:
    """Plays the server's side of one lifespan: what uvicorn's LifespanOn does."""

    def __init__(self, app: Any) -> None:
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task = asyncio.ensure_future(
            app({"type": "lifespan", "state": {}}, self.to_app.get, self.sent.put)
        )

    async def ask(self, kind: str) -> dict[str, Any]:
        await self.to_app.put({"type": f"lifespan.{kind}"})
        return await asyncio.wait_for(self.sent.get(), BOUND)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, BOUND))  # type: ignore[arg-type]


@pytest.fixture
def lc() -> Lifecycle:
    return Lifecycle(force_quit=BOUND, exit=Recorder())


def lifespan_app(events: list[str], *, startup: str = "complete", shutdown: str = "complete") -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        events.append("app startup")
        await send({"type": f"lifespan.startup.{startup}", "message": "no database"})
        await receive()
        events.append("app shutdown")
        await send({"type": f"lifespan.shutdown.{shutdown}", "message": "pool would not close"})

    return app


def test_startup_marks_ready_after_the_app_and_shutdown_waits_for_every_listener(lc: Lifecycle) -> None:
    """Ready only after the app's startup; "complete" only after wrap-up, then shutdown listeners."""
    events: list[str] = []
    lc.add_wrap_up_listener(lambda: events.append(f"wrap-up stopping={lc.is_stopping()}"))

    async def close_pool() -> None:
        await asyncio.sleep(0)
        events.append("shutdown")

    lc.add_shutdown_listener(close_pool)

    async def main() -> None:
        server = Server(graceful.asgi.lifespan(lifespan_app(events), lifecycle=lc))
        assert not readiness.is_ready(lc)
        assert await server.ask("startup") == {"type": "lifespan.startup.complete"}
        assert readiness.is_ready(lc)
        assert await server.ask("shutdown") == {"type": "lifespan.shutdown.complete"}
        assert lc.state() is graceful.State.STOPPED
        await server.task

    run(main())
    assert events[:2] == ["app startup", "wrap-up stopping=True"]
    assert sorted(events[2:]) == ["app shutdown", "shutdown"]
    assert not readiness.is_ready(lc)
    assert lc.exit_code == 0


def test_a_failed_app_startup_is_passed_on_and_still_runs_the_sequence(lc: Lifecycle) -> None:
    """The app's startup.failed reaches the server; listeners run; the app gets no shutdown."""
    events: list[str] = []
    lc.add_shutdown_listener(lambda: events.append("shutdown listener"))

    async def main() -> None:
        server = Server(graceful.asgi.lifespan(lifespan_app(events, startup="failed"), lifecycle=lc))
        assert await server.ask("startup") == {"type": "lifespan.startup.failed", "message": "no database"}
        await server.task

    run(main())
    assert events == ["app startup", "shutdown listener"]
    assert not readiness.is_ready(lc)
    assert lc.state() is graceful.State.STOPPED


def test_a_bad_setting_answers_startup_failed_before_the_app_starts(
    lc: Lifecycle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message names the variable; the app's startup never runs; the lifecycle runs on."""
    monkeypatch.setenv("GRACEFUL_PROBE_PORT", "abc")
    events: list[str] = []

    async def main() -> None:
        server = Server(graceful.asgi.lifespan(lifespan_app(events), lifecycle=lc))
        answer = await server.ask("startup")
        assert answer["type"] == "lifespan.startup.failed"
        assert answer["message"].startswith("graceful: GRACEFUL_PROBE_PORT='abc' is not a port number")
        await server.task

    run(main())
    assert events == []
    assert lc.state() is graceful.State.RUNNING
    assert not readiness.is_ready(lc)


def test_raising_after_receiving_startup_is_a_failed_startup(lc: Lifecycle) -> None:
    """Raising before receiving anything is "no lifespan support"; after ``lifespan.startup``,
    a failed startup: startup.failed with the exception, and the sequence runs."""

    async def raises_at_once(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("http only")

    async def raises_in_startup(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise ConnectionError("no database")

    answers: list[dict[str, Any]] = []
    other = Lifecycle(force_quit=BOUND, exit=Recorder())

    async def main() -> None:
        unsupported = Server(graceful.asgi.lifespan(raises_at_once, lifecycle=lc))
        answers.append(await unsupported.ask("startup"))
        failed = Server(graceful.asgi.lifespan(raises_in_startup, lifecycle=other))
        answers.append(await failed.ask("startup"))
        await failed.task

    run(main())
    assert answers == [
        {"type": "lifespan.startup.complete"},
        {
            "type": "lifespan.startup.failed",
            "message": "the app's lifespan startup raised ConnectionError('no database')",
        },
    ]
    assert readiness.is_ready(lc)
    assert other.state() is graceful.State.STOPPED
    assert not readiness.is_ready(other)


def test_a_failed_listener_or_app_shutdown_answers_shutdown_failed(lc: Lifecycle) -> None:
    """A listener that raises and an app whose shutdown fails: "failed", naming both."""
    events: list[str] = []

    def broken() -> None:
        raise OSError("disk full")

    lc.add_shutdown_listener(broken, name="flush-metrics")

    async def main() -> None:
        server = Server(graceful.asgi.lifespan(lifespan_app(events, shutdown="failed"), lifecycle=lc))
        await server.ask("startup")
        answer = await server.ask("shutdown")
        assert answer["type"] == "lifespan.shutdown.failed"
        assert "'flush-metrics'" in answer["message"]
        assert "the app's own lifespan shutdown" in answer["message"]

    run(main())
    assert lc.exit_code == 1


def test_other_scopes_go_straight_to_the_app(lc: Lifecycle) -> None:
    """An http scope reaches the inner app with the same receive and send."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.extend([scope["type"], receive, send])

    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        return None

    run(graceful.asgi.lifespan(app, lifecycle=lc)({"type": "http"}, receive, send))
    assert seen == ["http", receive, send]
    assert lc.state() is graceful.State.RUNNING


def test_force_quit_is_set_at_startup_and_arguments_are_checked(lc: Lifecycle) -> None:
    """force_quit= becomes the budget at startup; bad arguments fail at wrap time."""

    async def main() -> None:
        server = Server(graceful.asgi.lifespan(lifespan_app([]), lifecycle=lc, force_quit=3))
        await server.ask("startup")
        assert lc.status().force_quit == 3
        await server.ask("shutdown")

    run(main())
    with pytest.raises(TypeError, match="ASGI app"):
        graceful.asgi.lifespan("main:app")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Lifecycle"):
        graceful.asgi.lifespan(lifespan_app([]), lifecycle=object())  # type: ignore[arg-type]
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="force_quit"):
            graceful.asgi.lifespan(lifespan_app([]), force_quit=bad)


@pytest.mark.timeout(30)
def test_the_example_stops_its_background_work_before_the_pool_closes(
    graceful_process: ProcessFactory,
) -> None:
    """examples/asgi_lifespan_app.py under the uvicorn CLI: flusher stopped, then pool closed."""
    port = free_port()
    code = (
        "import runpy, sys; sys.argv = ['uvicorn', 'examples.asgi_lifespan_app:app', '--port', "
        f"'{port}']; runpy.run_module('uvicorn', run_name='__main__', alter_sys=True)"
    )
    child = graceful_process(code, wait_ready=False)
    child.wait_for_output("lifespan startup complete: ready", stream="stderr")
    wait_until(lambda: not refused(port), "the server accepting")  # it binds after the lifespan
    assert get(port, "/")[:2] == (200, "hello\n")
    child.send_signal(signal.SIGTERM)
    assert child.wait(30).returncode == -15
    err = child.stderr
    assert err.index("outbox flusher stopped after") < err.index("lifespan: connection pool closed")
    assert "Traceback" not in err
