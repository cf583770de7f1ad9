"""The threads that run listeners: reused while work flows, grown only when all are blocked.

Why: listeners of a phase run concurrently, but a thread per listener for ever would cost an OS
thread for every idle registration. The contract asks for both ends: 10,000 no-op listeners
finish a phase fast (a couple of threads, reused), and 100 listeners that each block 1 s finish
it in about 1 s (the pool grows when every thread is blocked and work is waiting). Idle threads
exit, so a process that never shuts down keeps none.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Pool", "pool"]


class Pool:
    """Worker threads for listeners: reused while work flows, grown when all are blocked.

    ``submit`` queues a job and makes sure a worker exists. A watcher runs while jobs are
    queued: if no job has finished for ``STALL`` seconds, every worker is blocked, so it adds
    one worker per waiting job (up to ``GROW``). A worker with nothing to do for ``IDLE``
    seconds exits.
    """

    STALL = 0.004
    GROW = 128
    IDLE = 2.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: deque[Callable[[], None]] = deque()
        self._ready = threading.Condition(self._lock)
        self._left = threading.Condition(self._lock)
        self._workers = 0
        self._idle = 0
        self._finished = 0
        self._watching = False
        self._names = 0

    def submit(self, *jobs: Callable[[], None]) -> None:
        """Queue ``jobs`` (a whole phase at once: one lock round-trip, not one per listener)."""
        with self._lock:
            self._jobs.extend(jobs)
            if self._idle > 0:
                self._ready.notify(len(jobs))
            elif self._workers == 0:
                self._spawn(1)
            if not self._watching:
                self._watching = True
                threading.Thread(target=self._watch, name="graceful-pool-watch", daemon=True).start()

    def _spawn(self, count: int) -> None:
        for _ in range(count):
            self._workers += 1
            self._names += 1
            threading.Thread(target=self._work, name=f"graceful-listener-{self._names}", daemon=True).start()

    def _work(self) -> None:
        ran = 0
        while True:
            with self._lock:
                self._finished += ran  # under the lock: several workers write it
                ran = 1
                while not self._jobs:
                    self._idle += 1
                    woke = self._ready.wait(self.IDLE)
                    self._idle -= 1
                    if not woke and not self._jobs:
                        self._workers -= 1
                        self._left.notify_all()
                        return
                job = self._jobs.popleft()
            job()

    def wait_idle(self, timeout: float) -> bool:
        """Block until every worker has exited (idle workers leave after ``IDLE`` s)."""
        with self._lock:
            return self._left.wait_for(lambda: self._workers == 0, timeout)

    def _watch(self) -> None:
        seen = -1
        while True:
            with self._lock:
                if not self._jobs:
                    self._watching = False
                    return
                if self._finished == seen and self._idle == 0:
                    self._spawn(min(len(self._jobs), self.GROW))
                seen = self._finished
            time.sleep(self.STALL)


pool = Pool()
"""The one pool of the process: every lifecycle's listeners share it."""
