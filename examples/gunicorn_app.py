"""A WSGI app served by gunicorn, with shutdown work that runs in every worker.

    gunicorn -c python:graceful.gunicorn -w 2 examples.gunicorn_app:app
    gunicorn -c examples/gunicorn.conf.py examples.gunicorn_app:app   # your own config file

Each worker registers its listeners when it loads the app (or once in the arbiter with
``--preload``; each worker still runs them once). On the arbiter's SIGTERM, a ``max_requests``
recycle or a HUP reload, a worker wraps up as it stops accepting (``/readyz`` answers 503 from
then on), finishes its requests in flight, then runs its shutdown listeners.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import graceful
from graceful import readiness

log = logging.getLogger("gunicorn.error")  # gunicorn's error log: the usual idiom under gunicorn


class Buffer:
    """Stands for what a worker holds: a connection pool, a metrics or audit buffer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: list[str] = []

    def add(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        log.info("worker %d: flushed %d line(s)", os.getpid(), len(lines))


buffer = Buffer()
graceful.add_wrap_up_listener(lambda: log.info("worker %d: wrapping up", os.getpid()), name="announce")
graceful.add_shutdown_listener(buffer.flush, name="flush buffer")


def app(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    """``/readyz`` reports this worker's readiness; anything else is buffered and answered."""
    if environ.get("PATH_INFO") == "/readyz":
        ready = readiness.is_ready()
        start_response("200 OK" if ready else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"ready\n" if ready else b"stopping\n"]
    buffer.add(environ.get("PATH_INFO", "/"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]
