"""Restarts without a load balancer (contract section 11): ``graceful.listen()``, SIGUSR2 under
``run()``, systemd socket activation.

Real processes, real clients, real signals. A service's generations run under
tests/support/reaper.py (a child subreaper), which reports each one's exit code and exits once
none is left: the test sees that an old generation exited 0 and that no new generation outlived
a stopped old one. The load is tests/support/keepalive_client.py: kept-alive connections sending
POSTs back to back (a POST is never replayed by the client, so a connection closed under a
request is a failure).
Every wait is on an event (a log line, a datagram, an exit), bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import graceful
from graceful._settings import Settings
from graceful.lowlevel import listening_sockets
from graceful.testing import GracefulProcess, ProcessFactory, ProcessResult

from .conftest import BOUND, ROOT

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="an upgrade in place is tested on Linux")

REAPER = ROOT / "tests" / "support" / "reaper.py"
CLIENT = ROOT / "tests" / "support" / "keepalive_client.py"

# A generation fails at import when the file MARKER.crash exists, and hangs there when
# MARKER.hang does (only a new generation: the first one must start).
_FAILURES = """
import os, sys, threading

_marker = sys.argv[2] if len(sys.argv) > 2 else ""
if _marker and os.environ.get("GRACEFUL_UPGRADE"):
    if os.path.exists(_marker + ".crash"):
        raise RuntimeError("boom: this generation fails at import")
    if os.path.exists(_marker + ".hang"):
        print("hanging at import", flush=True)
        threading.Event().wait()
"""

STDLIB = (
    _FAILURES
    + """
import logging, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import graceful

logging.basicConfig(level=logging.INFO, format="%(process)d %(levelname)s %(name)s %(message)s")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(0.005)  # work: some requests are in flight at every hand-over
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler, bind_and_activate=False)
server.daemon_threads = True
sys.exit(graceful.run(server))
"""
)

UVICORN = (
    _FAILURES
    + """
import asyncio, logging

import uvicorn

import graceful

logging.basicConfig(level=logging.INFO, format="%(process)d %(levelname)s %(name)s %(message)s")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(0.005)  # work: some requests are in flight at every hand-over
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off", log_level="warning")
sys.exit(graceful.run(uvicorn.Server(config)))
"""
)

AIOHTTP = """
import logging, os, sys

from aiohttp import web

import graceful
from graceful.adapters.aiohttp import AiohttpService

logging.basicConfig(level=logging.INFO, format="%(process)d %(levelname)s %(name)s %(message)s")


async def answer(request):
    await request.read()
    return web.Response(text=str(os.getpid()))


app = web.Application()
app.router.add_post("/", answer)
sys.exit(graceful.run(AiohttpService(app, host="127.0.0.1", port=int(sys.argv[1]))))
"""

PROGRAMS = {"stdlib": STDLIB, "uvicorn": UVICORN, "aiohttp": AIOHTTP}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the load ------------------------------------------------------------------------------------


class Load:
    """tests/support/keepalive_client.py in a process of its own; its lines, waited on with a bound."""

    def __init__(self, port: int, threads: int = 8) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CLIENT), str(port), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.strip())
                self._changed.notify_all()

    def wait_line(self, line: str, timeout: float = BOUND) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: line in self.lines, timeout):
                raise AssertionError(f"the load client did not say {line!r} within {timeout} s: {self.lines}")

    def stop(self) -> dict[str, Any]:
        """The counts: ``ok``, ``failed``, ``errors`` and ``pids`` (who answered how many)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.close()
        self.proc.wait(30)
        self._reader.join(BOUND)
        counts: dict[str, Any] = json.loads(self.lines[-1])
        return counts

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(BOUND)
        self._reader.join(BOUND)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@pytest.fixture
def load() -> Iterator[Callable[[int], Load]]:
    started: list[Load] = []

    def start(port: int) -> Load:
        client = Load(port)
        started.append(client)
        client.wait_line("started")
        return client

    yield start
    for client in started:
        client.kill()


# -- the generations -----------------------------------------------------------------------------


class Lineage:
    """One service's generations, under tests/support/reaper.py (the fixture's process)."""

    def __init__(self, proc: GracefulProcess, watch: Callable[[int], None]) -> None:
        self.proc = proc
        self.watch = watch  # killed at teardown if still running
        self.pids = [self._int(r"started (\d+)")]
        watch(self.pids[0])

    def _int(self, pattern: str) -> int:
        text = self.proc.stdout + self.proc.stderr
        match = re.search(pattern, text)
        assert match is not None, f"no {pattern!r} in\n{text}"
        return int(match.group(1))

    @property
    def current(self) -> int:
        return self.pids[-1]

    def exited(self, pid: int) -> int:
        """``pid``'s exit code, once the reaper has seen it exit (bounded)."""
        self.proc.wait_for_output(f"exited {pid} ")
        return self._int(rf"exited {pid} (-?\d+)\n")

    def upgrade(self) -> int:
        """SIGUSR2 to the current generation; the new one's pid once the old one has exited 0."""
        old = self.current
        os.kill(old, signal.SIGUSR2)
        self.proc.wait_for_output(f"this generation (pid {old}) stops accepting")
        new = self._int(
            rf"the next generation \(pid (\d+)\) is ready and accepts on the same sockets: this generation \(pid {old}\)"
        )
        self.watch(new)
        assert self.exited(old) == 0, self.proc.stderr
        self.pids.append(new)
        return new

    def stop(self) -> ProcessResult:
        """SIGTERM to the current generation; the reaper's result once every generation is gone."""
        os.kill(self.current, signal.SIGTERM)
        return self.proc.wait(BOUND)


@pytest.fixture
def lineage(graceful_process: ProcessFactory, tmp_path: Path) -> Iterator[Callable[..., Lineage]]:
    """Start a program (a key of PROGRAMS) under the reaper; every generation it ever named is
    killed at teardown if still alive (by pidfd: a pid reused meanwhile is never hit)."""
    pidfds: list[int] = []

    def watch(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            pidfds.append(os.pidfd_open(pid))

    def start(program: str, *args: str, env: dict[str, str] | None = None) -> Lineage:
        script = tmp_path / f"{program}_service.py"
        script.write_text(PROGRAMS[program])
        proc = graceful_process(REAPER, args=[sys.executable, str(script), *args], env=env)
        return Lineage(proc, watch)

    yield start
    for fd in pidfds:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)


def _after(lines: list[str], first: str, then: str) -> bool:
    return first in lines and then in lines[lines.index(first) :]


# -- SIGUSR2 -------------------------------------------------------------------------------------


@pytest.mark.load
@pytest.mark.timeout(90)
@pytest.mark.parametrize("program", ["stdlib", "uvicorn"])
def test_sigusr2_under_keepalive_load_loses_no_request_over_several_upgrades(
    program: str, lineage: Callable[..., Lineage], load: Callable[[int], Load]
) -> None:
    if program == "uvicorn":
        pytest.importorskip("uvicorn")
    port = free_port()
    service = lineage(program, str(port))
    client = load(port)
    for _ in range(3):
        new = service.upgrade()
        client.wait_line(f"pid {new}")  # the new generation answers, on the same port
    counts = client.stop()
    result = service.stop()

    assert counts["failed"] == 0, counts["errors"]
    assert set(counts["pids"]) == {str(pid) for pid in service.pids}  # every generation served
    assert service.exited(service.pids[-1]) == 0
    notes = result.notifications
    assert notes.count("RELOADING=1") == 3  # Type=notify-reload: each upgrade, from the old one
    assert sum(note.startswith("MONOTONIC_USEC=") for note in notes) == 3
    for new in service.pids[1:]:  # systemd follows each new generation: MAINPID= with READY=1
        assert _after(notes, f"MAINPID={new}", "READY=1")
    # The old generations stop without a word to systemd: STOPPING=1 only at the final SIGTERM.
    assert notes.count("STOPPING=1") == 1
    assert _after(notes, f"MAINPID={service.pids[-1]}", "STOPPING=1")
    assert " ERROR " not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("inherited from the previous generation") == 3


@pytest.mark.load
@pytest.mark.timeout(90)
def test_a_failed_successor_loses_nothing_and_the_next_sigusr2_succeeds(
    lineage: Callable[..., Lineage], load: Callable[[int], Load], tmp_path: Path
) -> None:
    port, marker = free_port(), tmp_path / "generation"
    service = lineage("stdlib", str(port), str(marker), env={"GRACEFUL_UPGRADE_TIMEOUT": "2"})
    client = load(port)
    first = service.current

    Path(f"{marker}.crash").touch()  # the new generation raises at import
    os.kill(first, signal.SIGUSR2)
    service.proc.wait_for_output("exited before it was ready (exit code 1)")
    Path(f"{marker}.crash").unlink()
    Path(f"{marker}.hang").touch()  # the new generation hangs at import
    os.kill(first, signal.SIGUSR2)
    service.proc.wait_for_output("was not ready within 2 s (GRACEFUL_UPGRADE_TIMEOUT) (killed by SIGTERM)")
    Path(f"{marker}.hang").unlink()
    new = service.upgrade()  # and the next one succeeds
    client.wait_line(f"pid {new}")
    counts = client.stop()
    result = service.stop()

    assert counts["failed"] == 0, counts["errors"]
    assert set(counts["pids"]) == {str(first), str(new)}
    crashed = result.stderr.split("exited before it was ready", 1)[1]
    assert "keeps serving; SIGUSR2 tries again. The last lines of its stderr:" in crashed
    assert "RuntimeError: boom: this generation fails at import" in crashed.split("\n\n")[0]
    assert "hanging at import" in result.stdout
    notes = result.notifications
    assert notes.count("RELOADING=1") == 3
    assert sum(note.startswith("STATUS=serving (upgrade failed") for note in notes) == 2
    assert _after(notes, f"MAINPID={new}", "READY=1")


@pytest.mark.timeout(60)
def test_sigterm_mid_upgrade_stops_both_generations_and_a_second_sigusr2_is_ignored(
    lineage: Callable[..., Lineage], tmp_path: Path
) -> None:
    marker = tmp_path / "generation"
    Path(f"{marker}.hang").touch()
    service = lineage("stdlib", str(free_port()), str(marker))
    old = service.current
    os.kill(old, signal.SIGUSR2)
    service.proc.wait_for_output("hanging at import")
    new = service._int(r"started the next generation \(pid (\d+)\)")
    os.kill(old, signal.SIGUSR2)
    service.proc.wait_for_output(f"received SIGUSR2: an upgrade is under way (pid {new}); ignored")
    os.kill(old, signal.SIGTERM)
    result = service.proc.wait(BOUND)  # the reaper exits once no generation is left

    assert service.exited(old) == 0
    assert f"stopping the next generation (pid {new}) too" in result.stderr
    assert f"the next generation (pid {new}) stopped (killed by SIGTERM)" in result.stderr
    assert f"exited {new} " not in result.stdout  # reaped by the old one, not left to the reaper
    assert not any(note.startswith("MAINPID=") for note in result.notifications)


@pytest.mark.timeout(60)
def test_aiohttp_and_the_probe_port_are_handed_over(lineage: Callable[..., Lineage]) -> None:
    pytest.importorskip("aiohttp")
    port, probes = free_port(), free_port()
    service = lineage(
        "aiohttp", str(port), env={"GRACEFUL_PROBE_PORT": str(probes), "GRACEFUL_PROBE_HOST": "127.0.0.1"}
    )
    old = service.current
    assert _post(port) == str(old)
    new = service.upgrade()  # the new generation binds neither port: it inherits both
    assert _post(port) == str(new)
    assert _get(probes, "/readyz") == (200, "ready\n")
    result = service.stop()

    assert result.stderr.count("inherited from the previous generation") == 2
    assert " ERROR " not in result.stderr, result.stderr


def _post(port: int) -> str:
    conn = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    with conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def _get(port: int, path: str) -> tuple[int, str]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    with conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), body.decode()


def test_sigusr2_outside_run_is_logged_and_ignored(
    graceful_lifecycle: Any, caplog: pytest.LogCaptureFixture
) -> None:
    graceful_lifecycle.send_signal(signal.SIGUSR2)
    assert graceful.state() is graceful.State.RUNNING
    assert "received SIGUSR2: an upgrade in place needs graceful.run()" in caplog.text


def test_the_upgrade_timeout_is_read_at_start_and_a_bad_one_is_a_clear_error() -> None:
    assert Settings.read({}).upgrade_timeout == 30.0
    assert Settings.read({"GRACEFUL_UPGRADE_TIMEOUT": "2.5"}).upgrade_timeout == 2.5
    for bad in ("soon", "0", "-1", "nan"):
        with pytest.raises(ValueError, match="GRACEFUL_UPGRADE_TIMEOUT"):
            Settings.read({"GRACEFUL_UPGRADE_TIMEOUT": bad})


def test_pid_1_of_a_container_refuses_the_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    from graceful import _upgrade

    monkeypatch.setattr(_upgrade.os, "getpid", lambda: 1)
    assert "PID 1" in (_upgrade.container_init() or "")


# -- listen() ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "error", "text"),
    [
        (8000, TypeError, r"\(host, port\)"),
        (("127.0.0.1", "8000"), TypeError, "port is an int"),
        (("127.0.0.1", True), TypeError, "port is an int"),
        ((127, 8000), TypeError, "host is a str"),
        (("127.0.0.1", 70000), ValueError, "0-65535"),
        (("127.0.0.1", 80, 0), ValueError, r"\(host, port\)"),
        ("127.0.0.1:8000", ValueError, "looks like host:port"),
        ("", ValueError, "empty path"),
        (None, TypeError, r"\(host, port\)"),
    ],
)
def test_listen_refuses_a_bad_address_at_the_call(address: object, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        graceful.listen(address)


@pytest.mark.parametrize(("backlog", "error"), [(-1, ValueError), ("128", TypeError), (True, TypeError)])
def test_listen_refuses_a_bad_backlog_before_binding(backlog: object, error: type[Exception]) -> None:
    port = free_port()
    with pytest.raises(error, match="backlog"):
        graceful.listen(("127.0.0.1", port), backlog=backlog)  # type: ignore[arg-type]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing was bound


def test_listen_binds_ipv4_ipv6_and_unix_and_remembers_them(
    fresh: graceful.Lifecycle, tmp_path: Path
) -> None:
    path = tmp_path / "app.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # a crashed server's socket file
        stale.bind(str(path))
    abstract = f"@graceful-test-{os.getpid()}"  # Linux's abstract namespace: no file
    made = [graceful.listen(("127.0.0.1", 0)), graceful.listen(path), graceful.listen(abstract)]
    if socket.has_ipv6:
        with contextlib.suppress(OSError):  # no IPv6 on this host
            made.append(graceful.listen(("::1", 0)))
    try:
        assert listening_sockets(fresh) == made
        for sock in made:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            assert not sock.get_inheritable()
        assert made[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        with pytest.raises(
            OSError, match=rf"cannot listen on 127.0.0.1:{made[0].getsockname()[1]}: address already in use"
        ):
            graceful.listen(made[0].getsockname())
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
        with socket.socket(socket.AF_UNIX) as client:
            client.connect("\0" + abstract[1:])
    finally:
        for sock in made:
            sock.close()
    assert listening_sockets(fresh) == []


_INHERIT = """
import json, logging, os, socket, sys
import graceful
from graceful import _sockets
logging.basicConfig(level=logging.INFO)
port, path, port6 = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
got = {
    "tcp": graceful.listen(("127.0.0.1", port)).fileno(),
    "any_port": graceful.listen(("localhost", 0)).getsockname()[1],
    "unix": graceful.listen(path).fileno(),
}
if port6:
    got["ipv6"] = graceful.listen(("[::1]", port6)).fileno()
got["unclaimed"] = _sockets.report_unclaimed()
got["environment"] = sorted(name for name in os.environ if name.startswith(("GRACEFUL_UPGRADE", "LISTEN_")))
print(json.dumps(got))
"""


def test_listen_takes_the_sockets_the_previous_generation_passed_down(tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    passed = [socket.create_server(("127.0.0.1", 0)), socket.socket(socket.AF_UNIX)]
    passed[1].bind(path)
    passed[1].listen()
    passed.append(socket.create_server(("127.0.0.1", 0)))  # the one taken by port 0
    spare = socket.create_server(("127.0.0.1", 0))  # nobody asks for it
    port6 = 0
    with contextlib.suppress(OSError):
        passed.append(socket.create_server(("::1", 0), family=socket.AF_INET6))
        port6 = passed[-1].getsockname()[1]
    pipes = [os.pipe(), os.pipe(), os.pipe()]
    fds = [sock.fileno() for sock in [*passed, spare]]
    any_port, spare_port = passed[2].getsockname()[1], spare.getsockname()[1]  # before they close
    ready, stderr, capture = (pipe[1] for pipe in pipes)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GRACEFUL_UPGRADE": f"from={os.getpid()} listen={','.join(map(str, fds))} ready={ready} stderr={stderr} capture={capture}",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "1",  # for another process: ignored, and not passed on
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", _INHERIT, str(passed[0].getsockname()[1]), path, str(port6)],
            env=env,
            pass_fds=(*fds, ready, stderr, capture),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        for sock in [*passed, spare]:
            sock.close()
        for pipe in pipes:
            for fd in pipe:
                os.close(fd)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["tcp"] == fds[0]
    assert got["unix"] == fds[1]
    assert got["any_port"] == any_port
    if port6:
        assert got["ipv6"] == fds[3]
    assert got["unclaimed"] == [f"fd {fds[-1]} (127.0.0.1:{spare_port}, from the previous generation)"]
    assert "connections to it are refused rather than left waiting" in done.stderr
    assert got["environment"] == []  # read once, then gone: a program it starts takes nothing
    assert done.stderr.count("inherited from the previous generation") == 3 + bool(port6)


def test_a_wildcard_takes_systemds_dual_stack_socket(tmp_path: Path) -> None:
    try:
        dual = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    except (OSError, ValueError):
        pytest.skip("no dual-stack IPv6 here")
    code = (
        "import logging, sys, graceful; logging.basicConfig(level=logging.INFO); "
        "s = graceful.listen(('', int(sys.argv[1]))); print(s.fileno(), int(s.family))"
    )
    with dual:
        port = dual.getsockname()[1]
        # As systemd passes it: at fd 3, LISTEN_PID the pid that reads it (exec keeps the pid).
        launch = (
            f"import os, sys; os.dup2({dual.fileno()}, 3); os.environ.update(LISTEN_PID=str(os.getpid()), "
            "LISTEN_FDS='1'); os.execv(sys.executable, [sys.executable, '-c', sys.argv[1], sys.argv[2]])"
        )
        done = subprocess.run(
            [sys.executable, "-c", launch, code, str(port)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            pass_fds=(dual.fileno(),),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", str(int(socket.AF_INET6))]
    assert f"listening on [::]:{port}: inherited from systemd (fd 3)" in done.stderr


# -- systemd socket activation, for real ---------------------------------------------------------


class _Lines:
    """A pipe's lines, read by a thread; waited on with a bound."""

    def __init__(self, stream: Any) -> None:
        self.text = ""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        with stream:
            for line in stream:
                with self._changed:
                    self.text += line
                    self._changed.notify_all()

    def join(self) -> None:
        """Until the pipe's end (every process writing to it has exited); bounded."""
        self._thread.join(BOUND)

    def wait(self, text: str, timeout: float = BOUND) -> str:
        return self.wait_until(lambda seen: text in seen, timeout, repr(text))

    def wait_until(self, predicate: Callable[[str], bool], timeout: float = BOUND, what: str = "") -> str:
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.text), timeout):
                raise AssertionError(
                    f"{what or 'the text awaited'} did not come within {timeout} s:\n{self.text}"
                )
            return self.text


@pytest.mark.timeout(60)
def test_socket_activation_answers_a_client_that_connected_before_the_service_started(tmp_path: Path) -> None:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate not installed")
    port, spare = free_port(), free_port()
    script = tmp_path / "service.py"
    script.write_text(STDLIB)
    argv = [tool, "-l", f"127.0.0.1:{port}", "-l", f"127.0.0.1:{spare}", "--fdname=web:spare"]
    argv += ["-E", f"PYTHONPATH={ROOT}", sys.executable, str(script), str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    successor: int | None = None  # not this test's child: followed with a pidfd
    err = _Lines(proc.stderr)
    try:
        err.wait(f"Listening on 127.0.0.1:{spare} as 4.")  # the tool listens; the service is not started
        # This client connects (and sends) before the service exists: the tool starts it now.
        assert _post(port) == str(proc.pid)  # the tool execs the service in its own process
        text = err.wait("all 1 server(s) started")
        assert f"listening on 127.0.0.1:{port}: inherited from systemd (fd 3)" in text  # nothing bound
        assert (
            f"inherited socket fd 4 (127.0.0.1:{spare}, named 'spare', from systemd): no server listens on it"
            in text
        )
        # An upgrade in place of a socket-activated service passes systemd's sockets down.
        os.kill(proc.pid, signal.SIGUSR2)
        text = err.wait(f"this generation (pid {proc.pid}) stops accepting")
        found = re.search(r"the next generation \(pid (\d+)\) is ready", text)
        assert found is not None
        successor = os.pidfd_open(int(found.group(1)))
        pid = int(found.group(1))
        assert proc.wait(BOUND) == 0
        assert _post(port) == str(pid)
        text = err.wait(
            f"{pid} WARNING graceful inherited socket fd 4 (127.0.0.1:{spare}, from the previous generation)"
        )
        assert (
            f"{pid} INFO graceful listening on 127.0.0.1:{port}: inherited from the previous generation"
            in text
        )
        signal.pidfd_send_signal(successor, signal.SIGTERM)
        assert select.select([successor], [], [], BOUND)[0], "the new generation did not exit"
        err.wait(f"{pid} INFO graceful stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
        if successor is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(successor, signal.SIGKILL)
            os.close(successor)
        proc.wait(BOUND)
        err.join()


# -- gunicorn's own USR2 -------------------------------------------------------------------------

WSGI_APP = """
import os

os.write(1, f"loaded in {os.getpid()}\\n".encode())  # a worker imports the app before it accepts


def app(environ, start_response):
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""


@pytest.mark.load
@pytest.mark.timeout(90)
def test_gunicorns_own_usr2_upgrade_keeps_working_under_graceful_gunicorn(
    load: Callable[[int], Load], tmp_path: Path
) -> None:
    """gunicorn's binary upgrade with ``-c python:graceful.gunicorn``: USR2 to the master starts a
    new master on the inherited socket, then TERM to the old one; not one request lost."""
    pytest.importorskip("gunicorn")
    (tmp_path / "upgrade_wsgi.py").write_text(WSGI_APP)
    launcher = tmp_path / "gunicorn_launch.py"  # USR2 re-executes sys.argv: a script, as gunicorn's own
    launcher.write_text("from gunicorn.app.wsgiapp import run\n\nrun()\n")
    port = free_port()
    argv = [sys.executable, str(launcher), "--chdir", str(tmp_path), "-b", f"127.0.0.1:{port}"]
    argv += [
        "-k",
        "gthread",
        "-w",
        "1",
        "--threads",
        "8",
        "--log-level",
        "info",
        "-c",
        "python:graceful.gunicorn",
    ]
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    proc = subprocess.Popen(
        [*argv, "upgrade_wsgi:app"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = _Lines(proc.stdout), _Lines(proc.stderr)
    new_master: int | None = None  # not this test's child: followed with a pidfd
    try:
        err.wait("Booting worker with pid")
        client = load(port)
        old_worker = int(next(line for line in client.lines if line.startswith("pid ")).split()[1])
        os.kill(proc.pid, signal.SIGUSR2)
        text = out.wait_until(lambda text: len(_loaded(text)) >= 2)  # the new master's worker is up
        new_worker = _loaded(text)[1]
        masters = re.findall(r"\[(\d+)\] \[INFO\] Starting gunicorn", err.wait("Starting gunicorn"))
        new_master = os.pidfd_open(int(masters[-1]))
        os.kill(proc.pid, signal.SIGTERM)  # gunicorn's way: TERM the old master once the new one serves
        client.wait_line(f"pid {new_worker}")  # the new worker answers, on the same socket
        assert proc.wait(BOUND * 3) == 0
        counts = client.stop()
        assert counts["failed"] == 0, counts["errors"]
        assert set(counts["pids"]) == {str(old_worker), str(new_worker)}
        assert " ERROR " not in err.text, err.text
        signal.pidfd_send_signal(new_master, signal.SIGTERM)
        assert select.select([new_master], [], [], BOUND * 3)[0], "the new master did not exit"
    finally:
        if proc.poll() is None:
            proc.kill()
        if new_master is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(new_master, signal.SIGKILL)
            os.close(new_master)
        proc.wait(BOUND)
        out.join()
        err.join()


def _loaded(text: str) -> list[int]:
    """The pids of the workers that loaded the app, in order."""
    return [int(pid) for pid in re.findall(r"loaded in (\d+)", text)]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


@pytest.mark.timeout(60)
def test_under_tini_as_pid_1_sigusr2_is_refused_and_the_service_keeps_serving(tmp_path: Path) -> None:
    """A container: tini is PID 1 and exits when its one child does, ending the container, so
    handing over would kill the new generation with the old one. graceful says so instead."""
    tini, unshare = shutil.which("tini"), shutil.which("unshare")
    if tini is None or unshare is None:
        pytest.skip("tini or unshare not installed")
    port, script = free_port(), tmp_path / "service.py"
    script.write_text(STDLIB)
    argv = [unshare, "--pid", "--fork", "--mount-proc", tini, "--", sys.executable, str(script), str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = _Lines(proc.stderr)
    try:
        try:
            err.wait("all 1 server(s) started")
        except AssertionError:
            if proc.poll() is not None:
                pytest.skip(f"no PID namespace here: {err.text.strip()}")
            raise
        (init,) = _children(proc.pid)  # tini, PID 1 in its namespace
        (service,) = _children(init)
        os.kill(service, signal.SIGUSR2)
        err.wait(
            "received SIGUSR2: PID 1 is tini, which exits when this process does, and the container with it"
        )
        assert _post(port) == "2"  # still the same process (pid 2 in the container) serving
        os.kill(service, signal.SIGTERM)
        assert proc.wait(BOUND) == 0
        assert "upgrade: started" not in err.text
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(BOUND)
        err.join()
