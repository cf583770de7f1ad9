"""The contenders of the in-place rig: one service on one port, replaced under load, no balancer.

Why it is built this way:

* A contender is a *description* (what to launch, and which of three ways it is replaced), so
  the list is data and the run (``_inplace_run``) has one procedure per way:

  - ``restart``: what ``systemctl restart`` does. SIGTERM, wait for the exit, start a new
    process on the same port. Between the old one closing its listening socket and the new one
    binding it, every connection is refused (issue #25: 30,245 refused in 5 restarts);
  - ``sigusr2``: graceful's upgrade in place (DESIGN.md section 11). SIGUSR2 to the main pid;
    the next generation starts on the inherited sockets and says ``MAINPID=`` + ``READY=1`` over
    ``NOTIFY_SOCKET``; the old one wraps up and exits 0. Only once ``graceful.listen`` exists:
    before that SIGUSR2's default action would kill the process, which measures nothing;
  - ``gunicorn``: gunicorn's own binary upgrade. USR2 to the master forks and execs a new master
    on the inherited sockets; once a new worker has loaded the app, TERM to the old master.
* The programs are the rolling rig's (``_rolling_programs``): the same handlers, sleeping 20 ms a
  request, HTTP/1.1 keep-alive, so the two rigs' figures can be read side by side.
* graceful's stdlib contender for the upgrade is built ``bind_and_activate=False``: by the
  contract ``run()`` binds it through ``listen()``, so that a successor *inherits* the socket
  instead of binding a second one. uvicorn's config binds host/port itself; graceful's adapter
  goes through ``listen()`` for it, so that program is unchanged.
* gunicorn's app tells the rig when a worker has loaded it (``RIG_APP_LOADED``, one datagram with
  its pid and its master's): gunicorn's pidfile (``PIDFILE.2`` for the new master) is written
  before the master has even bound or spawned a worker, so it cannot say the new one serves.
* The programs run from a file (``python rig_service.py PORT``), as a service's would: an
  upgrade re-runs the same command line, and ``python -c`` keeps its program text only in
  ``sys.orig_argv``, never in ``sys.argv``.
* gunicorn is started through a two-line script in the run's directory, as its console script
  would be: its USR2 re-execs ``sys.executable`` with ``sys.argv``, so what ``argv[0]`` is must
  survive an exec. ``python -m gunicorn`` does not: USR2 re-execs ``gunicorn/__main__.py`` as a
  script, with the package's own folder first on ``sys.path``, where gunicorn's ``http`` package
  hides the stdlib's (an app that imports ``http.client`` then fails to load in the new master).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from _rolling_programs import (
    DELAY,
    GRACEFUL_HTTP,
    GRACEFUL_UVICORN,
    STDLIB_HANDLER,
    UVICORN,
    WSGI_APP,
    rig_env,
)

RESTART, SIGUSR2, GUNICORN = "restart", "sigusr2", "gunicorn"

GRACEFUL_HTTP_UPGRADE = (
    STDLIB_HANDLER
    + """
import graceful

server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler, bind_and_activate=False)
server.daemon_threads = True
sys.exit(graceful.run(server))
"""
)

# Appended to the WSGI app: a worker that imported it tells the rig (a datagram, abstract socket).
APP_LOADED = """
import socket as _socket

_where = os.environ.get("RIG_APP_LOADED", "")
if _where:
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as _sock:
        _address = "\\0" + _where[1:] if _where.startswith("@") else _where
        _sock.sendto(f"RIG_LOADED={os.getpid()}\\nRIG_PARENT={os.getppid()}".encode(), _address)
"""

GUNICORN_LAUNCHER = "from gunicorn.app.wsgiapp import run\n\nrun()\n"
GUNICORN_ARGS = ("-k", "gthread", "-w", "1", "--threads", "16", "--log-level", "warning")


@dataclass(frozen=True)
class Contender:
    """One service and the way it is replaced in place."""

    name: str
    how: str  # RESTART, SIGUSR2 or GUNICORN
    source: str = ""  # the program, run as python WORKDIR/rig_service.py PORT (RESTART, SIGUSR2)
    gunicorn: tuple[str, ...] = ()  # extra gunicorn arguments (GUNICORN)
    module: str = ""  # third-party module it needs (uvicorn, gunicorn)
    needs_listen: bool = False  # runs only where graceful.listen exists (the upgrade in place)
    is_graceful: bool = False  # the goal applies: 0 failed, 0 resets, p99 within 2x steady

    def argv(
        self, python: str, port: int, workdir: str, pidfile: str, extra: tuple[str, ...] = ()
    ) -> list[str]:
        if self.how == GUNICORN:
            return [
                python,
                f"{workdir}/rig_gunicorn.py",
                "--chdir",
                workdir,
                "-b",
                f"127.0.0.1:{port}",
                "--pid",
                pidfile,
                *GUNICORN_ARGS,
                *extra,
                *self.gunicorn,
                "rig_wsgi:app",
            ]
        return [python, f"{workdir}/rig_service.py", str(port)]

    def environment(self, notify: str, graceful_from: str = "") -> dict[str, str]:
        extra = {"RIG_DELAY": repr(DELAY)}
        if self.how == SIGUSR2:
            extra["NOTIFY_SOCKET"] = notify  # how the next generation says MAINPID= and READY=1
        if self.how == GUNICORN:
            extra["RIG_APP_LOADED"] = notify  # how a worker says it has loaded the app
        return rig_env(extra, graceful_from)


def contenders() -> list[Contender]:
    """Every contender, in the order of the table: today's ways first, graceful's upgrade last."""
    return [
        Contender("graceful.run(ThreadingHTTPServer), restarted in place", RESTART, GRACEFUL_HTTP),
        Contender("uvicorn Server.run(), restarted in place", RESTART, UVICORN, module="uvicorn"),
        Contender("gunicorn gthread, USR2 then TERM the old master", GUNICORN, module="gunicorn"),
        Contender(
            "gunicorn gthread -c python:graceful.gunicorn, USR2 then TERM the old master",
            GUNICORN,
            gunicorn=("-c", "python:graceful.gunicorn"),
            module="gunicorn",
            is_graceful=True,
        ),
        Contender(
            "graceful.run(ThreadingHTTPServer), SIGUSR2 upgrade",
            SIGUSR2,
            GRACEFUL_HTTP_UPGRADE,
            needs_listen=True,
            is_graceful=True,
        ),
        Contender(
            "graceful.run(uvicorn.Server), SIGUSR2 upgrade",
            SIGUSR2,
            GRACEFUL_UVICORN,
            module="uvicorn",
            needs_listen=True,
            is_graceful=True,
        ),
    ]


def listen_present(python: str, graceful_from: str = "") -> bool:
    """Whether the graceful the children import has ``graceful.listen`` (the upgrade in place)."""
    code = "import sys, graceful\nsys.exit(0 if hasattr(graceful, 'listen') else 3)\n"
    done = subprocess.run(
        [python, "-c", code], env=rig_env({}, graceful_from), cwd="/", timeout=60, check=False
    )
    return done.returncode == 0


def gunicorn_extra(python: str) -> tuple[str, ...]:
    """``--no-control-socket`` where gunicorn has one (24+): else every gunicorn of the user,
    old master and new alike, and any other run on the machine, shares ``~/.gunicorn/gunicorn.ctl``."""
    code = "import sys, gunicorn.config as c\nsys.exit(0 if hasattr(c, 'ControlSocketDisable') else 3)\n"
    done = subprocess.run([python, "-c", code], env=rig_env({}), cwd="/", timeout=60, check=False)
    return ("--no-control-socket",) if done.returncode == 0 else ()


WSGI_LOADED = WSGI_APP + APP_LOADED
