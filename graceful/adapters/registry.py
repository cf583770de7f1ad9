"""This worker's presence in Redis, with a heartbeat, removed on every way the process ends.

Why: asynq left its registry keys behind when ``Run()`` and a user's ``Shutdown()`` were mixed
(#979), and SolidQueue stopped the heartbeat *before* draining, so jobs still running were
pruned as abandoned (#568). Here the key is a ``graceful.Service`` of its own:

* serve: ``SET key value EX ttl``, then refresh it every ``ttl / 3`` seconds;
* wrap-up: the value says ``"draining"``, and the heartbeat goes on while jobs finish;
* close (the shutdown phase, after every wrap-up has finished): the heartbeat stops and the key
  is deleted;
* force quit: the key is deleted before the exit. Only a SIGKILL leaves it, and then it
  expires after ``ttl`` seconds.

Put it last in the list, ``graceful.run([worker, Registration(redis, "mailer")])``: wrap-up
runs in reverse list order, so it says "draining" before the worker drains, and its close comes
in the shutdown phase, once every wrap-up (the drain) has finished. The Redis client is yours (redis-py's ``Redis``, or anything with ``set``,
``delete``); nothing is imported here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from .._service import Context

# No ``typing`` at run time: see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["Registration"]


class Registration:
    """``prefix:name:host:pid`` in Redis while this worker runs; see the module docstring."""

    def __init__(self, redis: Any, name: str, *, ttl: float = 15.0, prefix: str = "graceful:workers") -> None:
        if not (callable(getattr(redis, "set", None)) and callable(getattr(redis, "delete", None))):
            raise TypeError(f"Registration needs a Redis client (redis.Redis), not {type(redis).__name__}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl < float("inf"):
            raise ValueError(f"Registration(ttl=...) must be a number of seconds >= 1; got {ttl!r}")
        self.redis, self.ttl = redis, float(ttl)
        self.name = f"registration {name}"
        self.key = f"{prefix}:{name}:{socket.gethostname()}:{os.getpid()}"
        self._info = {"name": name, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._state = "running"
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def _write(self) -> None:
        value = json.dumps({**self._info, "state": self._state, "seen": time.time()})
        self.redis.set(self.key, value, px=int(self.ttl * 1000))

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._write()
            except Exception:  # a Redis blip must not end the heartbeat
                log.exception("%s: heartbeat failed; retrying in %.1f s", self.name, self.ttl / 3)

    def serve(self, ctx: Context) -> None:
        ctx.lifecycle.on_force_quit(self._remove, name=f"remove {self.key}")
        self._write()
        self._beating = threading.Thread(
            target=self._beat, name=f"graceful-heartbeat-{self.key}", daemon=True
        )
        self._beating.start()
        log.info("%s: registered as %s (ttl %g s)", self.name, self.key, self.ttl)
        ctx.started()
        self._stop.wait()

    def wrap_up(self, ctx: Context) -> None:
        self._state = "draining"
        self._write()

    def close(self, ctx: Context) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join(self.ttl)
        self._remove()

    def _remove(self) -> None:
        self._stop.set()
        self.redis.delete(self.key)
        log.info("%s: %s removed", self.name, self.key)
