"""The in-place rig's process machinery: the generations of a service, and the socket they report on.

Why it is built this way:

* A generation the rig did not start (graceful's successor, gunicorn's new master) is followed
  by its pid through a pidfd, opened the moment the rig learns the pid: its exit is seen when
  it happens, and a pid reused later cannot be mistaken for it.
* While a run lasts the rig is a child subreaper (``PR_SET_CHILD_SUBREAPER``), as systemd is for
  a unit: an old generation whose parent exited is reparented to the rig, so its exit code is
  read with ``waitpid`` instead of being lost to init (which, in some containers, never reaps
  it: a zombie). On the way out every generation still alive is killed with its process group
  (gunicorn's workers are in their master's), and every child left, an orphan adopted, is
  killed and reaped.
* One datagram socket, in the abstract namespace (no path to clean up or to outgrow 108 bytes),
  with ``SO_PASSCRED`` so that each datagram comes with its sender's pid: ``NOTIFY_SOCKET`` for
  graceful (``MAINPID=``, ``READY=1``), ``RIG_APP_LOADED`` for gunicorn's app.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from _harness import BenchError

PR_SET_CHILD_SUBREAPER = 36
_names = itertools.count()


# -- the generations ----------------------------------------------------------------------------


@dataclass
class Generation:
    """One generation of the service: its pid, a pidfd, and its Popen when the rig started it."""

    pid: int
    pidfd: int
    proc: subprocess.Popen[bytes] | None = None
    reaped: bool = False
    code: int | None = None

    def exited(self) -> bool:
        readable, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(readable)

    def wait(self, bound: float) -> float | None:
        """The monotonic time it exited, or None if it is still running after ``bound`` s."""
        readable, _, _ = select.select([self.pidfd], [], [], bound)
        return time.monotonic() if readable else None

    def reap(self) -> int | None:
        """Its exit code once it exited; None if it is not the rig's child (its parent reaps it)."""
        if self.reaped:
            return self.code
        if self.proc is not None:
            self.code = self.proc.wait()
        else:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.code = None
        self.reaped = True
        return self.code


class Lineage:
    """Every generation of one run; on exit, those still alive are killed with their groups."""

    def __init__(self) -> None:
        self.generations: list[Generation] = []

    def add(self, pid: int, proc: subprocess.Popen[bytes] | None = None) -> Generation:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise BenchError(f"generation {pid} exited before the rig could follow it") from None
        generation = Generation(pid, pidfd, proc)
        self.generations.append(generation)
        return generation

    def __enter__(self) -> Lineage:
        return self

    def __exit__(self, *exc: object) -> None:
        own = os.getpgrp()
        for generation in self.generations:
            if generation.exited():
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(generation.pid)
                if group != own:  # its workers too; never the rig's own group
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(generation.pidfd, signal.SIGKILL)
        for generation in self.generations:
            if generation.wait(10) is not None:
                generation.reap()
            os.close(generation.pidfd)
        self.generations.clear()


@contextlib.contextmanager
def subreaper() -> Iterator[bool]:
    """The rig adopts the orphans of its generations while the run lasts (Linux; else a no-op)."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = getattr(libc, "prctl", None)
    adopted = prctl is not None and prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield adopted
    finally:
        if adopted:
            assert prctl is not None
            prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
            _reap_orphans()


def _children() -> list[int]:
    """The pids whose parent is this process (from /proc)."""
    own, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == own:
                out.append(int(entry))
    return out


def _reap_orphans(bound: float = 5.0) -> None:
    """Kill and reap every child left: by now every process the rig started was reaped, so any
    child is an orphan of a generation (a successor the run never learnt of, a killed master's
    worker) that the subreaper adopted; bounded."""
    for pid in _children():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no child left at all
        if pid == 0:
            time.sleep(0.01)  # children left, none exited yet: killed a moment ago
    # still some after the bound: left to init when the benchmark exits


# -- the notify socket ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    sender: int  # the sending process (its credentials), 0 if unknown
    at: float  # monotonic time it was read
    fields: dict[str, str]


class Notify:
    """The rig's datagram socket (abstract): NOTIFY_SOCKET for graceful, RIG_APP_LOADED for gunicorn."""

    def __init__(self) -> None:
        self.name = f"@graceful-inplace-{os.getpid()}-{next(_names)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)

    def read(self, timeout: float = 0.0) -> list[Message]:
        """The datagrams that came, waiting up to ``timeout`` s for the first."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        out: list[Message] = []
        while readable:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except BlockingIOError:
                break
            sender = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
                    sender = struct.unpack("3i", payload[:12])[0]
            lines = data.decode(errors="replace").splitlines()
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            out.append(Message(sender, time.monotonic(), fields))
        return out

    def __enter__(self) -> Notify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
