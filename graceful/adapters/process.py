"""Child processes (``subprocess.Popen``, ``multiprocessing.Process``) as services.

Why: gunicorn (#1910) and SolidQueue (#755) lost signals around their children, and a child
left behind is a zombie or an orphan still holding a port. Here a child is stopped the way a
supervisor should: at shutdown it is sent SIGTERM, once, and waited for within the remaining
budget; at the deadline it is sent SIGKILL and reaped, and each escalation is logged
with its pid and command. A child that exits on its own stops the others (``run()``'s rule);
a non-zero exit code counts as a failure (exit code 1).

A child started in its own session or process group (``start_new_session=True``,
``process_group=0``) is signalled as a group: SIGTERM and SIGKILL reach the grandchildren it
started too, so no part of the tree outlives the service. A child in our own group is signalled
alone (signalling our group would signal us).

A pause (SIGTSTP, ``wrap_up()``) sends nothing by default: SIGTSTP's default action *suspends*
a process, and a suspended child would then ignore the SIGTERM that follows. A child known to
use graceful (or to handle SIGTSTP itself) can be paused along with its parent by passing
``pause_signal=signal.SIGTSTP``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading

from .._checks import TYPE_CHECKING
from .._lifecycle import on_force_quit
from .._service import Context

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["ProcessService", "adapt"]


class _Child:
    """The few things we need of a Popen or a multiprocessing Process."""

    def __init__(self, child: Any) -> None:
        self.child = child
        self.is_popen = isinstance(child, subprocess.Popen)

    @property
    def pid(self) -> int | None:
        pid: int | None = getattr(self.child, "pid", None)
        return pid

    def describe(self) -> str:
        args = getattr(self.child, "args", None) or getattr(self.child, "name", "")
        return f"pid {self.pid} ({args})"

    def returncode(self) -> int | None:
        code: int | None = self.child.poll() if self.is_popen else self.child.exitcode
        return code

    def wait(self, timeout: float | None) -> bool:
        """Wait (and reap); True once it has exited."""
        if self.is_popen:
            try:
                self.child.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        self.child.join(timeout)
        return self.returncode() is not None

    def leads_group(self) -> bool:
        """True if the child leads its own process group (``start_new_session=True``)."""
        # Windows has no process groups.
        if self.pid is None or not hasattr(os, "getpgid"):
            return False
        try:
            return os.getpgid(self.pid) == self.pid
        except (ProcessLookupError, PermissionError):
            return False

    def send(self, sig: int) -> None:
        if self.returncode() is None and self.pid is not None:
            # Exited between the check and the kill.
            with contextlib.suppress(ProcessLookupError):
                if self.leads_group():
                    # The whole tree it started, grandchildren included.
                    os.killpg(self.pid, sig)
                elif self.is_popen:
                    # Popen guards against a reaped, reused pid.
                    self.child.send_signal(sig)
                else:
                    os.kill(self.pid, sig)


class ProcessService:
    """One child process: SIGTERM at wrap-up, SIGKILL at the deadline, always reaped."""

    bounds_its_drain = True
    """Its ``wrap_up`` bounds itself and names what it cuts: ``run()`` does not abandon it at the
    wrap-up timeout (graceful/_service.py)."""

    def __init__(self, child: Any, name: str | None = None, *, pause_signal: int | None = None) -> None:
        self._child = _Child(child)
        self._pause_signal = pause_signal
        self.name = name or f"child {self._child.pid}"
        self._by_us = threading.Event()
        self._termed = threading.Event()

    def _terminate(self) -> None:
        """SIGTERM once: a second one could land after a graceful child restored its handlers."""
        if not self._termed.is_set():
            self._termed.set()
            if self._child.returncode() is None:
                log.info("stopping %s with SIGTERM", self._child.describe())
            self._child.send(signal.SIGTERM)

    def serve(self, ctx: Context) -> None:
        on_force_quit(ctx.lifecycle, self._kill, name=f"kill {self.name}")
        # A stop that came while we were starting is not lost.
        if ctx.lifecycle.is_stopping():
            self._by_us.set()
            self._pause_or_terminate(ctx)
        ctx.started()
        self._child.wait(None)
        code = self._child.returncode()
        if code not in (0, None) and not self._by_us.is_set():
            raise RuntimeError(f"{self.name} ({self._child.describe()}) exited with code {code}")

    def wrap_up(self, ctx: Context) -> None:
        self._by_us.set()
        remaining = self._pause_or_terminate(ctx)
        if remaining is not None and not self._child.wait(remaining):
            log.warning("%s still running at the deadline; it will be killed", self._child.describe())

    def _pause_or_terminate(self, ctx: Context) -> float | None:
        """SIGTERM at shutdown; at a pause, the pause signal if one was given. The budget left."""
        if ctx.shutting_down():
            self._terminate()
            return ctx.remaining()
        if self._pause_signal is not None:
            self._child.send(self._pause_signal)
        return None

    def close(self, ctx: Context) -> None:
        if self._child.returncode() is None:
            # After a pause, the SIGTERM comes now.
            self._terminate()
            # Until it exits or the deadline's hook kills it: a kill is always a forced exit.
            self._child.wait(None)

    def _kill(self) -> None:
        if self._child.returncode() is None:
            log.warning("%s did not stop in time: sending SIGKILL", self._child.describe())
            self._child.send(signal.SIGKILL)
        # Reap: no zombie left behind.
        self._child.wait(5.0)


def adapt(obj: object) -> ProcessService | None:
    """The service for a ``subprocess.Popen`` or a ``multiprocessing.Process``; else None."""
    if isinstance(obj, subprocess.Popen):
        return ProcessService(obj)
    # Already imported if obj is one: nothing is imported here.
    process_module = sys.modules.get("multiprocessing.process")
    if process_module is not None and isinstance(obj, process_module.BaseProcess):
        return ProcessService(obj)
    return None
