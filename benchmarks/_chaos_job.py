"""The chaos run's job, the same for every queue: sleep, then record its side effect in Redis.

Runs inside the workers (each queue's program imports it); needs only the stdlib and redis-py.

Why it is built this way:

* **The side effect is exact.** A job's effect is ``SADD done <key>`` once, at its end; when
  SADD returns 0 the key was already there, so the job ran to its end twice: ``INCR
  duplicates`` (and the key goes on the ``dup`` list, with the generation of the worker that
  repeated it). Lost is counted by the controller: the keys never in ``done`` once the queue
  has been drained.
* **Some jobs iterate** (the job-iteration pattern: SolidQueue's stop hook and the
  job-iteration library, graceful's docs for each host): ``n`` items from a cursor ``c``, one
  ``SADD done <id>:<item>`` per item. Under graceful the job looks at ``is_stopping()`` at each
  item boundary and, once it is True, hands the rest on (``requeue`` with the cursor) and
  returns; without graceful it runs all its items.
* **Each worker is a generation** (``CHAOS_GEN``, inherited by pool processes): a job counts
  its start (``HINCRBY started <gen>``) and its end (``RPUSH fin:<gen> <monotonic time>``), so
  the controller knows, per stop, whether a job was cut (started, never ended) and when the
  last job in hand ended (``CLOCK_MONOTONIC`` is one clock for every process of the machine).
* The queue's worker says it is ready with ``RPUSH ready:<gen> <pid>``: one readiness signal
  for five queues, whatever each does with stdout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import redis

URL = os.environ.get("CHAOS_REDIS_URL", "redis://127.0.0.1:6379/0")
GEN = os.environ.get("CHAOS_GEN", "0")
GRACEFUL = os.environ.get("CHAOS_GRACEFUL") == "1"

Job = dict[str, Any]  # {"id": "j17", "s": seconds, "n": items (0: not iterating), "c": cursor}

_client: redis.Redis | None = None
_pid = 0


def client() -> redis.Redis:
    """One client per process (a pool process must not share its parent's connections)."""
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client = redis.Redis.from_url(URL, socket_timeout=30)
        _pid = os.getpid()
    return _client


def ready() -> None:
    client().rpush(f"ready:{GEN}", os.getpid())


def effect(key: str) -> None:
    db = client()
    if db.sadd("done", key) == 0:
        db.incr("duplicates")
        db.rpush("dup", f"{key} gen {GEN}")


def started(job: Job | None = None, ref: str = "") -> None:
    client().hincrby("started", GEN, 1)
    _say(job, "start", ref)


def finished(job: Job | None = None, how: str = "end", ref: str = "") -> None:
    client().rpush(f"fin:{GEN}", repr(time.monotonic()))
    _say(job, how, ref)


def _say(job: Job | None, what: str, ref: str) -> None:
    """One line in the worker's log (fd 2, one write: whole lines from every process), so that a
    duplicate or a lost job can be followed from the log to the queue's own lines (``ref``: the
    queue's id of the message)."""
    if job is not None:
        line = f"chaos job {job['id']} c={job['c']} {what}: gen {GEN} pid {os.getpid()} {ref}".rstrip()
        os.write(2, f"{line}\n".encode())


def run(
    job: Job,
    stopping: Callable[[], bool] | None = None,
    requeue: Callable[[Job], object] | None = None,
    ref: str = "",
) -> str:
    """Do ``job``; with ``stopping`` and ``requeue``, an iterating job hands its rest on at a stop."""
    started(job, ref)
    items = int(job["n"])
    if not items:
        time.sleep(float(job["s"]))
        effect(str(job["id"]))
        finished(job, ref=ref)
        return "done"
    per_item = float(job["s"]) / items
    for item in range(int(job["c"]), items):
        if stopping is not None and requeue is not None and stopping():
            finished(
                job, f"checkpoint at {item}", ref
            )  # the job in hand ends here: what follows is the hand-over
            requeue({**job, "c": item})
            return f"checkpointed at {item}"
        time.sleep(per_item)
        effect(f"{job['id']}:{item}")
    finished(job, ref=ref)
    return "done"


def expected_keys(jobs: list[Job]) -> set[str]:
    """Every key a complete run puts in ``done``."""
    keys: set[str] = set()
    for job in jobs:
        if job["n"]:
            keys.update(f"{job['id']}:{item}" for item in range(int(job["n"])))
        else:
            keys.add(str(job["id"]))
    return keys
