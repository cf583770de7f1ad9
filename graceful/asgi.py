"""graceful under an ASGI server it does not start: ``app = graceful.asgi.lifespan(app)``.

Why: most FastAPI and Starlette apps run under ``uvicorn app:app``, ``hypercorn app:app`` or
``granian --interface asgi app:app``. The server's CLI owns the process and its signals, so
``graceful.run()`` never runs, and without it no listener, deadline or readiness would either
(uvicorn #2094: its drain has no bound). The one hook every ASGI server offers is the lifespan
protocol, so the wrapper speaks it:

* **startup**: graceful reads every ``GRACEFUL_*`` variable and binds the probe port first;
  then the inner app's own lifespan startup runs (it opens what requests need); then graceful
  marks the process ready (``graceful.readiness``, ``/readyz`` on ``GRACEFUL_PROBE_PORT``,
  ``READY=1`` when ``NOTIFY_SOCKET`` is set).
* **a startup that cannot succeed is refused, never swallowed.** A bad ``GRACEFUL_*`` value, a
  probe port taken, or an app whose own startup fails (it answers ``startup.failed``, or raises
  after it received ``lifespan.startup``) is answered ``lifespan.startup.failed`` with a
  message naming the cause and what to set, and the server refuses to start (uvicorn exits 3).
  It used to raise out of the lifespan instead: uvicorn, hypercorn and granian then take the app
  for one without lifespan support and serve it without graceful, printing nothing.
* **shutdown**: the whole graceful sequence runs, and the server hears
  ``lifespan.shutdown.complete`` only once it has STOPPED. The deadline starts here:
  ``is_stopping()`` turns True, wrap-up listeners run, then shutdown listeners.
* **the inner app's shutdown** runs *as one more shutdown listener*, after every wrap-up
  listener, concurrently with the other shutdown listeners. Wrap-up listeners finish work in
  flight (a consumer, a background task) and may still need what the app's startup opened (a
  database pool, an HTTP client), so the app must not close those first; closing them is
  "releasing resources", which is what the shutdown phase is for. As a listener it is under the
  deadline and named in the force-quit report if it hangs.
* **an app without lifespan support** (it raises on the lifespan scope before it receives
  anything, as a raw app that asserts ``scope["type"] == "http"`` does, or returns without
  answering) is fine: graceful answers for it, as uvicorn's ``--lifespan auto`` would.
* **several workers** (``uvicorn --workers N``, hypercorn's and granian's worker processes):
  each binds the probe port with ``SO_REUSEPORT``, as graceful.gunicorn's workers do, so each
  answers for itself on the one port; a port held by anything else fails every worker's
  startup. (It used to be a warning: the first worker answered, the others served none.)
* **logging**: when the application configured none, graceful's lines go to stderr
  (graceful/_diagnostics.py, ``log_to_stderr_by_default``); uvicorn, hypercorn and granian
  configure only their own loggers.
* **the deadline**: the force-quit budget (25 s, ``GRACEFUL_FORCE_QUIT`` or ``force_quit=``)
  starts at lifespan shutdown. When it passes, graceful writes its report and exits with 70
  (``os._exit``), as under ``run()``: uvicorn and granian would otherwise wait for a stuck
  shutdown for ever, and the orchestrator sees a forced stop as what it was.

What each server has done before lifespan shutdown arrives is in docs/hosts/asgi.md: in short,
all three have stopped accepting and drained (or cut) their HTTP requests, so wrap-up listeners
see no request in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._checks import check_seconds
from ._current import get_lifecycle
from ._diagnostics import log_to_stderr_by_default
from ._lifecycle import Lifecycle
from ._listeners import ListenerState
from ._settings import Settings
from .readiness import ProbeServer, configure_from_env, serve_probes_from_env, set_ready

__all__ = ["GracefulLifespan", "lifespan"]

log = logging.getLogger("graceful")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _InnerLifespan:
    """The inner app's lifespan, run as a task: graceful speaks the protocol on its behalf."""

    def __init__(self, app: ASGIApp, scope: Scope) -> None:
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._answers: asyncio.Queue[Message | None] = asyncio.Queue()
        self.error: BaseException | None = None
        self.supported = True
        self.received = False
        """True once the app has taken a message: from then on, raising is a failure, not
        "no lifespan support"."""
        self.task = asyncio.ensure_future(self._run(app, scope))

    async def _run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self._receive, self._send)
        except Exception as exc:  # noqa: BLE001 - kept, and re-raised as a failed listener at shutdown
            self.error = exc
        finally:
            # "No answer is coming": the app has returned.
            self._answers.put_nowait(None)

    async def _receive(self) -> Message:
        message = await self._to_app.get()
        self.received = True
        return message

    async def _send(self, message: Message) -> None:
        self._answers.put_nowait(message)

    async def ask(self, kind: str) -> Message | None:
        """Send ``lifespan.<kind>``; the app's answer, or None if it ended without one."""
        if self.task.done() and self._answers.empty():
            return None
        self._to_app.put_nowait({"type": f"lifespan.{kind}"})
        return await self._answers.get()

    async def shutdown(self) -> None:
        """The app's own lifespan shutdown (a graceful shutdown listener); raises if it failed."""
        if not self.supported:
            return
        answer = await self.ask("shutdown")
        if answer is None:
            if self.error is not None:
                raise RuntimeError(f"the app's lifespan shutdown raised {self.error!r}") from self.error
            # It returned: nothing more to shut down.
            return
        if answer.get("type") != "lifespan.shutdown.complete":
            raise RuntimeError(f"the app's lifespan shutdown failed: {answer.get('message') or answer}")


class GracefulLifespan:
    """An ASGI app whose lifespan drives graceful; every other scope goes to ``app`` untouched.

    Made by :func:`lifespan`; see there.
    """

    def __init__(self, app: ASGIApp, *, lifecycle: Lifecycle | None = None, force_quit: float | None = None):
        if not callable(app):
            raise TypeError(f"graceful.asgi.lifespan() takes an ASGI app, not {type(app).__name__} {app!r}")
        if lifecycle is not None and not isinstance(lifecycle, Lifecycle):
            raise TypeError(f"lifecycle= takes a graceful.Lifecycle, not {type(lifecycle).__name__}")
        self.app = app
        self.force_quit = (
            None if force_quit is None else check_seconds(force_quit, "lifespan(force_quit=...)")
        )
        self._lifecycle = lifecycle

    @property
    def lifecycle(self) -> Lifecycle:
        """The lifecycle driven: the one given, else the default one at the time of the call."""
        return self._lifecycle if self._lifecycle is not None else get_lifecycle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await self._lifespan(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        log_to_stderr_by_default()
        lc = self.lifecycle
        message = await receive()
        if message["type"] != "lifespan.startup":
            # The protocol starts with startup; be lenient.
            log.warning("graceful.asgi: lifespan began with %r, not lifespan.startup", message["type"])
        try:
            probes = self._configure(lc)
        except Exception as exc:  # noqa: BLE001 - answered startup.failed: the server refuses to start
            await send({"type": "lifespan.startup.failed", "message": _refusal(exc)})
            return
        extras: list[Any] = [] if probes is None else [probes]
        inner = _InnerLifespan(self.app, scope)
        failed = await self._startup(inner)
        if failed is not None:
            try:
                await self._run_sequence(lc, inner, f"lifespan startup failed: {failed}")
            finally:
                _close(extras)
            await send({"type": "lifespan.startup.failed", "message": failed})
            return
        extras.extend(self._mark_ready(lc))
        await send({"type": "lifespan.startup.complete"})
        try:
            message = await receive()
            if message["type"] != "lifespan.shutdown":
                log.warning("graceful.asgi: expected lifespan.shutdown, got %r", message["type"])
            failures = await self._run_sequence(lc, inner, "lifespan shutdown (the server is stopping)")
        finally:
            _close(extras)
        if failures:
            await send({"type": "lifespan.shutdown.failed", "message": failures})
        else:
            await send({"type": "lifespan.shutdown.complete"})

    def _configure(self, lc: Lifecycle) -> ProbeServer | None:
        """What ``run()`` does before any server starts: every ``GRACEFUL_*`` variable read and
        checked, the budget and the drain delay set, the probe port bound (``/readyz`` answers
        503 until ready). Raises, before the inner app starts, whatever makes a start impossible.
        """
        # A bad variable raises here, before anything changes.
        settings = Settings.read()
        if self.force_quit is not None:
            lc.set_time_to_force_quit(self.force_quit)
        configure_from_env(lc, settings)
        return serve_probes_from_env(lc, settings, reuse_port=_REUSE_PORT)

    async def _startup(self, inner: _InnerLifespan) -> str | None:
        """Run the inner app's startup; the failure message, or None when it is up."""
        answer = await inner.ask("startup")
        if answer is None:
            inner.supported = False
            if inner.error is not None and inner.received:
                # It took the startup, then raised.
                log.error("graceful.asgi: the app's lifespan startup raised", exc_info=inner.error)
                return f"the app's lifespan startup raised {inner.error!r}"
            why = "returned without answering" if inner.error is None else f"raised {inner.error!r}"
            log.info("graceful.asgi: the app does not speak the lifespan protocol (it %s)", why)
            return None
        if answer.get("type") == "lifespan.startup.complete":
            return None
        # It answered its own startup; it expects no shutdown now.
        inner.supported = False
        return str(answer.get("message") or f"the app answered {answer.get('type')!r}")

    def _mark_ready(self, lc: Lifecycle) -> list[Any]:
        """Ready, and the systemd notifier ``run()`` would start."""
        extras: list[Any] = []
        if os.environ.get("NOTIFY_SOCKET"):
            from .systemd import SystemdNotifier, notify

            extras.append(SystemdNotifier(lc))
        set_ready(lc)
        if os.environ.get("NOTIFY_SOCKET"):
            notify("READY=1", "STATUS=serving (ASGI lifespan)")
        log.info("graceful.asgi: lifespan startup complete: ready")
        return extras

    async def _run_sequence(self, lc: Lifecycle, inner: _InnerLifespan, reason: str) -> str:
        """The whole graceful sequence; a message naming what failed, or "" when all went well."""
        if inner.supported:
            lc.add_shutdown_listener(inner.shutdown, name="the app's own lifespan shutdown")
        lc.shutdown(reason, wait=False)
        await lc.wait_for_shutdown_async()
        if lc.exit_code == 0:
            return ""
        failed = [
            f"{item.phase} listener {item.name!r}"
            for item in lc.status().listeners
            if item.state is ListenerState.FAILED
        ]
        return f"graceful: {', '.join(failed) or 'a listener'} failed (see the log above)"


_REUSE_PORT = hasattr(socket, "SO_REUSEPORT")
"""Every worker of a multi-process server binds the probe port (Linux, BSD; elsewhere only one
can, and the others fail to start: run one process there)."""


def _refusal(exc: Exception) -> str:
    """The ``lifespan.startup.failed`` message for what ``_configure`` raised; the servers print it."""
    if not isinstance(exc, (ValueError, RuntimeError)):
        # Not one of graceful's own start errors.
        log.error("graceful.asgi: lifespan startup failed", exc_info=exc)
    text = str(exc) or repr(exc)
    return text if text.startswith("graceful") else f"graceful: {text}"


def _close(extras: list[Any]) -> None:
    for extra in extras:
        extra.close()


def lifespan(
    app: ASGIApp, *, lifecycle: Lifecycle | None = None, force_quit: float | None = None
) -> GracefulLifespan:
    """Wrap an ASGI app so that the server's lifespan drives graceful's whole lifecycle.

    ``app = graceful.asgi.lifespan(app)`` at the bottom of the module the server imports, then
    ``uvicorn mod:app``, ``hypercorn mod:app`` or ``granian --interface asgi mod:app``.

    * lifespan startup: the ``GRACEFUL_*`` variables are read and the probe port bound, then
      the app's own startup runs, then ready (``graceful.readiness.is_ready()``, ``/readyz`` on
      ``GRACEFUL_PROBE_PORT``, ``READY=1`` over ``NOTIFY_SOCKET``). A bad variable, a taken
      probe port or a failed app startup answers ``lifespan.startup.failed`` (the message
      names it): the server refuses to start.
    * lifespan shutdown: the deadline starts and ``is_stopping()`` turns True; wrap-up
      listeners, then shutdown listeners, the app's own lifespan shutdown among them; the
      server hears "complete" only after all of them ("failed", naming them, if any raised).
    * an app that does not support lifespan works too; every other scope (``http``,
      ``websocket``) goes straight to ``app``.

    Args:
        app: the ASGI 3 application.
        lifecycle: the lifecycle to drive (default: the default one, looked up at startup).
        force_quit: the force-quit budget in seconds, set at startup (default: the lifecycle's,
            25 s or ``GRACEFUL_FORCE_QUIT``). Keep it below what the server or the orchestrator
            allows: past the budget graceful writes its report and exits with 70.

    Raises:
        TypeError: ``app`` is not callable, or ``lifecycle`` is not a ``Lifecycle``.
        ValueError: ``force_quit`` is <= 0, NaN or infinite.
    """
    return GracefulLifespan(app, lifecycle=lifecycle, force_quit=force_quit)
