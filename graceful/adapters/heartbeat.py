"""This worker's presence in Redis, with a heartbeat, removed on every way the process ends.

Why: asynq left its registry keys behind when ``Run()`` and a user's ``Shutdown()`` were mixed
(#979), and SolidQueue stopped the heartbeat *before* draining, so jobs still running were
pruned as abandoned (#568). Here the key is a ``graceful.Service`` of its own:

* serve: ``SET key value EX ttl``, then refresh it every ``ttl / 3`` seconds;
* wrap-up: the value says ``"draining"`` (``"paused"`` after SIGTSTP), and the heartbeat goes
  on while jobs finish;
* close (the shutdown phase, after every wrap-up has finished): the heartbeat stops and the key
  is deleted;
* force quit: the key is deleted before the exit (and a heartbeat racing with that deletion
  cannot write it back). Only a SIGKILL leaves it, and then it expires after ``ttl`` seconds.

Put it last in the list, ``graceful.run([worker, Registration(redis, "mailer")])``: wrap-up
runs in reverse list order, so it says "draining" before the worker drains. Wherever it is in
the list, its close comes in the shutdown phase, once every wrap-up (the drain) has finished.
It works the same next to ``graceful.adapters.worker.Worker``, an rq worker or any other
service. The Redis client is yours (redis-py's ``Redis``, or anything with ``set`` and
``delete``); nothing is imported here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from .._checks import TYPE_CHECKING
from .._lifecycle import on_force_quit
from .._service import Context

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["Registration"]


class Registration:
    """``prefix:name:host:pid`` in Redis while this worker runs; see the module docstring.

    Args:
        redis: a Redis client (``redis.Redis``); its ``set`` and ``delete`` are used.
        name: the worker's name, the second part of the key.
        ttl: seconds the key lives without a heartbeat (>= 1); refreshed every ``ttl / 3``.
        prefix: the key's first part.

    The value is JSON: ``name``, ``host``, ``pid``, ``started`` and ``seen`` (Unix times), and
    ``state`` (``"running"``, ``"paused"``, ``"draining"``).
    """

    def __init__(self, redis: Any, name: str, *, ttl: float = 15.0, prefix: str = "graceful:workers") -> None:
        if not (callable(getattr(redis, "set", None)) and callable(getattr(redis, "delete", None))):
            raise TypeError(f"Registration needs a Redis client (redis.Redis), not {type(redis).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"Registration(name=...) must be a non-empty string; got {name!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl < float("inf"):
            raise ValueError(f"Registration(ttl=...) must be a number of seconds >= 1; got {ttl!r}")
        host, pid = socket.gethostname(), os.getpid()
        self.redis, self.ttl = redis, float(ttl)
        self.name = f"registration {name}"
        self.key = f"{prefix}:{name}:{host}:{pid}"
        self._info = {"name": name, "host": host, "pid": pid, "started": time.time()}
        self._state = "running"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        """Held by the writes and the removal: a heartbeat never writes the key back after its removal."""
        self._removed = False
        self._failing = False
        self._beating: threading.Thread | None = None

    def _write(self) -> None:
        with self._lock:
            if self._removed:
                return
            value = json.dumps({**self._info, "state": self._state, "seen": time.time()})
            self.redis.set(self.key, value, px=int(self.ttl * 1000))

    def _beat(self) -> None:
        every = self.ttl / 3
        while not self._stop.wait(every):
            try:
                self._write()
            except Exception as exc:
                # A Redis blip must not end the heartbeat.
                if not self._failing:
                    log.exception("%s: heartbeat failed; retrying every %.1f s", self.name, every)
                else:
                    log.warning("%s: heartbeat failed again: %r", self.name, exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("%s: heartbeat written again", self.name)
                self._failing = False

    def serve(self, ctx: Context) -> None:
        on_force_quit(ctx.lifecycle, self._remove, name=f"remove {self.key}")
        self._write()
        self._beating = threading.Thread(
            target=self._beat, name=f"graceful-heartbeat-{self.key}", daemon=True
        )
        self._beating.start()
        log.info("%s: registered as %s (ttl %g s)", self.name, self.key, self.ttl)
        ctx.started()
        self._stop.wait()

    def wrap_up(self, ctx: Context) -> None:
        """Say so in the key; the heartbeat goes on (it stops in ``close``, after the drain)."""
        self._state = "draining" if ctx.shutting_down() else "paused"
        try:
            self._write()
        except Exception:
            # The state is for people looking; the drain must not wait on it.
            log.warning("%s: could not mark %s %s", self.name, self.key, self._state, exc_info=True)

    def close(self, ctx: Context) -> None:
        """The shutdown phase: every wrap-up (the drain) is done; stop beating, delete the key."""
        self._stop.set()
        if self._beating is not None:
            self._beating.join(self.ttl)
        self._remove()

    def _remove(self) -> None:
        self._stop.set()
        with self._lock:
            if self._removed:
                return
            self._removed = True
            self.redis.delete(self.key)
        log.info("%s: %s removed", self.name, self.key)
