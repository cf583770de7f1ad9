"""The Celery pool's processes: how a prefork child learns that its worker is stopping.

Why it works this way:

* Celery's SIGTERM reaches only the worker's main process. Its prefork children (billiard
  forks them) keep the parent's memory as it was at the fork, so ``graceful.is_stopping()``
  in a task would stay False for ever: they must be told.
* A pipe made before the fork tells them: each child has the read end and a small daemon thread
  blocked on it; the parent *closes* its write end at wrap-up, and every child sees end of file
  at once (a broadcast that needs no per-child bookkeeping, no polling, and reaches a child
  forked later too: it sees the end of file as soon as it looks). The thread then calls
  ``wrap_up()`` on the child's lifecycle. A second pipe, closed at graceful's deadline, asks each
  child to write the stack of the task it runs, so the report says where a stuck task is.
* End of file comes only once *every* copy of the write end is closed, and every fork copies it
  (pool children, an embedded beat, a library that forks). ``os.register_at_fork`` closes the
  copies in each new process before anything else runs there, so only the worker's main process
  holds them. A multiprocessing ``Event`` would need no pipe, but its ``set()`` waits for each
  sleeper to wake: one child SIGKILLed by a hard time limit would hang the parent's wrap-up.
* Tasks are recorded by the process that runs them (``task_prerun``/``task_postrun``): the
  thread that runs each one, so its stack can be printed from the same process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import sys
import threading
import traceback
from collections.abc import Callable

from ._diagnostics import write_fd2

log = logging.getLogger("graceful")

_TRACER = os.path.join("celery", "app", "trace.py")

__all__ = ["Pipes", "TaskRegistry", "ignore_pipes_after_fork"]


class TaskRegistry:
    """The tasks this process is running: task id -> (task name, thread id)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, tuple[str, int]] = {}

    def started(self, task_id: str, name: str) -> None:
        with self._lock:
            self._running[task_id] = (name, threading.get_ident())

    def finished(self, task_id: str) -> None:
        with self._lock:
            self._running.pop(task_id, None)

    def snapshot(self, *, blocking: bool = True) -> dict[str, tuple[str, int]]:
        """A copy of what runs here. ``blocking=False`` (in a signal handler, which may have
        interrupted this thread inside ``started()``): empty rather than wait for the lock."""
        if not self._lock.acquire(blocking):
            return {}
        try:
            return dict(self._running)
        finally:
            self._lock.release()

    def stack(self, task_id: str, indent: str = "      ", *, blocking: bool = True) -> list[str]:
        """The current stack of the thread running ``task_id`` here, or [] if it runs elsewhere.

        From the task's own code inward: the frames of Celery's pool and tracer above it are
        the same in every report and only counted.
        """
        entry = self.snapshot(blocking=blocking).get(task_id)
        frame = None if entry is None else sys._current_frames().get(entry[1])
        if frame is None:
            return []
        frames = traceback.extract_stack(frame)
        inner = [i for i, summary in enumerate(frames) if summary.filename.endswith(_TRACER)]
        cut = inner[-1] + 1 if inner and inner[-1] + 1 < len(frames) else 0
        lines = [f"{indent}({cut} outer frames of Celery's pool and tracer)"] if cut else []
        for text in traceback.format_list(frames[cut:]):
            lines.extend(indent + line for line in text.rstrip().split("\n"))
        return lines

    def dump(self, where: str) -> str:
        """Each running task with its stack, as the force-quit report prints it."""
        lines: list[str] = []
        for task_id, (name, _) in sorted(self.snapshot().items()):
            lines.append(f"graceful: celery task {name} id {task_id} in {where}, at:")
            lines.extend(self.stack(task_id) or ["      (its thread has finished)"])
        return "".join(line + "\n" for line in lines)


class Pipes:
    """The worker's pipes, made in its main process before the pool forks.

    ``tell``: closed by the parent at wrap-up (children wrap up). ``dump``: closed by the parent
    at the deadline (children print their tasks' stacks, then write one byte to ``ack``).
    ``handoff``: Celery's signal handler writes to it, a thread of the parent reads it (a
    signal handler must not take locks, and starting graceful's shutdown does).
    """

    def __init__(self) -> None:
        self.main_pid = os.getpid()
        self.tell_r, self.tell_w = os.pipe()
        self.dump_r, self.dump_w = os.pipe()
        self.ack_r, self.ack_w = os.pipe()
        self.handoff_r, self.handoff_w = os.pipe()
        os.set_blocking(self.handoff_w, False)  # a handler must never block on a full pipe
        os.set_blocking(self.ack_w, False)

    # -- in the parent ----------------------------------------------------------------------------

    def tell_children(self) -> None:
        """Broadcast the wrap-up: every child's watcher sees end of file. Idempotent."""
        self.tell_w = _close(self.tell_w)

    def ask_for_stacks(self, busy: int, timeout: float) -> int:
        """Ask every child for its tasks' stacks; wait (bounded) for ``busy`` answers."""
        self.dump_w = _close(self.dump_w)
        answered = 0
        while answered < busy:
            ready, _, _ = select.select([self.ack_r], [], [], timeout)
            if not ready:
                break
            answered += len(os.read(self.ack_r, 64))
        return answered

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
        self.ack_r = _close(self.ack_r)
        self.handoff_r = _close(self.handoff_r)
        self.handoff_w = _close(self.handoff_w)

    def watch(self, on_stop: Callable[[], object], on_dump: Callable[[], str]) -> threading.Thread:
        """Start the child's watcher thread (daemon: the child exits whatever it waits on)."""
        thread = threading.Thread(
            target=self._watch, args=(on_stop, on_dump), name="graceful-celery-child", daemon=True
        )
        thread.start()
        return thread

    def _watch(self, on_stop: Callable[[], object], on_dump: Callable[[], str]) -> None:
        waiting = {self.tell_r, self.dump_r}
        while waiting:
            ready, _, _ = select.select(sorted(waiting), [], [])
            for fd in ready:
                if os.read(fd, 64):
                    continue  # nobody writes these pipes; only their end of file means something
                waiting.discard(fd)
                try:
                    if fd == self.tell_r:
                        on_stop()
                    else:
                        self._dump(on_dump)
                except Exception:  # the watcher must keep watching the other pipe
                    log.exception("graceful: the Celery pool process watcher failed")

    def _dump(self, on_dump: Callable[[], str]) -> None:
        text = on_dump()
        if text:
            write_fd2(text)
            with contextlib.suppress(OSError):
                os.write(self.ack_w, b".")


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
