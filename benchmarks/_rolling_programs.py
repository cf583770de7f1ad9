"""The contenders of the rolling-restart rig: what runs behind HAProxy, as data.

Why it is built this way:

* A contender is a *description* (how to launch one instance on a given port, which environment,
  whether HAProxy checks ``/readyz`` on a probe port or ``/`` on the service port), so the list
  is data: the graceful contenders are generated once per drain-delay setting
  (``GRACEFUL_DRAIN_DELAY=1``, ``auto``, ``0``, ``auto:2`` ...), and adding a setting adds rows.
* Every instance binds a *fixed* port given by the rig, so the new instance of a rolling
  restart takes the old one's place in HAProxy's backend, as a systemd unit or a pod would.
* The stdlib handler speaks HTTP/1.1 (keep-alive), as a server behind a balancer would; the
  same handler serves the hand-written server and ``graceful.run()``, so only the shutdown
  differs. Every handler sleeps ``DELAY`` (20 ms), the request the issue measured with.
* A drain-delay setting the installed graceful rejects (``auto`` before it lands) makes that
  contender "not available": the check runs the installed graceful's own parser in the child
  interpreter, so the rig never has to guess which version is there.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from _harness import child_env

DELAY = 0.02  # seconds each request takes to handle

STDLIB_HANDLER = """
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DELAY = float(os.environ["RIG_DELAY"])

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as behind a balancer
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def do_GET(self):
        time.sleep(DELAY)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_GET  # the in-place rig's POST load: a request hey's client never replays

    def log_message(self, *args):
        pass
"""

STDLIB_APP = (
    STDLIB_HANDLER
    + """
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
"""
)

HAND_WRITTEN = (
    STDLIB_APP
    + """
import signal, threading

def on_term(signum, frame):
    threading.Thread(target=server.shutdown).start()  # shutdown() from this thread would deadlock

signal.signal(signal.SIGTERM, on_term)
server.serve_forever()
server.server_close()
sys.exit(0)
"""
)

GRACEFUL_HTTP = STDLIB_APP + "\nimport graceful\nsys.exit(graceful.run(server))\n"

ASGI_APP = """
import asyncio, os, sys
import uvicorn

DELAY = float(os.environ["RIG_DELAY"])

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await asyncio.sleep(DELAY)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
server = uvicorn.Server(config)
"""

UVICORN = ASGI_APP + "\nserver.run()\n"

GRACEFUL_UVICORN = ASGI_APP + "\nimport graceful\nsys.exit(graceful.run(server))\n"

WSGI_APP = """
import os, time

DELAY = float(os.environ["RIG_DELAY"])

def app(environ, start_response):
    time.sleep(DELAY)
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
"""

GUNICORN_ARGS = ("-k", "gthread", "-w", "1", "--threads", "10", "--log-level", "warning")


@dataclass(frozen=True)
class Contender:
    """One kind of instance behind HAProxy."""

    name: str
    source: str = ""  # python -c SOURCE PORT; empty for gunicorn (a module file, see argv())
    gunicorn: tuple[str, ...] = ()  # extra gunicorn arguments; non-empty: run gunicorn
    module: str = ""  # third-party module it needs (uvicorn, gunicorn)
    probes: bool = False  # HAProxy checks /readyz on GRACEFUL_PROBE_PORT, else / on the port
    drain_delay: str = ""  # GRACEFUL_DRAIN_DELAY; "" for the non-graceful ones
    is_graceful: bool = False
    quick: bool = False  # runs in the quick mode
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, python: str, port: int, workdir: str) -> list[str]:
        if self.gunicorn:
            return [
                python,
                "-m",
                "gunicorn",
                "--chdir",
                workdir,
                "-b",
                f"127.0.0.1:{port}",
                *GUNICORN_ARGS,
                *self.gunicorn,
                "rig_wsgi:app",
            ]
        return [python, "-c", self.source, str(port)]

    def environment(self, probe_port: int | None, graceful_from: str = "") -> dict[str, str]:
        extra = {"RIG_DELAY": repr(DELAY), **self.env}
        if self.drain_delay:
            extra["GRACEFUL_DRAIN_DELAY"] = self.drain_delay
        if self.probes and probe_port is not None:
            extra["GRACEFUL_PROBE_PORT"] = str(probe_port)
            extra["GRACEFUL_PROBE_HOST"] = "127.0.0.1"
        return rig_env(extra, graceful_from)


def rig_env(extra: dict[str, str], graceful_from: str = "") -> dict[str, str]:
    """The children's environment; ``graceful`` from ``graceful_from`` (a checkout) if given."""
    env = child_env(extra)
    if graceful_from:
        env["PYTHONPATH"] = graceful_from
    return env


def contenders(delays: tuple[str, ...] = ("1", "auto"), quick_delay: str = "1") -> list[Contender]:
    """Every contender; graceful's once per drain-delay setting in ``delays``.

    ``quick_delay`` is the setting the quick mode's two graceful contenders use.
    """
    out: list[Contender] = []
    for delay in delays:
        suffix = f", GRACEFUL_DRAIN_DELAY={delay}"
        out += [
            Contender(
                "graceful.run(ThreadingHTTPServer)" + suffix,
                GRACEFUL_HTTP,
                probes=True,
                drain_delay=delay,
                is_graceful=True,
                quick=delay == quick_delay,
            ),
            Contender(
                "graceful.run(uvicorn.Server)" + suffix,
                GRACEFUL_UVICORN,
                module="uvicorn",
                probes=True,
                drain_delay=delay,
                is_graceful=True,
                quick=delay == quick_delay,
            ),
        ]
        out.append(
            Contender(
                "gunicorn gthread -c python:graceful.gunicorn" + suffix,
                gunicorn=("-c", "python:graceful.gunicorn"),
                module="gunicorn",
                probes=True,
                drain_delay=delay,
                is_graceful=True,
            )
        )
    return [
        *out,
        Contender("stdlib ThreadingHTTPServer (hand-written SIGTERM handler)", HAND_WRITTEN, quick=True),
        Contender("uvicorn Server.run()", UVICORN, module="uvicorn"),
        Contender("gunicorn gthread", gunicorn=("--graceful-timeout", "30"), module="gunicorn"),
    ]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_C = TypeVar("_C", bound=_Named)


def chosen(every: list[_C], names: tuple[str, ...]) -> list[_C]:
    """The contenders whose name contains one of ``names`` (case-insensitive); all if none given."""
    if not names:
        return every
    wanted = [name.lower() for name in names]
    return [c for c in every if any(name in c.name.lower() for name in wanted)]


def delay_accepted(python: str, delay: str, graceful_from: str = "") -> str:
    """ "" if the installed graceful accepts ``GRACEFUL_DRAIN_DELAY=delay``, else its complaint."""
    code = "from graceful import readiness\nreadiness.drain_delay()\n"
    try:
        done = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            env=rig_env({"GRACEFUL_DRAIN_DELAY": delay}, graceful_from),
            cwd="/",  # python -c puts the working directory first on sys.path: no checkout there
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "graceful did not answer within 60 s"
    if done.returncode == 0:
        return ""
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def module_present(python: str, module: str) -> bool:
    code = f"import importlib.util, sys\nsys.exit(importlib.util.find_spec({module!r}) is None)\n"
    done = subprocess.run([python, "-c", code], env=child_env(), cwd="/", timeout=60, check=False)
    return done.returncode == 0
