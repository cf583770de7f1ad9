"""Readiness for Kubernetes probes and load balancers, and the drain delay: the public face.

Why: when a pod is deleted, Kubernetes sends SIGTERM and removes the pod from its Service's
endpoints *at the same time*; proxies keep sending new connections for a few seconds more.
A server that closes its listening socket at once refuses them (the "endpoint race"). The
cure is to turn not-ready first, keep serving for a *drain delay*, and only then stop
accepting. Every web adapter waits the delay out at the start of its wrap-up, so one delay,
counted from the first wrap-up trigger, covers every server in the process.

* ready: ``run()`` marks the lifecycle ready once every server has started; it turns not-ready
  the moment wrap-up starts (a pause or a shutdown) and never back. A program that does not
  use ``run()`` calls :func:`set_ready` itself.
* live: True until the lifecycle has STOPPED (a liveness probe must not restart a pod that is
  draining).
* drain delay: ``set_drain_delay(seconds)`` or ``GRACEFUL_DRAIN_DELAY`` (seconds, default 0;
  or ``auto[:MAX]``: until the balancer has visibly stopped sending), bounded by what is left
  of the force-quit budget. The functions here are the public face of one object per
  lifecycle (graceful/_drain_delay.py says how it works).
* probes: ``serve_probes(port)`` (or ``GRACEFUL_PROBE_PORT`` under ``run()`` and the hosts)
  answers ``/readyz`` and ``/livez`` from a tiny stdlib HTTP server on its own thread. Its
  port is opened with ``Lifecycle.listen()`` (unless ``reuse_port``): an upgrade in place passes
  it to the next generation, which answers the probes once it is ready.
* platform grace: ``check_platform_grace()`` warns at start when the drain delay plus the
  force-quit budget would outlast the grace Kubernetes or systemd give before SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading

from ._current import or_default
from ._drain_delay import Traffic, drain_delay_of
from ._lifecycle import Lifecycle, State, budget, set_default_budget
from ._settings import ENV_PROBE_PORT, DrainDelaySetting, Settings, parse_drain_delay

__all__ = [
    "DrainDelaySetting",
    "ProbeServer",
    "Traffic",
    "check_platform_grace",
    "configure_from_env",
    "drain_delay",
    "drain_delay_is_auto",
    "drain_delay_left",
    "is_live",
    "is_ready",
    "serve_probes",
    "serve_probes_from_env",
    "set_drain_delay",
    "set_ready",
    "traffic",
    "wait_drain_delay",
    "wait_drain_delay_async",
]

log = logging.getLogger("graceful")


def _lc(lifecycle: Lifecycle | None) -> Lifecycle:
    return or_default(lifecycle, "graceful.readiness")


def set_ready(lifecycle: Lifecycle | None = None) -> None:
    """Say the service accepts work (``run()`` does this once every server has started)."""
    drain_delay_of(_lc(lifecycle)).ready = True


def is_ready(lifecycle: Lifecycle | None = None) -> bool:
    """True while the service takes new work: marked ready and not wrapping up or stopping."""
    lc = _lc(lifecycle)
    return drain_delay_of(lc).ready and not lc.is_stopping()


def is_live(lifecycle: Lifecycle | None = None) -> bool:
    """True until the lifecycle has stopped: draining is alive, not dead."""
    return _lc(lifecycle).state() is not State.STOPPED


# -- the drain delay --------------------------------------------------------------------------------


def set_drain_delay(seconds: float | str, lifecycle: Lifecycle | None = None) -> None:
    """Keep serving after turning not-ready, before any server stops accepting.

    ``seconds``: a number (a fixed delay), ``"auto"`` or ``"auto:MAX"`` (serve until the
    balancer has visibly stopped sending, at most MAX s: see docs/deploys.md).

    Raises:
        TypeError, ValueError: anything else (a negative number, NaN, ``"auto:0"``, ...).
    """
    setting = parse_drain_delay(seconds, "set_drain_delay()")
    drain_delay_of(_lc(lifecycle)).set(setting)


def drain_delay(lifecycle: Lifecycle | None = None) -> float:
    """The drain delay in seconds (for ``auto``, its bound): the one set, else
    ``GRACEFUL_DRAIN_DELAY``, else 0.

    Raises:
        ValueError: ``GRACEFUL_DRAIN_DELAY`` is neither seconds nor ``auto[:MAX]``.
    """
    return drain_delay_of(_lc(lifecycle)).setting.seconds


def drain_delay_is_auto(lifecycle: Lifecycle | None = None) -> bool:
    """True when the drain delay is ``auto``: it ends once the balancer has stopped sending."""
    return drain_delay_of(_lc(lifecycle)).setting.auto


def drain_delay_left(lifecycle: Lifecycle | None = None) -> float:
    """Seconds to wait before the drain delay can be over (0 once over, when it is 0, or
    before wrap-up); counted from the first wrap-up trigger, bounded by the budget left.

    A fixed delay: what is left of it. ``auto``: the earliest moment it could end; wait that
    long and ask again until 0 (or call :func:`wait_drain_delay` /
    :func:`wait_drain_delay_async`, which also wake when a probe is answered 503).
    """
    return drain_delay_of(_lc(lifecycle)).left()


def wait_drain_delay(lifecycle: Lifecycle | None = None) -> float:
    """Block until the drain delay, counted from the first wrap-up trigger, is over.

    Bounded by the force-quit budget left. Returns the seconds waited (0 when the delay was
    over already, was 0, or no wrap-up has started).
    """
    return drain_delay_of(_lc(lifecycle)).wait()


async def wait_drain_delay_async(lifecycle: Lifecycle | None = None) -> float:
    """:func:`wait_drain_delay` for a server on an event loop: it waits on the loop."""
    return await drain_delay_of(_lc(lifecycle)).wait_async()


def traffic(lifecycle: Lifecycle | None = None) -> Traffic:
    """Where a server reports each request's arrival (``.arrived()``), so that an ``auto``
    drain delay sees it. graceful's adapters do it themselves."""
    return drain_delay_of(_lc(lifecycle)).traffic


# -- the probe endpoint ----------------------------------------------------------------------------

PROBE_PATHS = ("/readyz", "/livez")


class ProbeServer:
    """A tiny HTTP server for Kubernetes probes, on its own daemon thread (``serve_probes()``).

    ``GET /readyz`` (or ``HEAD``): 200 while ready, 503 from the start of wrap-up. ``GET
    /livez``: 200 until the lifecycle has stopped. Anything else: 404. Each answer is computed
    from the lifecycle at the moment of the request (two attribute reads), so it is never stale.
    A context manager; ``close()`` is idempotent.
    """

    def __init__(self, lifecycle: Lifecycle, host: str, port: int, *, reuse_port: bool = False) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        lc = lifecycle
        delay = drain_delay_of(lc)

        class Probe(BaseHTTPRequestHandler):
            def _answer(self, *, body: bool) -> None:
                path = self.path.split("?")[0]
                if path == "/readyz":
                    ok = is_ready(lc)
                    text = "ready" if ok else "not ready"
                    if not ok:
                        delay.probe_refused()  # in a wrap-up: the balancer has been told
                elif path == "/livez":
                    ok = is_live(lc)
                    text = "live" if ok else "stopped"
                else:
                    self.send_error(404, "graceful probes: /readyz and /livez")
                    return
                data = f"{text}\n".encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def log_message(self, format: str, *args: object) -> None:
                return None  # probes every few seconds would drown the log

            # A prober that closes or resets early (HAProxy resets once it has the status line)
            # is not an error: counted, one DEBUG line, never the stdlib's traceback. Everything
            # this handler does is graceful's own, so these can only be the prober going away.
            gone = 0
            gone_lock = threading.Lock()

            def handle(self) -> None:
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
                    with Probe.gone_lock:
                        Probe.gone += 1
                        count = Probe.gone
                    host, port = self.client_address[:2]
                    why = f"{type(exc).__name__}: {exc}"
                    log.debug("probes: client %s:%s went away early (%s); %d so far", host, port, why, count)

        class Server(ThreadingHTTPServer):
            def server_bind(self) -> None:
                if reuse_port:  # several processes answer on one port (gunicorn's workers)
                    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                super().server_bind()

        try:
            self._server = Server((host, port), Probe, bind_and_activate=reuse_port)
            if not reuse_port:  # systemd's or the previous generation's socket, else bound here
                self._server.socket.close()
                sock = lc.listen((host, port))
                self._server.socket = sock
                self._server.server_address = sock.getsockname()
                # The previous or next generation may accept on it too: a blocking accept() whose
                # connection the other process took would hang this loop.
                sock.setblocking(False)
        except OSError as exc:
            raise RuntimeError(
                f"graceful cannot answer probes on {host}:{port}: {exc.strerror or exc}. Free that "
                f"port or choose another ({ENV_PROBE_PORT}, or serve_probes(port=...))"
            ) from exc
        self._server.daemon_threads = True
        self.host: str = host
        self.port: int = self._server.server_address[1]
        """The port answering (the one chosen when 0 was asked for)."""
        self._wake = socket.socketpair()  # close() wakes the loop at once: no poll interval
        self._thread = threading.Thread(target=self._serve, name="graceful-probes", daemon=True)
        self._thread.start()
        self._closed = False
        self._lifecycle = lc
        delay.probes_served(+1)  # an auto drain delay waits for a 503 answered to a probe

    def close(self) -> None:
        """Stop answering: the port refuses connections from now on. Idempotent."""
        if self._closed:
            return
        self._closed = True
        drain_delay_of(self._lifecycle).probes_served(-1)
        with contextlib.suppress(OSError):
            self._wake[1].send(b"x")
        self._thread.join(5)
        self._server.server_close()
        for end in self._wake:
            end.close()

    def _serve(self) -> None:
        """Answer until ``close()``: not ``serve_forever()``, whose ``shutdown()`` waits for its
        next poll (up to 0.1 s that ``run()`` would spend before returning, on every stop)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._server.socket, selectors.EVENT_READ)
            selector.register(self._wake[0], selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._wake[0] in ready:
                    return
                self._server.handle_request()  # readable: it accepts at once

    def __enter__(self) -> ProbeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<graceful.readiness.ProbeServer {self.host}:{self.port}>"


def serve_probes(
    port: int = 0, host: str = "127.0.0.1", lifecycle: Lifecycle | None = None, *, reuse_port: bool = False
) -> ProbeServer:
    """Answer Kubernetes probes on ``host:port`` (``port=0``: any free port, see ``.port``).

    ``reuse_port=True`` binds with ``SO_REUSEPORT`` (Linux, BSD): several processes each answer
    on the same port, each connection going to one of them (graceful.gunicorn's workers).

    ``run()`` starts one by itself when ``GRACEFUL_PROBE_PORT`` is set (on every interface,
    ``GRACEFUL_PROBE_HOST`` to change it, since the kubelet probes the pod's IP). Close it after
    ``run()`` returns, not in a shutdown listener: ``/livez`` must answer until the end.

    Raises:
        ValueError: ``port`` is not a port number.
        RuntimeError: the port cannot be bound (in use, say); the message says what to do.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"serve_probes(port=...) must be a port number 0-65535; got {port!r}")
    return ProbeServer(_lc(lifecycle), host, port, reuse_port=reuse_port)


def serve_probes_from_env(
    lifecycle: Lifecycle, settings: Settings | None = None, *, reuse_port: bool = False
) -> ProbeServer | None:
    """The probes ``run()`` and the hosts serve: on ``GRACEFUL_PROBE_PORT`` (None and nothing
    served when it is unset), on ``GRACEFUL_PROBE_HOST`` or every interface (the kubelet probes
    the pod's IP), as ``settings`` read them (read now if None). Logs the port.
    ``reuse_port``: as for :func:`serve_probes`.

    Raises:
        ValueError: a ``GRACEFUL_*`` variable is not usable (``settings`` None).
        RuntimeError: the port cannot be bound.
    """
    settings = Settings.read() if settings is None else settings
    if settings.probe_port is None:
        return None
    probes = serve_probes(settings.probe_port, settings.probe_host, lifecycle, reuse_port=reuse_port)
    log.info("answering probes on port %d (/readyz, /livez)", probes.port)
    return probes


def configure_from_env(
    lifecycle: Lifecycle, settings: Settings | None = None, *, budget: float | None = None
) -> Settings:
    """What ``run()`` and every host do first, before anything runs; returns the settings.

    Reads every ``GRACEFUL_*`` variable at once unless ``settings`` were read already (a bad
    one is a ``ValueError`` that names it, before anything changes); then gives ``lifecycle`` the environment's force-quit budget (or
    ``budget``, a host's own default, when ``GRACEFUL_FORCE_QUIT`` is unset) unless the program
    chose one, and the environment's drain delay unless one was set; then warns if the
    platform's grace is too short (:func:`check_platform_grace`).
    """
    settings = Settings.read() if settings is None else settings
    set_default_budget(lifecycle, settings.force_quit if settings.force_quit is not None else budget)
    drain_delay_of(lifecycle).default(settings.drain_delay)
    check_platform_grace(lifecycle, settings)
    return settings


# -- the platform's grace --------------------------------------------------------------------------


def check_platform_grace(lifecycle: Lifecycle | None = None, settings: Settings | None = None) -> str | None:
    """Warn when the drain delay plus the force-quit budget would outlast the platform's grace.

    The grace comes from ``GRACEFUL_TERMINATION_GRACE`` (Kubernetes'
    ``terminationGracePeriodSeconds``) or ``GRACEFUL_TIMEOUT_STOP_SEC`` (systemd's
    ``TimeoutStopSec``: seconds or a systemd time span such as ``1min 30s``; 0 or
    ``infinity`` is no limit), the shorter if both are set; neither platform tells the process
    (see docs/kubernetes.md and docs/systemd.md). Past it the platform sends SIGKILL and
    graceful never writes its report of what was stuck (SolidQueue #653). ``run()`` and the
    hosts call this once at start, with the ``settings`` they read (read now if None). Returns
    the warning (also logged at WARNING on ``graceful``), or None.

    Raises:
        ValueError: one of the variables is not a duration.
    """
    lc = _lc(lifecycle)
    found = (Settings.read() if settings is None else settings).platform_grace
    if found is None:
        return None
    grace, where = found
    delay, seconds = drain_delay(lc), budget(lc)
    needed = delay + seconds
    if needed < grace:
        return None
    warning = (
        f"the drain delay ({delay:g} s) plus the force-quit budget ({seconds:g} s) is {needed:g} s, "
        f"not less than the platform's grace of {grace:g} s ({where}): the process would be "
        f"SIGKILLed before graceful reports what is stuck. Lower GRACEFUL_FORCE_QUIT or "
        f"GRACEFUL_DRAIN_DELAY, or give the process more time"
    )
    log.warning("%s", warning)
    return warning
