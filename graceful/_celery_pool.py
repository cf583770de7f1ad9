"""The Celery pool's processes: how a prefork child learns that its worker is stopping.

Why it works this way:

* Celery's SIGTERM reaches only the worker's main process. Its prefork children (billiard
  forks them) keep the parent's memory as it was at the fork, so ``graceful.is_stopping()``
  in a task would stay False for ever: they must be told.
* A pipe made before the fork tells them: each child has the read end and a small daemon thread
  blocked on it; the parent *closes* its write end at wrap-up, and every child sees end of file
  at once (a broadcast that needs no per-child bookkeeping, no polling, and reaches a child
  forked later too: it sees the end of file as soon as it looks). The thread then calls
  ``wrap_up()`` on the child's lifecycle. A second pipe, closed at Celery's cold shutdown, asks
  each child to write the stack of the task it runs, so the report says where a stuck task is.
* At graceful's deadline a third pipe asks each child for the truth, and to stop. The parent's
  own records are stale then: Celery's main thread waits in the pool's join and reads no
  results, so a task that finished a second ago still looks "running" there, and its
  ``acks_late`` message unacknowledged (issue #29: 38 of 43 duplicates were such tasks, put
  back after they had finished). Each child takes its registry's lock for good (no task starts
  or ends there from then on), writes its stacks, answers with what it runs and what it
  finished (``<pid> R <id>`` / ``<pid> F <id>`` lines, then ``<pid> END``; each write is one
  whole line or more, below ``PIPE_BUF``, so the children's answers never interleave inside a
  line), and SIGKILLs itself. The parent waits (bounded) for the answers, SIGKILLs every pool
  process and waits for each to be gone, and only then puts anything back: a task cannot finish
  after it was requeued.
* End of file comes only once *every* copy of the write end is closed, and every fork copies it
  (pool children, an embedded beat, a library that forks). ``os.register_at_fork`` closes the
  copies in each new process before anything else runs there, so only the worker's main process
  holds them. A multiprocessing ``Event`` would need no pipe, but its ``set()`` waits for each
  sleeper to wake: one child SIGKILLed by a hard time limit would hang the parent's wrap-up.
* Tasks are recorded by the process that runs them (``task_prerun``/``task_postrun``): the
  thread that runs each one, so its stack can be printed from the same process, and the last
  ``FINISHED_KEPT`` it finished (what the parent may not have heard of yet).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from ._diagnostics import frame_lines, write_fd2

log = logging.getLogger("graceful")

_TRACER = os.path.join("celery", "app", "trace.py")

__all__ = ["FINISHED_KEPT", "Answers", "Pipes", "TaskRegistry", "ignore_pipes_after_fork", "stop_processes"]

FINISHED_KEPT = 1024
"""Task ids a pool process remembers having finished: more than a worker holds unacknowledged
(its prefetch), the window in which its parent may not have read their results."""

_LINE_BATCH = 3000
"""Bytes of answer lines per write: below ``PIPE_BUF`` (4096 on Linux, 512 by POSIX at least;
an id is 36 characters), so each write lands whole."""


class TaskRegistry:
    """The tasks this process is running (task id -> (task name, thread id)), and the ids of
    the last ``FINISHED_KEPT`` it finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, tuple[str, int]] = {}
        self._finished: deque[str] = deque(maxlen=FINISHED_KEPT)

    def started(self, task_id: str, name: str) -> None:
        with self._lock:
            self._running[task_id] = (name, threading.get_ident())

    def finished(self, task_id: str) -> None:
        with self._lock:
            if self._running.pop(task_id, None) is not None:
                self._finished.append(task_id)

    def freeze(self) -> tuple[dict[str, tuple[str, int]], list[str]]:
        """Take the lock for good, as the process is about to be killed: from now on no task
        here is recorded as started or finished (their threads block in ``task_prerun`` and
        ``task_postrun``). Returns what runs and what finished, exact as of now."""
        # Never released: the process ends with it held.
        self._lock.acquire()
        return dict(self._running), list(self._finished)

    def snapshot(self, *, blocking: bool = True) -> dict[str, tuple[str, int]]:
        """A copy of what runs here. ``blocking=False`` (in a signal handler, which may have
        interrupted this thread inside ``started()``): empty rather than wait for the lock."""
        if not self._lock.acquire(blocking):
            return {}
        try:
            return dict(self._running)
        finally:
            self._lock.release()

    def stack(
        self,
        task_id: str,
        indent: str = "      ",
        *,
        blocking: bool = True,
        running: dict[str, tuple[str, int]] | None = None,
    ) -> list[str]:
        """The current stack of the thread running ``task_id`` here, or [] if it runs elsewhere.

        From the task's own code inward: the frames of Celery's pool and tracer above it are
        the same in every report and only counted. ``running``: a snapshot already taken
        (after ``freeze()`` the lock is not to be taken again).
        """
        entry = (self.snapshot(blocking=blocking) if running is None else running).get(task_id)
        frame = None if entry is None else sys._current_frames().get(entry[1])
        if frame is None:
            return []
        return frame_lines(frame, indent, inner_from=(_TRACER, None), outer="Celery's pool and tracer")

    def dump(self, where: str, running: dict[str, tuple[str, int]] | None = None) -> str:
        """Each running task with its stack, as the force-quit report prints it."""
        running = self.snapshot() if running is None else running
        lines: list[str] = []
        for task_id, (name, _) in sorted(running.items()):
            lines.append(f"graceful: celery task {name} id {task_id} in {where}, at:")
            lines.extend(self.stack(task_id, running=running) or ["      (its thread has finished)"])
        return "".join(line + "\n" for line in lines)


class Answers:
    """What the pool processes said at the deadline: task id -> pid for what each ran, the ids
    each had finished, and the pids that answered."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.finished: set[str] = set()
        self.answered: set[int] = set()
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            parts = line.decode("ascii", "replace").split(" ")
            if len(parts) < 2 or not parts[0].isdigit():
                continue
            pid, kind = int(parts[0]), parts[1]
            if kind == "R" and len(parts) == 3:
                self.running[parts[2]] = pid
            elif kind == "F" and len(parts) == 3:
                self.finished.add(parts[2])
            elif kind == "END":
                self.answered.add(pid)


class Pipes:
    """The worker's pipes, made in its main process before the pool forks.

    ``tell``: closed by the parent at wrap-up (children wrap up). ``dump``: closed by the parent
    at Celery's cold shutdown (children print their tasks' stacks, then write ``<pid> STACKS``
    to ``ack``). ``stop``: closed at graceful's deadline (children stop and answer on ``ack``:
    see the module docstring). ``handoff``: Celery's signal handler writes to it, a thread of
    the parent reads it (a signal handler must not take locks, and starting graceful's
    shutdown does).
    """

    def __init__(self) -> None:
        self.main_pid = os.getpid()
        self.tell_r, self.tell_w = os.pipe()
        self.dump_r, self.dump_w = os.pipe()
        self.stop_r, self.stop_w = os.pipe()
        self.ack_r, self.ack_w = os.pipe()
        self.handoff_r, self.handoff_w = os.pipe()
        # A handler must never block on a full pipe.
        os.set_blocking(self.handoff_w, False)
        os.set_blocking(self.ack_w, False)
        self._acks = Answers()
        """What the children wrote on ``ack`` (read by the parent only)."""

    # -- in the parent ----------------------------------------------------------------------------

    def tell_children(self) -> None:
        """Broadcast the wrap-up: every child's watcher sees end of file. Idempotent."""
        self.tell_w = _close(self.tell_w)

    def ask_for_stacks(self, busy: int, timeout: float) -> int:
        """Ask every child for its tasks' stacks; wait (bounded) for ``busy`` of them.

        Lock-free (``close``, ``select``, ``read``): Celery's signal handler calls it.
        """
        self.dump_w = _close(self.dump_w)
        until = time.monotonic() + timeout
        done = 0
        while done < busy and (left := until - time.monotonic()) > 0:
            ready, _, _ = select.select([self.ack_r], [], [], left)
            if not ready:
                break
            chunk = os.read(self.ack_r, 65536)
            done += chunk.count(b" STACKS\n")
            # A deadline's answers may follow: keep what came with them.
            self._acks.feed(chunk)
        return done

    def collect_answers(self, expected: Iterable[int], timeout: float) -> Answers:
        """At the deadline: tell every child to stop and answer; wait (bounded) until each of
        ``expected`` has answered. Children not expected are heard too, if they answer in time."""
        self.stop_w = _close(self.stop_w)
        waiting = set(expected)
        answers = self._acks
        until = time.monotonic() + timeout
        while (left := until - time.monotonic()) > 0:
            # A process that is gone (an idle one exits as the pool closes) will not answer.
            waiting = {pid for pid in waiting - answers.answered if _alive(pid)}
            if not waiting:
                break
            ready, _, _ = select.select([self.ack_r], [], [], min(left, 0.02))
            if ready:
                answers.feed(os.read(self.ack_r, 65536))
        os.set_blocking(self.ack_r, False)
        # Read what else is there already (BlockingIOError: none).
        with contextlib.suppress(OSError):
            while chunk := os.read(self.ack_r, 65536):
                answers.feed(chunk)
        return answers

    def hand_off(self, note: bytes) -> None:
        """From a signal handler: one write, no lock, never blocks (a full pipe drops the note:
        one is enough, the stop is idempotent)."""
        with contextlib.suppress(OSError):
            os.write(self.handoff_w, note[:200] + b"\n")

    def read_hand_offs(self, on_note: Callable[[str], object]) -> None:
        """The parent's thread: call ``on_note`` for each note the signal handler wrote."""
        pending = b""
        while True:
            try:
                chunk = os.read(self.handoff_r, 512)
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *notes, pending = pending.split(b"\n")
            for note in notes:
                on_note(note.decode("utf-8", "replace"))

    # -- in a child -------------------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """Drop the parent's ends, so that only the parent holds them (end of file = its close)."""
        self.tell_w = _close(self.tell_w)
        self.dump_w = _close(self.dump_w)
        self.stop_w = _close(self.stop_w)
        self.ack_r = _close(self.ack_r)
        self.handoff_r = _close(self.handoff_r)
        self.handoff_w = _close(self.handoff_w)

    def watch(self, on_stop: Callable[[], object], registry: TaskRegistry, where: str) -> threading.Thread:
        """Start the child's watcher thread (daemon: the child exits whatever it waits on).

        ``on_stop`` at wrap-up; ``registry``'s stacks at a cold shutdown; at the deadline,
        ``registry`` frozen, its stacks, the answer, and a SIGKILL to this process.
        """
        thread = threading.Thread(
            target=self._watch, args=(on_stop, registry, where), name="graceful-celery-child", daemon=True
        )
        thread.start()
        return thread

    def _watch(self, on_stop: Callable[[], object], registry: TaskRegistry, where: str) -> None:
        waiting = {self.tell_r, self.dump_r, self.stop_r}
        while waiting:
            ready, _, _ = select.select(sorted(waiting), [], [])
            for fd in ready:
                if os.read(fd, 64):
                    # Nobody writes these pipes; only their end of file means something.
                    continue
                waiting.discard(fd)
                try:
                    if fd == self.tell_r:
                        on_stop()
                    elif fd == self.dump_r:
                        self._dump(registry.dump(where))
                    else:
                        self._answer_and_die(registry, where)
                except Exception:
                    # The watcher must keep watching the other pipes.
                    log.exception("graceful: the Celery pool process watcher failed")

    def _dump(self, text: str) -> None:
        if text:
            write_fd2(text)
            self._say(f"{os.getpid()} STACKS\n")

    def _answer_and_die(self, registry: TaskRegistry, where: str) -> None:
        """At the deadline: freeze, stacks, the answer, SIGKILL (see the module docstring)."""
        pid = os.getpid()
        try:
            running, finished = registry.freeze()
            text = registry.dump(where, running)
            if text:
                write_fd2(text)
            lines = [f"{pid} R {task_id}\n" for task_id in running]
            lines += [f"{pid} F {task_id}\n" for task_id in finished]
            lines.append(f"{pid} END\n")
            batch = ""
            for line in lines:
                if len(batch) + len(line) > _LINE_BATCH:
                    self._say(batch)
                    batch = ""
                batch += line
            self._say(batch)
        finally:
            # Nothing of this process runs after its answer.
            os.kill(pid, signal.SIGKILL)

    def _say(self, text: str) -> None:
        """One write of whole lines to ``ack`` (non-blocking: wait, bounded, while it is full)."""
        data = text.encode("ascii", "replace")
        until = time.monotonic() + 1.0
        while data and time.monotonic() < until:
            try:
                data = data[os.write(self.ack_w, data) :]
            except BlockingIOError:
                select.select([], [self.ack_w], [], 0.05)
            except OSError:
                return


def stop_processes(pids: Iterable[int], timeout: float) -> list[int]:
    """SIGKILL each of ``pids`` and wait (bounded) until each is gone; the pids still there.

    A pidfd (Linux 5.3+) is opened before the signal and the signal sent through it: a child
    that died meanwhile and was reaped cannot have its pid reused under us. Without pidfds,
    ``os.kill`` and a poll of ``/proc`` (or ``kill(pid, 0)``).
    """
    fds: dict[int, int] = {}
    left: list[int] = []
    for pid in set(pids):
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except (AttributeError, OSError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                left.append(pid)
            continue
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fds[pid], signal.SIGKILL)
    until = time.monotonic() + timeout
    try:
        pending = dict(fds)
        while pending and (rest := until - time.monotonic()) > 0:
            ready, _, _ = select.select(list(pending.values()), [], [], rest)
            for pid in [pid for pid, fd in pending.items() if fd in ready]:
                del pending[pid]
        while left and time.monotonic() < until:
            left = [pid for pid in left if _alive(pid)]
            if left:
                time.sleep(0.002)
        return sorted([*pending, *left])
    finally:
        for fd in fds.values():
            os.close(fd)


def _alive(pid: int) -> bool:
    """Running (not a zombie), as far as ``/proc`` (or ``kill(pid, 0)``) tells."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _close(fd: int) -> int:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    return -1


_forked: list[Pipes] = []
_hook_installed = False


def ignore_pipes_after_fork(pipes: Pipes) -> None:
    """Have every process forked from here on drop the parent's ends of ``pipes`` at once."""
    global _hook_installed
    _forked.append(pipes)
    if not _hook_installed:
        _hook_installed = True
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    for pipes in _forked:
        pipes.after_fork_in_child()
