"""The chaos run's rq worker: rq's own ``Worker`` (plain), or ``graceful.run(rq.SimpleWorker)``.

    python -m _chaos_rq                      # a worker on the queue "chaos" (CHAOS_* variables)
    python -c "import _chaos_rq; _chaos_rq.enqueue('jobs.json')"

Plain is what an rq user runs: ``rq.Worker`` (a forked "horse" per job, rq's own SIGTERM
handling: a warm shutdown that waits for the job in hand). Under graceful, rq's docs and
graceful's (docs/adapters/workers.md) say ``rq.SimpleWorker``: the job runs in the worker's
thread, graceful's budget bounds it, and a job still running at the deadline is put back at the
front of its queue. An iterating job hands its rest on with a new job from its cursor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _chaos_job
import rq

QUEUE = "chaos"


def job(spec: _chaos_job.Job) -> str:
    current = rq.get_current_job()
    ref = current.id if current is not None else ""
    if not _chaos_job.GRACEFUL:
        return _chaos_job.run(spec, ref=ref)
    import graceful

    return _chaos_job.run(spec, graceful.is_stopping, _enqueue_one, ref)


def _enqueue_one(spec: _chaos_job.Job) -> None:
    rq.Queue(QUEUE, connection=_chaos_job.client()).enqueue("_chaos_rq.job", spec)


def enqueue(path: str) -> None:
    queue = rq.Queue(QUEUE, connection=_chaos_job.client())
    for spec in json.loads(Path(path).read_text(encoding="utf-8")):
        queue.enqueue("_chaos_rq.job", spec)


def main() -> int:
    connection = _chaos_job.client()
    queue = rq.Queue(QUEUE, connection=connection)
    worker_class = rq.SimpleWorker if _chaos_job.GRACEFUL else rq.Worker
    worker = worker_class([queue], connection=connection)
    register_birth = worker.register_birth

    def register_then_say_ready() -> None:
        register_birth()
        _chaos_job.ready()

    worker.register_birth = register_then_say_ready  # type: ignore[method-assign]
    if not _chaos_job.GRACEFUL:
        worker.work()
        return 0
    import graceful

    return graceful.run(worker)


if __name__ == "__main__":
    sys.exit(main())
